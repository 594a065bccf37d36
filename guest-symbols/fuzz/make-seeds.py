#!/usr/bin/env python3
"""Seed corpora for the fuzz targets (written to fuzz/corpus/, not committed):
real inputs so the fuzzers start past the first checks.
usage: make-seeds.py FIXTURE_ELF TEST_GUEST_ELF SYSTEM_MAP"""
import os, struct, subprocess, sys, tempfile

fixture, guest, sysmap = sys.argv[1:4]
here = os.path.dirname(os.path.abspath(__file__))
def put(target, name, data):
    d = os.path.join(here, "corpus", target)
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, name), "wb").write(data)

# system_map: the head of a real map and a kallsyms-style module line.
lines = open(sysmap, "rb").read().splitlines(keepends=True)[:200]
put("system_map", "map", b"".join(lines))
put("system_map", "kallsyms", b"ffffffffc0a01000 t ext4_foo\t[ext4]\n0000000000000000 T _text\n")

# elf: the two small gcc-built kernels.
put("elf", "fixture", open(fixture, "rb").read())
put("elf", "guest", open(guest, "rb").read())

# dwarf: sections of the fixture, length-prefixed, then a query word.
def section(elf, name):
    with tempfile.NamedTemporaryFile() as t:
        r = subprocess.run(["objcopy", "--dump-section", name + "=" + t.name, elf, "/dev/null"],
                           stderr=subprocess.DEVNULL)
        return open(t.name, "rb").read() if r.returncode == 0 else b""
blob = b""
for n in [".debug_info", ".debug_abbrev", ".debug_str", ".debug_aranges", ".debug_loclists"]:
    s = section(fixture, n)
    blob += struct.pack("<I", len(s)) + s
put("dwarf", "fixture", blob + b"outer")

# kallsyms: a pre-6.4 base-relative table in scripts/kallsyms.c's shape.
syms = [("T" if i % 3 == 0 else "t") + "sym_%d" % i for i in range(600)]
tokens = [bytes([c]) for c in range(256)]
tokens[0] = b"@"
names, markers = b"", []
for i, s in enumerate(syms):
    if i % 256 == 0:
        markers.append(len(names))
    names += bytes([len(s)]) + s.encode()
table, index = b"", b""
for t in tokens:
    index += struct.pack("<H", len(table))
    table += t + b"\0"
pad = lambda b: b + b"\0" * (-len(b) % 8)
base = 0xffffffff81000000
out = pad(b"".join(struct.pack("<i", -(i * 16) - 1) for i in range(len(syms))))
out += struct.pack("<Q", base) + pad(struct.pack("<I", len(syms))) + pad(names)
out += pad(b"".join(struct.pack("<I", m) for m in markers)) + pad(table) + index
put("kallsyms", "pre64", out)
