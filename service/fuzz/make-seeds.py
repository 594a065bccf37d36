#!/usr/bin/env python3
"""Seeds for the `rpc` target (written to seeds/rpc/, committed): call
sequences in its `[op u8][len u16 LE][message]` format with hand-encoded
hvprobe.v1 requests on the test guest's functions.  usage: make-seeds.py"""
import os, struct

here = os.path.dirname(os.path.abspath(__file__))
out = os.path.join(here, "seeds", "rpc")
os.makedirs(out, exist_ok=True)

def varint(n):
    b = b""
    while True:
        c = n & 0x7F
        n >>= 7
        if n:
            b += bytes([c | 0x80])
        else:
            return b + bytes([c])
def f_bytes(num, data):
    data = data.encode() if isinstance(data, str) else data
    return varint(num << 3 | 2) + varint(len(data)) + data
def f_int(num, n):
    return varint(num << 3) + varint(n)

OPS = dict(create=0, creates=1, delete=2, deletes=3, enable=4, disable=5, arm=6,
           disarm=7, list=8, get=9, resolve=10, info=11, subscribe=12, snapshot=13)
def call(op, msg=b""):
    return bytes([OPS[op]]) + struct.pack("<H", len(msg)) + msg

def line_def(line, filt="", disabled=False):
    d = f_bytes(2, line)
    if disabled:
        d += f_int(3, 1)
    if filt:
        d += f_bytes(4, filt)
    return d
def spec_def(event, symbol, offset=0, kind=1, args=()):
    loc = f_bytes(2, symbol) + (f_int(3, offset) if offset else b"")
    s = f_bytes(2, event) + f_int(3, kind) + f_bytes(4, loc)
    for name, expr, ty in args:
        s += f_bytes(7, f_bytes(1, name) + f_bytes(2, expr) + f_bytes(3, ty))
    return f_bytes(1, s)
ref_id = lambda i: f_bytes(1, f_int(1, i))
ref_name = lambda n: f_bytes(1, f_bytes(2, n))

seeds = {
    "create_get_delete": call("create", f_bytes(1, line_def("p:hv_add hv_add a=%di:s64 b=%si")))
        + call("get", ref_id(1)) + call("list") + call("delete", ref_id(1)),
    "retprobe_filter": call("create", f_bytes(1, line_def("r:ret/fib hv_fib $retval:u64", "retval > 3")))
        + call("disable", ref_name("ret/fib")) + call("enable", ref_name("ret/fib"))
        + call("subscribe", f_int(1, 1) + f_bytes(3, "retval == 5 && cpu < 2")),
    "batch": call("creates", f_bytes(1, line_def("p:a hv_fib")) + f_bytes(1, line_def("p:b hv_many_args x=+8(%sp):u32", disabled=True))
        + f_bytes(1, spec_def("c", "hv_checksum", args=[("len", "%si", "u64")])))
        + call("list", f_bytes(1, "kprobes")) + call("deletes", f_int(2, 1)),
    "spec_ret": call("create", f_bytes(1, spec_def("sret", "hv_recurse", kind=2))) + call("disarm") + call("arm")
        + call("deletes", ref_id(1) + ref_id(2)),
    "resolve": call("resolve", f_bytes(1, "hv_add+0x4")) + call("resolve", f_int(2, 0xffffffff81000010))
        + call("resolve", f_bytes(1, "vmlinux:hv_fib")) + call("info"),
    "address_probe": call("create", f_bytes(1, line_def("p:abs 0xffffffff81000000")))
        + call("subscribe", f_bytes(2, "kprobes") + f_int(4, 2)) + call("deletes", f_int(2, 1)),
    "snapshot": call("snapshot", f_bytes(1, "/tmp/never") + f_int(2, 1)) + call("info"),
    "named_args": call("create", f_bytes(1, line_def("p:hv_open_file hv_open_file dfd path=+0(%si):string"))),
}
for name, data in seeds.items():
    open(os.path.join(out, name), "wb").write(data)
