#!/usr/bin/env python3
"""Independent client for hvprobe's gRPC API: discovers the service by server
reflection only (no .proto files), creates probes from kprobe_events lines on
test-guest functions, checks the streamed events against the guest's
contract, then lists, disables and deletes.

usage: grpc_client.py TARGET EXPECTED_JSON
  TARGET         e.g. unix:/run/hvprobe.sock or 127.0.0.1:50051
  EXPECTED_JSON  {"open_paths": [...], "at_fdcwd": -100, "fib": [fib(0), ...]}
"""
import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

SERVICE = "hvprobe.v1.HvProbe"


class Client:
    def __init__(self, target):
        # gRPC-core puts the socket path into :authority for unix: targets,
        # which is not a valid authority for HTTP/2 servers; name a host.
        self.channel = grpc.insecure_channel(
            target, options=[("grpc.default_authority", "localhost")]
        )
        db = ProtoReflectionDescriptorDatabase(self.channel)
        names = db.get_services()
        assert SERVICE in names, f"{SERVICE} not in reflected services {names}"
        assert "grpc.health.v1.Health" in names, names
        self.pool = descriptor_pool.DescriptorPool(db)

    def _method(self, service, name, streaming=False):
        m = self.pool.FindServiceByName(service).FindMethodByName(name)
        req = message_factory.GetMessageClass(m.input_type)
        resp = message_factory.GetMessageClass(m.output_type)
        make = self.channel.unary_stream if streaming else self.channel.unary_unary
        call = make(
            f"/{service}/{name}",
            request_serializer=req.SerializeToString,
            response_deserializer=resp.FromString,
        )
        return req, call

    def call(self, name, body=None, service=SERVICE):
        req, call = self._method(service, name)
        return json_format.MessageToDict(
            call(json_format.ParseDict(body or {}, req()), timeout=60),
            preserving_proto_field_name=True,
        )

    def stream(self, name, body):
        req, call = self._method(SERVICE, name, streaming=True)
        return call(json_format.ParseDict(body, req()), timeout=120)


def enum_name(msg, field, number):
    return msg.DESCRIPTOR.fields_by_name[field].enum_type.values_by_number[number].name


def unpack(schemas, b):
    """Events of a PackedEventBatch, read by the layout the .proto documents
    (reflected comments), not by hvprobe's own decoder."""
    vi = si = slot = ri = 0
    faulted = dict(zip(b.faulted, b.fault_address))
    unavailable, truncated = set(b.unavailable), set(b.truncated)
    for i, probe in enumerate(b.probe_id):
        s = schemas[probe]
        ev = {"event": s.event, "seq": b.seq[i], "pid": b.pid[i],
              "comm": b.comms[b.comm[i]], "fields": {}}
        if enum_name(s, "kind", s.kind) == "PROBE_KIND_KRETPROBE":
            ev["retval"] = b.retval[ri]
            ri += 1
        for f in s.fields:
            kind = enum_name(f, "kind", f.kind)
            vals = []
            for _ in range(f.count):
                if kind == "PACKED_KIND_STRING":
                    v = (bytes(b.strings[si]), slot in truncated)
                    si += 1
                elif kind == "PACKED_KIND_SYMBOL":
                    v = (b.values[vi], bytes(b.strings[si]))
                    vi += 1
                    si += 1
                else:
                    v = b.values[vi]
                    vi += 1
                    if kind == "PACKED_KIND_SIGNED" and v >= 1 << 63:
                        v -= 1 << 64
                if slot in faulted:
                    v = ("fault", faulted[slot])
                elif slot in unavailable:
                    v = None
                slot += 1
                vals.append(v)
            ev["fields"][f.name] = vals if f.type.endswith("]") else vals[0]
        yield ev
    assert (vi, si, ri) == (len(b.values), len(b.strings), len(b.retval)), "columns left over"


def expect_error(client, name, body, code, *needles):
    try:
        client.call(name, body)
    except grpc.RpcError as e:
        assert e.code() == code, f"{name}: got {e.code()} {e.details()}, want {code}"
        for n in needles:
            assert n in e.details(), f"{name}: {n!r} not in {e.details()!r}"
        return e.details()
    raise AssertionError(f"{name} {body} succeeded; wanted {code}")


def main():
    target, expected = sys.argv[1], json.loads(sys.argv[2])
    c = Client(target)
    health = c.call("Check", {"service": SERVICE}, service="grpc.health.v1.Health")
    assert health.get("status") == "SERVING", health

    info = c.call("GetGuestInfo")
    assert info["state"] == "GUEST_STATE_RUNNING", info
    assert info["kernel_banner"].startswith("Linux version"), info

    res = c.call("ResolveSymbol", {"symbol": "hv_open_file+0x4"})
    back = c.call("ResolveSymbol", {"address": res["address"]})
    assert back["symbol"] == "hv_open_file" and int(back["offset"]) == 4, back

    # Errors carry the kernel's code and the character position.
    msg = expect_error(
        c, "CreateProbe",
        {"definition": {"kprobe_events": "p:py/bad hv_open_file x=%rsi"}},
        grpc.StatusCode.INVALID_ARGUMENT, "BAD_REG_NAME", "position 24",
    )
    print("invalid definition:", msg)
    expect_error(
        c, "CreateProbe",
        {"definition": {"kprobe_events": "p:py/ret hv_open_file x=$retval"}},
        grpc.StatusCode.FAILED_PRECONDITION, "RETVAL_ON_PROBE",
    )

    created = c.call("CreateProbes", {"definitions": [
        {"kprobe_events": "p:py/open hv_open_file dfd=%di:s32 path=+0(%si):string"},
        {"kprobe_events": "r64:py/fib hv_fib n=$arg1:s32 ret=$retval:s64"},
    ]})["probes"]
    ids = {p["event"]: p["id"] for p in created}
    assert set(ids) == {"open", "fib"}, created

    opens, fibs = [], []
    stream = c.stream("Subscribe", {"groups": ["py"]})
    first = True
    for msg in stream:
        if first:
            assert "started" in msg.ListFields()[0][0].name, msg
            first = False
            continue
        if msg.HasField("events"):
            for ev in msg.events.events:
                args = {a.name: a for a in ev.args}
                if ev.event == "open":
                    opens.append((args["dfd"].value.signed.value, args["path"].value.string.text))
                elif ev.event == "fib":
                    n = ev.ret.entry_args[0].value.signed.value
                    fibs.append((n, args["ret"].value.signed.value, ev.ret.retval))
        if len(opens) >= 20 and len(fibs) >= 50:
            stream.cancel()
            break
    for dfd, path in opens:
        assert dfd == expected["at_fdcwd"], (dfd, path)
        assert path in expected["open_paths"], path
    assert len({p for _, p in opens}) > 1, opens
    for n, ret, raw in fibs:
        assert ret == expected["fib"][n] and raw == ret, (n, ret, raw)
    print(f"events: {len(opens)} opens, {len(fibs)} fib returns checked")

    # The same probes through a packed stream: schemas first, then columns.
    schemas, popens, pfibs = {}, [], []
    stream = c.stream("Subscribe", {"groups": ["py"], "encoding": "EVENT_ENCODING_PACKED"})
    for msg in stream:
        kind = msg.WhichOneof("payload")
        if kind == "schema":
            schemas[msg.schema.probe_id] = msg.schema
        elif kind == "packed":
            for ev in unpack(schemas, msg.packed):
                f = ev["fields"]
                assert ev["pid"] == -1 and ev["comm"] == "", ev  # no task_struct here
                if ev["event"] == "open":
                    path, cut = f["path"]
                    assert not cut, ev
                    popens.append((f["dfd"], path.decode()))
                elif ev["event"] == "fib":
                    pfibs.append((f["n"], f["ret"], ev["retval"]))
        if len(popens) >= 20 and len(pfibs) >= 50:
            stream.cancel()
            break
    names = {s.event: [(f.name, f.type, f.at_entry) for f in s.fields] for s in schemas.values()}
    assert names == {
        "open": [("dfd", "s32", False), ("path", "string", False)],
        "fib": [("n", "s32", True), ("ret", "s64", False)],
    }, names
    for dfd, path in popens:
        assert dfd == expected["at_fdcwd"] and path in expected["open_paths"], (dfd, path)
    for n, ret, raw in pfibs:
        assert ret == expected["fib"][n] and raw == ret, (n, ret, raw)
    print(f"packed events: {len(popens)} opens, {len(pfibs)} fib returns checked")

    listed = c.call("ListProbes", {"groups": ["py"]})["probes"]
    by_event = {p["event"]: p for p in listed}
    assert int(by_event["open"]["hits"]) >= 20, by_event
    assert by_event["fib"]["kind"] == "PROBE_KIND_KRETPROBE", by_event
    assert by_event["open"]["arg_names"] == ["dfd", "path"], by_event

    off = c.call("DisableProbe", {"probe": {"name": "py/open"}})["probe"]
    assert not off.get("enabled", False), off
    hits = int(off["hits"])
    again = c.call("GetProbe", {"probe": {"id": ids["open"]}})["probe"]
    assert not again.get("enabled", False)

    c.call("DeleteProbe", {"probe": {"id": ids["open"]}})
    expect_error(c, "GetProbe", {"probe": {"id": ids["open"]}}, grpc.StatusCode.NOT_FOUND)
    c.call("DeleteProbes", {"all": True})
    left = c.call("ListProbes").get("probes", [])
    assert left == [], left
    print(f"ok: disabled at {hits} hits, deleted all")


if __name__ == "__main__":
    main()
