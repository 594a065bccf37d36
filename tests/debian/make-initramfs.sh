#!/usr/bin/env bash
# Build a tiny initramfs from Debian's busybox-static: /init mounts /proc,
# /sys and tracefs, prints HVPROBE-INIT-REACHED and HVPROBE-WORKLOAD-START,
# runs a workload (cat /etc/hostname, ls /proc/self/, sleep 1, and hvopen: a
# static C program that opens /etc/hostname N times and prints N and its
# pid), prints HVPROBE-WORKLOAD-DONE and powers the VM off. Its output goes
# to /dev/kmsg, which reaches the console whatever the tty does (before the
# VMM's DSDT described COM1, user writes to the tty failed with EIO).
# Output: artifacts/debian/initramfs.cpio.gz (nothing is committed).
#
# Also initramfs-console.cpio (not compressed), whose /init prints HVPROBE-CONSOLE-READY
# and then runs whatever lines arrive on the console (`read cmd; eval
# "$cmd"`), each followed by HVPROBE-CMD-DONE rc=N: the state
# tests/debian/snapshot.sh snapshots and caches, so later runs restore it and
# tell it what to run next. It also holds /bin/hvopen, /bin/hvsleep (static
# C programs below: they print what they did, so a test can reconcile every
# event with it) and /lib/binfmt_misc.ko from the same kernel package, for
# the module-probe tests.
#
# Also initramfs-int80.cpio.gz, whose /init is a few instructions of
# assembly that write, mount /proc and power off through `int $0x80` only
# (on the project's nested KVM that needs the VMM's system-call bridge too:
# see README).
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
# The workload's own programs (static, glibc). hvopen keeps every fd open
# and prints them, so a probe's return values can be checked one by one;
# `hvopen N PATH wait` prints its pid first and opens once a line arrives on
# stdin (a test can then filter by that pid before the opens).
cat > hvopen.c <<'C'
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv)
{
	int n = argc > 1 ? atoi(argv[1]) : 10, ok = 0;
	const char *path = argc > 2 ? argv[2] : "/etc/hostname";
	int *fds = calloc(n > 0 ? n : 1, sizeof(int));
	if (argc > 3 && strcmp(argv[3], "wait") == 0) {
		/* Say who we are, then open only once a line arrives. */
		char line[64];
		printf("HVPROBE-HVOPEN-READY pid=%d\n", (int)getpid());
		fflush(stdout);
		if (!fgets(line, sizeof(line), stdin))
			return 2;
	}
	for (int i = 0; i < n; i++) {
		fds[i] = open(path, O_RDONLY);
		if (fds[i] >= 0)
			ok++;
	}
	printf("HVPROBE-HVOPEN n=%d opened=%d pid=%d path=%s fds=", n, ok, (int)getpid(), path);
	for (int i = 0; i < n; i++)
		printf("%s%d", i ? "," : "", fds[i]);
	printf("\n");
	return ok == n ? 0 : 1;
}
C
gcc -static -O2 -s -o hvopen hvopen.c
# hvsleep MS COUNT [migrate]: COUNT nanosleeps of MS ms each, printing its pid,
# the call's index, its length and the CPU before each; with "migrate" it pins
# itself to CPU i % ncpus first, so consecutive sleeps start on different CPUs.
cat > hvsleep.c <<'C'
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv)
{
	long ms = argc > 1 ? atol(argv[1]) : 100;
	int count = argc > 2 ? atoi(argv[2]) : 1;
	int migrate = argc > 3 && strcmp(argv[3], "migrate") == 0;
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	for (int i = 0; i < count; i++) {
		if (migrate && ncpu > 1) {
			cpu_set_t set;
			CPU_ZERO(&set);
			CPU_SET(i % ncpu, &set);
			sched_setaffinity(0, sizeof(set), &set);
		}
		printf("HVPROBE-SLEEP pid=%d i=%d ms=%ld cpu=%d\n", (int)getpid(), i, ms, sched_getcpu());
		fflush(stdout);
		struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
		nanosleep(&ts, NULL);
	}
	printf("HVPROBE-SLEEP-DONE pid=%d n=%d cpu=%d\n", (int)getpid(), count, sched_getcpu());
	return 0;
}
C
gcc -static -O2 -s -o hvsleep hvsleep.c
# A module from the same Debian kernel package (no dependencies; its
# load_misc_binary runs on every exec once it is loaded).
# fetch-kernel.sh extracts it with vmlinuz.
[ -s "$out/binfmt_misc.ko" ] || bash "$here/fetch-kernel.sh" >&2
cp "$out/binfmt_misc.ko" binfmt_misc.ko
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
for variant in busybox int80 console; do
suffix=""; [ "$variant" = busybox ] || suffix="-$variant"
# The console variant is not compressed: the kernel inflates a gzip'd
# initramfs at emulation speed (~650 s for its 1.7 MB on 2 vCPUs here).
ext=cpio.gz; [ "$variant" = console ] && ext=cpio
python3 - "$out/initramfs$suffix.$ext" busybox "$variant" <<'PY'
import gzip, os, sys, time
dst, busybox, variant = sys.argv[1], sys.argv[2], sys.argv[3]
init = b"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t tracefs tracefs /sys/kernel/tracing
exec >/dev/kmsg 2>&1
/bin/busybox echo "HVPROBE-INIT-REACHED"
/bin/busybox echo "HVPROBE-WORKLOAD-START pid=$$"
/bin/busybox cat /etc/hostname
/bin/busybox ls /proc/self/
/bin/busybox sleep 1
/bin/hvopen 20 /etc/hostname
/bin/busybox echo "HVPROBE-WORKLOAD-DONE rc=$?"
/bin/busybox poweroff -f
"""
if variant == "int80":
    init = open("init80", "rb").read()
if variant == "console":
    # Messages go to the console and to /dev/kmsg (the kernel log reaches the
    # console even where the tty cannot: see DESIGN.md).
    init = b"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t tracefs tracefs /sys/kernel/tracing
/bin/busybox --install -s /bin
export PATH=/bin
say() { echo "$*"; echo "$*" > /dev/kmsg; }
say "HVPROBE-INIT-REACHED"
while :; do
  say "HVPROBE-CONSOLE-READY"
  if ! read -r cmd; then sleep 1; continue; fi
  eval "$cmd"
  say "HVPROBE-CMD-DONE rc=$?"
done
"""
# (name, mode, data, (rdev major, minor)): /dev/console gives init its stdout.
entries = [("bin", 0o040755, b"", (0, 0)), ("proc", 0o040755, b"", (0, 0)),
           ("dev", 0o040755, b"", (0, 0)), ("dev/console", 0o020600, b"", (5, 1)),
           ("bin/busybox", 0o100755, open(busybox, "rb").read(), (0, 0)),
           ("bin/sh", 0o120777, b"busybox", (0, 0)), ("init", 0o100755, init, (0, 0)),
           ("dev/kmsg", 0o020644, b"", (1, 11)), ("sys", 0o040755, b"", (0, 0)),
           ("etc", 0o040755, b"", (0, 0)), ("etc/hostname", 0o100644, b"hvprobe-guest\n", (0, 0))]
if variant in ("busybox", "console"):
    entries.append(("bin/hvopen", 0o100755, open("hvopen", "rb").read(), (0, 0)))
if variant == "console":
    entries.append(("bin/hvsleep", 0o100755, open("hvsleep", "rb").read(), (0, 0)))
    entries.append(("lib", 0o040755, b"", (0, 0)))
    entries.append(("lib/binfmt_misc.ko", 0o100644, open("binfmt_misc.ko", "rb").read(), (0, 0)))
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
if dst.endswith(".gz"):
    with gzip.open(dst, "wb") as f:
        f.write(out)
else:
    with open(dst, "wb") as f:
        f.write(out)
print("initramfs:", dst, len(out), "bytes uncompressed")
PY
done
