#!/usr/bin/env bash
# Build a tiny initramfs from Debian's busybox-static: /init prints a marker,
# mounts /proc, prints the kernel version and powers the VM off.
# Output: artifacts/debian/initramfs.cpio.gz (nothing is committed).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${HVPROBE_DEBIAN_DIR:-$root/artifacts/debian}"
mkdir -p "$out/.work"
cd "$out/.work"
if [ ! -s busybox ]; then
  rm -f busybox-static_*.deb
  apt-get download busybox-static >/dev/null 2>&1 || { apt-get update -qq; apt-get download busybox-static >/dev/null; }
  rm -rf bb && mkdir bb && dpkg-deb -x busybox-static_*.deb bb
  cp bb/bin/busybox busybox && rm -rf bb busybox-static_*.deb
fi
# newc cpio written by python (no cpio binary on a fresh machine).
python3 - "$out/initramfs.cpio.gz" busybox <<'PY'
import gzip, os, sys, time
dst, busybox = sys.argv[1], sys.argv[2]
init = b"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox echo "HVPROBE-INIT-REACHED"
/bin/busybox echo "uptime: $(/bin/busybox cat /proc/uptime)"
/bin/busybox uname -a
/bin/busybox poweroff -f
"""
entries = [("bin", 0o040755, b""), ("proc", 0o040755, b""), ("dev", 0o040755, b""),
           ("bin/busybox", 0o100755, open(busybox, "rb").read()),
           ("bin/sh", 0o120777, b"busybox"), ("init", 0o100755, init)]
out = bytearray()
def add(name, mode, data, ino):
    nb = name.encode() + b"\0"
    hdr = "070701" + "".join("%08x" % v for v in (ino, mode, 0, 0, 1, int(time.time()), len(data), 0, 0, 0, 0, len(nb), 0))
    out.extend(hdr.encode()); out.extend(nb)
    out.extend(b"\0" * ((4 - len(out) % 4) % 4)); out.extend(data)
    out.extend(b"\0" * ((4 - len(out) % 4) % 4))
for i, (n, m, d) in enumerate(entries):
    add(n, m, d, i + 1)
add("TRAILER!!!", 0, b"", 0)
with gzip.open(dst, "wb") as f:
    f.write(out)
print("initramfs:", dst, len(out), "bytes before gzip")
PY
