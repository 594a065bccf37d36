#!/usr/bin/env bash
# Build a tiny initramfs from Debian's busybox-static: /init prints a marker,
# mounts /proc, prints the kernel version and powers the VM off.
# Output: artifacts/debian/initramfs.cpio.gz (nothing is committed).
#
# Also initramfs-int80.cpio.gz, whose /init is a few instructions of
# assembly that do the same through `int $0x80` only: on the project's nested
# KVM, user-mode code runs natively and its SYSCALL instruction does not
# enter the guest kernel properly (see README), while interrupt gates do.
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
# /init that uses only int $0x80 (the i386 system call gate, IA32 emulation).
cat > init80.S <<'ASM'
	.globl _start
	.text
_start:
	mov $4, %eax			/* write(1, msg, len) */
	mov $1, %ebx
	mov $msg, %ecx
	mov $(msg_end - msg), %edx
	int $0x80
	mov $21, %eax			/* mount("proc", "/proc", "proc", 0, 0) */
	mov $proc, %ebx
	mov $proc_dir, %ecx
	mov $proc, %edx
	xor %esi, %esi
	xor %edi, %edi
	int $0x80
	mov $4, %eax			/* write(1, mounted, len) */
	mov $1, %ebx
	mov $mounted, %ecx
	mov $(mounted_end - mounted), %edx
	int $0x80
	mov $88, %eax			/* reboot(MAGIC1, MAGIC2, POWER_OFF) */
	mov $0xfee1dead, %ebx
	mov $672274793, %ecx
	mov $0x4321fedc, %edx
	int $0x80
1:	jmp 1b
	.data
msg:	.ascii "HVPROBE-INIT-REACHED (int 0x80 init)\n"
msg_end:
mounted: .ascii "HVPROBE-PROC-MOUNTED\n"
mounted_end:
proc:	.asciz "proc"
proc_dir: .asciz "/proc"
ASM
as --64 -o init80.o init80.S
ld -static -nostdlib -Ttext=0x401000 -o init80 init80.o

# newc cpio written by python (no cpio binary on a fresh machine).
for variant in busybox int80; do
python3 - "$out/initramfs$([ $variant = int80 ] && echo -int80).cpio.gz" busybox "$variant" <<'PY'
import gzip, os, sys, time
dst, busybox, variant = sys.argv[1], sys.argv[2], sys.argv[3]
init = b"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox echo "HVPROBE-INIT-REACHED"
/bin/busybox echo "uptime: $(/bin/busybox cat /proc/uptime)"
/bin/busybox uname -a
/bin/busybox poweroff -f
"""
if variant == "int80":
    init = open("init80", "rb").read()
# (name, mode, data, (rdev major, minor)): /dev/console gives init its stdout.
entries = [("bin", 0o040755, b"", (0, 0)), ("proc", 0o040755, b"", (0, 0)),
           ("dev", 0o040755, b"", (0, 0)), ("dev/console", 0o020600, b"", (5, 1)),
           ("bin/busybox", 0o100755, open(busybox, "rb").read(), (0, 0)),
           ("bin/sh", 0o120777, b"busybox", (0, 0)), ("init", 0o100755, init, (0, 0))]
out = bytearray()
def add(name, mode, data, ino, rdev=(0, 0)):
    nb = name.encode() + b"\0"
    hdr = "070701" + "".join("%08x" % v for v in (ino, mode, 0, 0, 1, int(time.time()), len(data), 0, 0, rdev[0], rdev[1], len(nb), 0))
    out.extend(hdr.encode()); out.extend(nb)
    out.extend(b"\0" * ((4 - len(out) % 4) % 4)); out.extend(data)
    out.extend(b"\0" * ((4 - len(out) % 4) % 4))
for i, (n, m, d, r) in enumerate(entries):
    add(n, m, d, i + 1, r)
add("TRAILER!!!", 0, b"", 0)
with gzip.open(dst, "wb") as f:
    f.write(out)
print("initramfs:", dst, len(out), "bytes before gzip")
PY
done
