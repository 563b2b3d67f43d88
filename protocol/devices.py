"""Device state sections (FULL sections after the RAM): how each one is
encoded on the wire and described in the vmdesc trailer.

Each device has an encoder (state -> payload bytes) and a loader (reader,
instance, version -> state). Which devices a guest has is its machine
profile's business (machine/profile.py); this module only knows bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import msgpack

from livemig.protocol import savevm

VCPU_SECTION = "livemig/vcpu"
MAX_VCPU_STATE = 1 << 16
# A livemig source announces that it will confirm the switchover: after the
# destination's SHUT(0) it sends these bytes, and only then does the guest run.
SWITCHOVER_SECTION = "livemig/switchover"
SWITCHOVER_GO = b"LMGO"
# With the x-digest capability the source sends a digest of every RAM block's
# final content; the destination compares before it lets the guest run.
DIGEST_SECTION = "livemig/digest"
DIGEST_SIZE = 32


@dataclass(frozen=True)
class Device:
    idstr: str
    version: int
    encode: Callable[[object], bytes]
    load: Callable[[savevm.BufferedReader, int], object]  # (reader, version) -> state
    fields: Callable[[bytes], list[dict]]  # vmdesc fields for a payload


def _encode_vcpu(regs: object) -> bytes:
    blob = msgpack.packb(regs)
    return struct.pack(">I", len(blob)) + blob


def _load_vcpu(r: savevm.BufferedReader, version: int) -> dict:
    if version != 1:
        raise savevm.StreamError(f"{VCPU_SECTION} version {version} unsupported")
    n = r.be32()
    if n > MAX_VCPU_STATE:
        raise savevm.StreamError(f"vCPU state of {n} bytes is too large")
    try:
        regs = msgpack.unpackb(bytes(r.take(n)), raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise savevm.StreamError(f"vCPU state is not readable: {exc}") from None
    if not isinstance(regs, dict):
        raise savevm.StreamError("vCPU state is not a map")
    return regs


def _encode_digest(digests: object) -> bytes:
    assert isinstance(digests, dict)
    out = [struct.pack(">I", len(digests))]
    for name, digest in digests.items():
        out.append(bytes([len(name.encode())]) + name.encode() + digest)
    return b"".join(out)


def _load_digest(r: savevm.BufferedReader, version: int) -> dict:
    if version != 1:
        raise savevm.StreamError(f"{DIGEST_SECTION} version {version} unsupported")
    count = r.be32()
    if count > 256:
        raise savevm.StreamError(f"digest section lists {count} RAM blocks")
    return {r.idstr(): bytes(r.take(DIGEST_SIZE)) for _ in range(count)}


def _load_globalstate(r: savevm.BufferedReader, version: int) -> str:
    return savevm.read_globalstate(r, version)


# QEMU's "timer" section (version 2): the offsets of the guest's tick and
# clock counters. A livemig guest has no clocks of its own; it carries what
# it last received so that QEMU -> livemig -> QEMU gives QEMU its state back.
TIMER_VERSION = 2
TIMER_FIELDS = [{"name": "cpu_ticks_offset", "type": "int64", "size": 8},
                {"name": "unused", "type": "unused_buffer", "size": 8},
                {"name": "cpu_clock_offset", "type": "int64", "size": 8}]
_timer = struct.Struct(">q8xq")


def _encode_timer(state: object) -> bytes:
    st = state if isinstance(state, dict) else {}
    return _timer.pack(int(st.get("cpu_ticks_offset", 0)), int(st.get("cpu_clock_offset", 0)))


def _load_timer(r: savevm.BufferedReader, version: int) -> dict:
    if version not in (1, TIMER_VERSION):
        raise savevm.StreamError(f"timer version {version} unsupported (need 1 or {TIMER_VERSION})")
    ticks = struct.unpack(">q", r.take(8))[0]
    r.take(8)  # unused since QEMU 1.x
    clock = struct.unpack(">q", r.take(8))[0] if version >= 2 else 0
    return {"cpu_ticks_offset": ticks, "cpu_clock_offset": clock}


DEVICES: dict[str, Device] = {
    VCPU_SECTION: Device(
        VCPU_SECTION, 1, _encode_vcpu, _load_vcpu,
        lambda p: [{"name": "length", "type": "uint32", "size": 4},
                   {"name": "registers", "type": "buffer", "size": len(p) - 4}]),
    SWITCHOVER_SECTION: Device(
        SWITCHOVER_SECTION, 1, lambda _s: struct.pack(">I", 0), lambda r, _v: r.be32(),
        lambda _p: [{"name": "flags", "type": "uint32", "size": 4}]),
    DIGEST_SECTION: Device(
        DIGEST_SECTION, 1, _encode_digest, _load_digest,
        lambda p: [{"name": "digests", "type": "buffer", "size": len(p)}]),
    "globalstate": Device(
        "globalstate", 1, lambda runstate: savevm.globalstate(str(runstate)), _load_globalstate,
        lambda _p: savevm.GLOBALSTATE_DESC["fields"]),
    "timer": Device("timer", TIMER_VERSION, _encode_timer, _load_timer, lambda _p: TIMER_FIELDS),
}


def device_loaders(names: list[str], vcpus: int,
                   states: dict[str, dict[int, object]]) -> dict[str, savevm.DeviceLoader]:
    """FULL-section loaders for the devices `names` of a guest with `vcpus`
    vCPUs, each keeping its state in states[idstr][instance]: one instance
    per vCPU, instance 0 of every other device, so that what is kept is
    bounded by the guest, not by the stream (StreamLoader takes each once)."""
    def loader(device: Device) -> savevm.DeviceLoader:
        limit = vcpus if device.idstr == VCPU_SECTION else 1

        def load(r: savevm.BufferedReader, instance: int, version: int) -> None:
            if instance >= limit:
                if device.idstr == VCPU_SECTION:
                    raise savevm.StreamError(f"vCPU {instance} in the stream but this guest has {vcpus} vCPUs")
                raise savevm.StreamError(f"section {device.idstr!r} instance {instance}: this guest has only "
                                         "instance 0")
            states.setdefault(device.idstr, {})[instance] = device.load(r, version)
        return load
    return {name: loader(DEVICES[name]) for name in names}


def full_section(section_id: int, device: Device, instance: int, payload: bytes) -> list[bytes]:
    return [savevm.section_start(savevm.SECTION_FULL, section_id, device.idstr, instance, device.version),
            payload, savevm.footer(section_id)]


def describe(device: Device, instance: int, payload: bytes) -> dict:
    return {"name": device.idstr, "instance_id": instance, "vmsd_name": device.idstr,
            "version": device.version, "fields": device.fields(payload)}
