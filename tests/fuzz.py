"""Fuzzing of the two inputs a host takes from the outside: migration streams
and QMP. `scripts/fuzz` runs it at scale (python -m tests.fuzz); the test
suite runs a sample (tests/test_fuzz.py).

Stream cases are mutations of valid streams (bit flips, byte changes,
insertions, deletions, splices), every truncation of a small valid stream,
and random bytes; each must load or fail with StreamError, nothing else, and
memory must stay bounded. Multifd cases mutate a source's channels (init
packets, packet headers, payloads, packet order, the channel count and
order), through the channel code and against a live destination. QMP cases are random JSON commands (names and
argument types) and random or mutated bytes sent to a live monitor, which must
answer or close, and keep serving other clients."""

from __future__ import annotations

import argparse
import ctypes
import io
import itertools
import json
import os
import random
import re
import resource
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from livemig.protocol import devices, savevm, xbzrle
from livemig.protocol.multifd import (
    COMPRESSION_FLAGS,
    HEADER_SIZE,
    INIT_SIZE,
    PACKET_PAGES,
    PACKET_SIZE,
    RAMBLOCK_NAME,
    MultifdError,
    PacketReceiver,
    PacketSender,
    parse_init,
    read_exact,
)
from livemig.protocol.ram import (
    RAM_CONTINUE,
    RAM_MEM_SIZE,
    RAM_XBZRLE,
    PageEncoder,
    RamBlock,
    RamLoader,
    ram_eos,
    ram_mem_size,
)

PAGES = 16


def valid_stream(rng: random.Random) -> bytes:
    """A small stream as livemig writes it: RAM with normal and zero pages in
    two passes (the second opening with XBZRLE deltas against what the
    first sent), vCPU, switchover and globalstate sections, EOF, vmdesc."""
    ram = np.frombuffer(rng.randbytes(PAGES * 4096), np.uint8).reshape(PAGES, 4096).copy()
    ram[rng.randrange(PAGES)::3] = 0
    enc = PageEncoder(PAGES)
    out = [savevm.header(), savevm.configuration("pc"),
           savevm.section_start(savevm.SECTION_START, 2, "ram", 0, 4),
           ram_mem_size([("pc.ram", PAGES * 4096)]), ram_eos(), savevm.footer(2)]
    held = np.zeros_like(ram)  # what the destination has
    for kind in (savevm.SECTION_PART, savevm.SECTION_END):
        enc.new_section()
        idx = np.array(sorted(rng.sample(range(PAGES), rng.randrange(1, PAGES))))
        out.append(savevm.section_part(kind, 2))
        if kind == savevm.SECTION_END:
            out += xbzrle_records(rng, held)
        out += [bytes(b) for b in enc.encode("pc.ram", idx, ram, ~ram[idx].any(axis=1))]
        out += [ram_eos(), savevm.footer(2)]
        held[idx] = ram[idx]
    sid = 3
    for name, state in ((devices.VCPU_SECTION, {"step": rng.randrange(1 << 30)}),
                        (devices.SWITCHOVER_SECTION, None), ("globalstate", "running")):
        out += devices.full_section(sid, devices.DEVICES[name], 0, devices.DEVICES[name].encode(state))
        sid += 1
    out += [savevm.eof(), savevm.vmdescription({"page_size": 4096, "devices": []})]
    return b"".join(out)


def xbzrle_records(rng: random.Random, held: np.ndarray) -> list[bytes]:
    """XBZRLE records rewriting a few bytes of some pages the destination holds."""
    out = []
    for n, page in enumerate(sorted(rng.sample(range(PAGES), 3))):
        new = held[page].copy()
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(4096 - 64)
            new[at:at + rng.randrange(1, 64)] ^= rng.randrange(1, 256)
        delta = xbzrle.encode(held[page], new)
        if not delta:
            continue
        first = n == 0
        out.append(struct.pack(">Q", (page << 12) | RAM_XBZRLE | (0 if first else RAM_CONTINUE))
                   + (savevm.encode_idstr("pc.ram") if first else b"") + xbzrle.record_body(delta))
        held[page] = new
    return out


def load(data: bytes, chunks: Iterator[bytes] | None = None) -> bool:
    """True if the stream (`data`, or else `chunks`) loads; False if refused
    with StreamError. Anything else propagates: that is a bug."""
    pages = np.zeros((PAGES, 4096), np.uint8)
    pos = 0
    source = iter(chunks if chunks is not None else ())

    def read_into(buf: memoryview) -> int:
        nonlocal pos, data
        while pos == len(data):
            data, pos = next(source, None), 0
            if data is None:
                data = b""
                return 0
        n = min(len(buf), len(data) - pos)
        buf[:n] = data[pos:pos + n]
        pos += n
        return n

    # What the receiver keeps, kept the same way.
    loaders = devices.device_loaders([devices.VCPU_SECTION, devices.SWITCHOVER_SECTION, devices.DIGEST_SECTION,
                                      "globalstate"], 1, {})
    loader = savevm.StreamLoader(RamLoader([RamBlock("pc.ram", pages)]), loaders, machine="pc")
    try:
        # A flood gets the receiver's own buffer; mutations a smaller one, for speed.
        loader.load(savevm.BufferedReader(read_into, capacity=1 << 20 if chunks is None else 8 << 20))
    except savevm.StreamError:
        return False
    return True


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        kind = rng.randrange(6)
        at = rng.randrange(len(buf)) if buf else 0
        if kind == 0 and buf:
            buf[at] ^= 1 << rng.randrange(8)
        elif kind == 1 and buf:
            buf[at] = rng.randrange(256)
        elif kind == 2:
            buf[at:at] = rng.randbytes(rng.randrange(1, 16))
        elif kind == 3 and buf:
            del buf[at:at + rng.randrange(1, 64)]
        elif kind == 4 and buf:
            # an interesting value in a length or header field
            buf[at:at + 4] = struct.pack(">I", rng.choice([0, 1, 0x7F, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]))
        else:
            other = valid_stream(rng)
            cut = rng.randrange(len(other))
            buf = buf[:at] + other[cut:cut + rng.randrange(1, 4096)]
    return bytes(buf)


# Floods ---------------------------------------------------------------------------------------
# Streams whose counts and lengths are each within the format but add up to
# far more than a guest can hold: what used to grow a destination's memory
# with its input. Each yields its bytes in chunks, so that the sender holds
# little of it; `head` is a stream's header and configuration section.

CHUNK = 1 << 20


def _chunks(head: bytes, record: Callable[[int], bytes], n: int, tail: bytes = b"") -> Iterator[bytes]:
    yield head
    buf = bytearray()
    for i in range(n):
        buf += record(i)
        if len(buf) >= CHUNK:
            yield bytes(buf)
            buf.clear()
    yield bytes(buf) + tail


def mem_size_flood(head: bytes, block: str, size: int, n: int = 4_000_000) -> Iterator[bytes]:
    """A MEM_SIZE record that lists the same RAM block n times."""
    entry = savevm.encode_idstr(block) + struct.pack(">Q", size)
    start = savevm.section_start(savevm.SECTION_START, 2, "ram", 0, 4) + struct.pack(">Q", (n * size) | RAM_MEM_SIZE)
    return _chunks(head + start, lambda _i: entry, n)


def section_flood(head: bytes, n: int = 1_000_000, instances: bool = False) -> Iterator[bytes]:
    """n switchover sections: all instance 0, or each its own instance."""
    dev = devices.DEVICES[devices.SWITCHOVER_SECTION]
    payload = dev.encode(None)
    return _chunks(head, lambda i: b"".join(devices.full_section(i + 3, dev, i if instances else 0, payload)), n)


def digest_flood(head: bytes, n: int = 4000, blocks: int = 256) -> Iterator[bytes]:
    """n digest sections (each its own instance), each naming `blocks` RAM blocks."""
    dev = devices.DEVICES[devices.DIGEST_SECTION]
    payload = dev.encode({f"flood.block.{k:04d}.{'x' * 40}": bytes(devices.DIGEST_SIZE) for k in range(blocks)})
    return _chunks(head, lambda i: b"".join(devices.full_section(i + 3, dev, i, payload)), n)


def live_flood(head: bytes, n: int = 1_000_000) -> Iterator[bytes]:
    """n RAM sections started (each under a new id), none ended."""
    return _chunks(head, lambda i: savevm.section_start(savevm.SECTION_START, i + 2, "ram", 0, 4)
                   + ram_eos() + savevm.footer(i + 2), n)


def capability_flood(machine: str, n: int = 4_000_000) -> Iterator[bytes]:
    """A configuration section whose capability list has n entries."""
    sub = (bytes([savevm.SUBSECTION]) + savevm.encode_idstr(savevm.CONFIG_CAPABILITIES)
           + struct.pack(">II", 1, n))
    return _chunks(savevm.header() + savevm.configuration(machine) + sub,
                   lambda i: savevm.encode_idstr(f"{i % 4096:03x}"), n)


def vmdesc_flood(body: bytes, size: int = 6 << 20) -> Iterator[bytes]:
    """A stream up to its EOF (`body`), then a vmdesc of `size` bytes of
    empty objects (each costs the decoder about 20 times its text)."""
    text = b"[" + b"{}," * ((size - 4) // 3) + b"{}]"
    yield body + bytes([savevm.VMDESCRIPTION]) + struct.pack(">I", len(text))
    yield from (text[i:i + CHUNK] for i in range(0, len(text), CHUNK))


def floods(head: bytes, body: bytes, machine: str, block: str, size: int) -> dict[str, Callable[[], Iterator[bytes]]]:
    """Every flood, by name, for a destination with the RAM block `block` of `size` bytes."""
    return {"mem-size": lambda: mem_size_flood(head, block, size),
            "sections": lambda: section_flood(head),
            "instances": lambda: section_flood(head, instances=True),
            "digests": lambda: digest_flood(head),
            "live-sections": lambda: live_flood(head),
            "capabilities": lambda: capability_flood(machine),
            "vmdesc": lambda: vmdesc_flood(body)}


def stream_head(stream: bytes) -> bytes:
    """The header and configuration section of a stream."""
    r = savevm.BufferedReader(io.BytesIO(stream).readinto, 1 << 16)
    r.be32(), r.be32()
    if r.u8() != savevm.CONFIGURATION:
        raise ValueError("the stream has no configuration section")
    savevm.read_configuration(r)
    return stream[:r.consumed]


def peak_growth(pid: int | str = "self") -> Callable[[], int]:
    """Resets the peak resident size of process `pid` (clear_refs 5); the
    function returned gives how far the peak rose above the size at reset."""
    def status(key: str) -> int:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith(key))
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
    start = status("VmRSS:")
    return lambda: status("VmHWM:") - start


def fuzz_floods(limit: int = 64 << 20) -> dict:
    """Each flood against the loader: refused, and the peak of this process's
    memory rises by less than `limit` (the input is generated, not held).
    Returns the rise in MiB per flood."""
    base = valid_stream(random.Random(0))
    head = stream_head(base)
    body = base[:base.rindex(savevm.vmdescription({"page_size": 4096, "devices": []}))]
    out = {}
    for name, flood in floods(head, body, "pc", "pc.ram", PAGES * 4096).items():
        growth = peak_growth()
        loaded = load(b"", flood())
        assert not loaded, f"flood {name} loaded"
        assert growth() < limit, f"flood {name}: memory rose by {growth() >> 20} MiB"
        out[name] = round(growth() / (1 << 20), 1)
    return out


def finished(counts: dict, start: float, rss0: int, limit_kib: int) -> dict:
    """A fuzz run's closing figures: its seconds and how far its peak memory
    grew, which must stay under `limit_kib`."""
    counts["seconds"] = round(time.monotonic() - start, 1)
    counts["maxrss_growth_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    assert counts["maxrss_growth_kib"] < limit_kib, counts
    return counts


def fuzz_streams(cases: int, seconds: float, seed: int = 0, report=print) -> dict:
    rng = random.Random(seed)
    base = valid_stream(rng)
    assert load(base), "the valid stream does not load"
    start = time.monotonic()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    counts = {"cases": 0, "loaded": 0, "refused": 0}
    truncations = list(range(len(base)))[:: max(1, len(base) // 2000)]
    while counts["cases"] < cases and time.monotonic() - start < seconds:
        n = counts["cases"]
        if n < len(truncations):
            data = base[:truncations[n]]
        elif n % 10 == 0:
            data = savevm.header() + rng.randbytes(rng.randrange(1, 2048))
        elif n % 10 == 1:
            data = rng.randbytes(rng.randrange(0, 512))
        else:
            data = mutate(rng, base if n % 7 else valid_stream(rng))
        loaded = load(data)
        if loaded and n < len(truncations):
            raise AssertionError(f"a stream truncated at {truncations[n]} of {len(base)} bytes loaded")
        counts["loaded" if loaded else "refused"] += 1
        counts["cases"] += 1
        if counts["cases"] % 20000 == 0:
            report(f"streams: {counts}")
    return finished(counts, start, rss0, 256 << 10)


# Multifd ----------------------------------------------------------------------------------------
# A `none` guest as a multifd source sends it: the pages of `on_channels` in
# packets over the channels, the others (zero) on the main channel, one SYNC
# per channel before each of the stream's three RAM ends of section. Cases
# mutate the channels' init packets, packet headers field by field, payloads,
# the packets' order and number, how many channels connect, and the main
# stream; each must end with a refusal or completion.

MULTIFD_RAM = 64 << 20  # the destination's guest
MULTIFD_STRIDE = 64  # every 64th page on a channel: 256 pages, 1 MiB of packets
U32_VALUES = [0, 1, 0x7F, 0x80, 0x81, 0xFF, 0x1000, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]
U64_VALUES = [0, 1, 4095, 4096, MULTIFD_RAM - 4096, MULTIFD_RAM, 1 << 63, (1 << 64) - 1]
# (offset, size) of the fields of MultiFDInit_t and of a MultiFDPacket_t header
INIT_FIELDS = [(0, 4), (4, 4), (8, 16), (24, 1), (25, 7), (32, 8)]
HEADER_FIELDS = [(0, 4), (4, 4), (8, 4), (12, 4), (16, 4), (20, 4), (24, 8), (32, 8), (64, 256), ("offset", 8)]
MULTIFD_KINDS = ["init-field", "header-field", "header-field", "payload", "drop-packet", "dup-packet",
                 "move-packet", "same-id", "cut", "bytes", "random", "main", "fewer", "more", "main-last"]
LANE_KINDS = MULTIFD_KINDS[:11]  # what one channel's bytes show without a destination around them
# what only a destination shows: its accept order, channel count, the main stream's SYNC waits
HOST_KINDS = ["fewer", "main-last", "main", "cut", "drop-packet", "header-field"]
NO_PAGES = np.zeros(0, np.int64)


def multifd_ram(rng: random.Random, pages: int = MULTIFD_RAM // 4096,
                stride: int = MULTIFD_STRIDE) -> tuple[np.ndarray, np.ndarray]:
    """Guest RAM whose pages off the channels are zero, and the mask of those
    on them: random pages, and pages of 16 symbols that zlib and zstd
    entropy-code (random pages they store as they are, where a flipped bit
    only changes data)."""
    ram = np.zeros((pages, 4096), np.uint8)
    on_channels = np.arange(pages) % stride == 0
    data = np.frombuffer(rng.randbytes(int(on_channels.sum()) * 4096), np.uint8).reshape(-1, 4096).copy()
    data[1::2] &= 0x0F
    ram[on_channels] = data
    return ram, on_channels


def multifd_main(ram: np.ndarray, on_channels: np.ndarray) -> bytes:
    """The main stream: START with the block list, a PART with the zero pages, END, timer, globalstate."""
    zero = np.flatnonzero(~on_channels)
    main = [savevm.header(), savevm.configuration("none"),
            savevm.section_start(savevm.SECTION_START, 2, "ram", 0, 4), ram_mem_size([("ram", ram.size)]),
            ram_eos(), savevm.footer(2), savevm.section_part(savevm.SECTION_PART, 2),
            *[bytes(b) for b in PageEncoder(len(ram)).encode("ram", zero, ram, np.ones(len(zero), np.bool_))],
            ram_eos(), savevm.footer(2), savevm.section_part(savevm.SECTION_END, 2), ram_eos(), savevm.footer(2)]
    for sid, (name, state) in enumerate((("timer", None), ("globalstate", "running")), 3):
        main += devices.full_section(sid, devices.DEVICES[name], 0, devices.DEVICES[name].encode(state))
    main.append(savevm.eof())
    return b"".join(main)


class _Parts:
    """A channel that keeps each write (an iovec table joined) as one part."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes | memoryview) -> None:
        self.parts.append(bytes(data))

    def write_vectors(self, table: np.ndarray) -> int:
        self.parts.append(b"".join(ctypes.string_at(addr, n) for addr, n in table.tolist()))
        return len(self.parts[-1])

    def read_into(self, buf: memoryview) -> int:
        return 0


def multifd_lanes(ram: np.ndarray, on_channels: np.ndarray, channels: int, compression: str = "none",
                  per_packet: int = 100) -> list[list[bytes]]:
    """Each channel's parts, by the source's own PacketSender: its init
    packet, a bare SYNC, packets of `per_packet` of its pages (the last one
    flagged SYNC), a bare SYNC."""
    pages, numbers, out = np.flatnonzero(on_channels), itertools.count(), []
    for cid in range(channels):
        rec = _Parts()
        sender = PacketSender(rec, cid, compression)
        sender.send("ram", ram, NO_PAGES, next(numbers), sync=True)
        mine = pages[cid::channels]
        runs = [mine[i:i + per_packet] for i in range(0, len(mine), per_packet)] or [NO_PAGES]
        for k, run in enumerate(runs):
            sender.send("ram", ram, run, next(numbers), sync=k == len(runs) - 1)
        sender.send("ram", ram, NO_PAGES, next(numbers), sync=True)
        out.append(rec.parts)
    return out


@dataclass
class MultifdCase:
    kind: str
    main: bytes
    channels: list[bytes]  # what each connection after the main one sends, in order
    main_first: bool = True


def _field(rng: random.Random, size: int) -> bytes:
    """A value for a field of `size` bytes: an interesting one or random."""
    if size == RAMBLOCK_NAME:
        name = rng.choice([b"", b"ram", b"pc.ram", b"ram\0tail", b"x" * 255, rng.randbytes(rng.randrange(1, 32))])
        return name.ljust(size, b"\0")[:size]
    if size in (4, 8) and rng.random() < 0.8:
        value = rng.choice(U32_VALUES if size == 4 else U64_VALUES)
        return value.to_bytes(size, "big")
    return rng.randbytes(size)


def _set_field(rng: random.Random, part: bytes, fields: list) -> bytes:
    at, size = rng.choice(fields)
    if at == "offset":
        at = HEADER_SIZE + 8 * rng.randrange(PACKET_PAGES)
    return part[:at] + _field(rng, size) + part[at + size:]


def mutate_multifd(rng: random.Random, main: bytes, lanes: list[list[bytes]],
                   kinds: list[str] = MULTIFD_KINDS) -> MultifdCase:
    """One mutation of a valid multifd source (main stream and channel parts)."""
    lanes = [list(lane) for lane in lanes]
    kind = rng.choice(kinds)
    cid = rng.randrange(len(lanes))
    lane = lanes[cid]
    packet = rng.randrange(1, len(lane))
    main_first = True
    if kind == "init-field":
        lane[0] = _set_field(rng, lane[0], INIT_FIELDS)
    elif kind == "header-field":
        part = lane[packet]
        lane[packet] = _set_field(rng, part[:PACKET_SIZE], HEADER_FIELDS) + part[PACKET_SIZE:]
    elif kind == "payload":
        full = [k for k in range(1, len(lane)) if len(lane[k]) > PACKET_SIZE]
        k = rng.choice(full) if full else packet
        part = bytearray(lane[k])
        lo = PACKET_SIZE if len(part) > PACKET_SIZE else 0
        for _ in range(rng.randrange(1, 5)):
            part[rng.randrange(lo, len(part))] ^= 1 << rng.randrange(8)
        lane[k] = bytes(part)
    elif kind == "drop-packet":
        del lane[packet]
    elif kind == "dup-packet":
        lane.insert(packet, lane[packet])
    elif kind == "move-packet":
        other = lanes[rng.randrange(len(lanes))]
        other.insert(rng.randrange(1, len(other) + 1), lane.pop(packet))
    elif kind == "same-id":
        lanes[rng.randrange(len(lanes))][0] = lane[0]
    elif kind == "cut":
        joined = b"".join(lane)
        lanes[cid] = [joined[:rng.randrange(len(joined))]]
    elif kind == "bytes":
        lanes[cid] = [mutate(rng, b"".join(lane))]
    elif kind == "random":
        lanes[cid] = [rng.randbytes(rng.randrange(0, 4096))]
    elif kind == "main":
        main = mutate(rng, main)
    elif kind == "fewer":
        del lanes[cid]
    elif kind == "more":
        lanes.append(list(lane) if rng.random() < 0.5 else [rng.randbytes(rng.randrange(1, 2048))])
    elif kind == "main-last":
        main_first = False  # a channel is accepted first: the destination takes it for the main one
    return MultifdCase(kind, main, [b"".join(lane) for lane in lanes], main_first)


class _Bytes:
    """Bytes read as a channel (in uneven pieces, as a socket gives them)."""

    def __init__(self, data: bytes, rng: random.Random) -> None:
        self.data, self.pos, self.rng = data, 0, rng

    def read_into(self, buf: memoryview) -> int:
        n = min(len(buf), len(self.data) - self.pos, self.rng.choice([1 << 20, 65536, 4096, 1000]))
        buf[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


def load_lane(data: bytes, channels: int, compression: str, ram: np.ndarray, rng: random.Random) -> bool:
    """One channel's bytes through the destination's init check and packet
    receiver: True if it loads to a clean end, False if refused with
    MultifdError. Anything else propagates: that is a bug."""
    channel = _Bytes(data, rng)
    try:
        init = bytearray(INIT_SIZE)
        read_exact(channel, memoryview(init))
        parse_init(bytes(init), channels)
        receiver = PacketReceiver(channel, compression, {"ram": ram})
        while receiver.receive() is not None:
            pass
    except MultifdError:
        return False
    return True


def fuzz_multifd(cases: int, seconds: float, seed: int = 0, report=print) -> dict:
    """Mutated multifd channels through the destination's channel code, for
    1-3 channels and each compression; memory must stay bounded."""
    rng = random.Random(seed)
    ram, on_channels = multifd_ram(rng)
    dest = np.zeros_like(ram)
    combos = [(n, c) for n in (1, 2, 3) for c in COMPRESSION_FLAGS]
    valid = {combo: multifd_lanes(ram, on_channels, *combo) for combo in combos}
    for (n, method), lanes in valid.items():
        for lane in lanes:
            assert load_lane(b"".join(lane), n, method, dest, rng), f"a valid {method} channel is refused"
    assert np.array_equal(dest[on_channels], ram[on_channels]), "valid channels load other pages"
    start = time.monotonic()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    counts = {"cases": 0, "loaded": 0, "refused": 0}
    while counts["cases"] < cases and time.monotonic() - start < seconds:
        n, method = combos[counts["cases"] % len(combos)]
        case = mutate_multifd(rng, b"", valid[n, method], LANE_KINDS)
        loaded = [load_lane(data, n, method, dest, rng) for data in case.channels]
        counts["loaded" if all(loaded) else "refused"] += 1
        counts["cases"] += 1
        if counts["cases"] % 20000 == 0:
            report(f"multifd: {counts}")
    return finished(counts, start, rss0, 64 << 10)


BUG = re.compile(r"^incoming (stream|migration) failed: [A-Z]\w*: ")  # an exception nobody expected


def _send(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # refused and closed


def run_multifd_case(host, port: int, case: MultifdCase, limit: float) -> dict:
    """One case against a destination host listening with multifd: the
    connections in order, each sent in its own thread; the host's verdict."""
    host.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
    order = [case.main, *case.channels]
    if not case.main_first and case.channels:
        order[0], order[1] = order[1], order[0]
    socks, threads = [], []
    try:
        for data in order:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            except OSError:
                break  # a connection beyond the channels: the listener may be closed already
            socks.append(sock)
            threads.append(threading.Thread(target=_send, args=(sock, data), daemon=True))
            threads[-1].start()
        return host.wait_migration(limit)
    finally:
        for t in threads:
            t.join(10)
        for sock in socks:
            sock.close()


def fuzz_multifd_host(start: Callable[[], object], cases: int, seconds: float, seed: int = 0,
                      timeout_ms: int = 2000, kinds: list[str] = MULTIFD_KINDS, report=print) -> dict:
    """Mutated multifd sources against a live destination (`start()` makes
    one: a `none` guest of MULTIFD_RAM, -incoming defer). Every case must end,
    within the transport timeout and a margin, as failed with a one-line
    cause and no guest started, or completed (then a new destination); the
    receiver's peak memory must stay within the guest's size of its idle one.
    Last, the destination takes the valid source: completed, RAM equal."""
    from livemig.tools.bench.accounting import actor_pids
    from livemig.tools.launch import free_port

    rng = random.Random(seed)
    ram, on_channels = multifd_ram(rng)
    main = multifd_main(ram, on_channels)
    combos = [(n, c) for n in (1, 2, 3) for c in COMPRESSION_FLAGS]
    valid = {combo: multifd_lanes(ram, on_channels, *combo) for combo in combos}
    limit = 3 * timeout_ms / 1000 + 30
    counts: dict = {"cases": 0, "failed": 0, "completed": 0, "destinations": 0, "max_case_seconds": 0.0,
                    "peak_growth_mib": 0.0, "kinds": {}, "causes": {}}
    host, begin = None, time.monotonic()

    def run(case: MultifdCase, n: int, method: str) -> str:
        nonlocal host, port, peak
        if host is None:
            host, port = start(), free_port()
            counts["destinations"] += 1
            peak = peak_growth(actor_pids(host.proc.pid)["receiver"])
        host.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
        host.cmd("migrate-set-parameters", **{"multifd-channels": n, "multifd-compression": method,
                                              "x-transport-timeout": timeout_ms})
        t0 = time.monotonic()
        info = run_multifd_case(host, port, case, limit)
        counts["max_case_seconds"] = round(max(counts["max_case_seconds"], time.monotonic() - t0), 2)
        counts["peak_growth_mib"] = max(counts["peak_growth_mib"], round(peak() / 2**20, 1))
        status, desc = info["status"], info.get("error-desc", "")
        where = f"case {counts['cases']} ({case.kind}, {n} channels, {method})"
        assert status in ("failed", "completed"), f"{where}: {info}"
        if status == "failed":
            assert desc and "\n" not in desc and not BUG.match(desc), f"{where}: {desc!r}"
            assert host.cmd("query-status")["status"] == "inmigrate", f"{where}: a guest started"
            cause = re.sub(r"0x[0-9a-f]+|[0-9a-f-]{36}|\d+", "N", desc)[:70]
            counts["causes"][cause] = counts["causes"].get(cause, 0) + 1
        else:
            assert case.kind != "valid" or _dumped(host) == ram.tobytes(), f"{where}: the RAM differs"
            host.close()
            host = None
        return status

    port, peak = 0, lambda: 0
    try:
        while counts["cases"] < cases and time.monotonic() - begin < seconds:
            n, method = combos[counts["cases"] % len(combos)]
            case = mutate_multifd(rng, main, valid[n, method], kinds)
            status = run(case, n, method)
            counts[status] += 1
            kind = counts["kinds"].setdefault(case.kind, {"failed": 0, "completed": 0})
            kind[status] += 1
            counts["cases"] += 1
            if counts["cases"] % 50 == 0:
                report(f"multifd destination: {counts['cases']} cases, {counts['failed']} failed, "
                       f"{counts['completed']} completed")
        n, method = combos[rng.randrange(len(combos))]
        status = run(MultifdCase("valid", main, [b"".join(p) for p in valid[n, method]]), n, method)
        assert status == "completed", f"the valid source after {counts['cases']} cases: {status}"
    finally:
        if host is not None:
            host.close()
    counts["seconds"] = round(time.monotonic() - begin, 1)
    assert counts["max_case_seconds"] < limit and counts["peak_growth_mib"] < MULTIFD_RAM >> 20, counts
    return counts


def _dumped(host) -> bytes:
    """The destination's guest RAM."""
    import tempfile

    with tempfile.NamedTemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as f:
        host.cmd("pmemsave", val=0, size=MULTIFD_RAM, filename=f.name)
        return f.read()


# QMP --------------------------------------------------------------------------------------------
SAFE_COMMANDS = ["query-status", "query-migrate", "query-migrate-parameters", "query-migrate-capabilities",
                 "query-version", "query-commands", "migrate-set-parameters", "migrate-set-capabilities",
                 "migrate_cancel", "query-block",
                 "x-query-vcpus", "qmp_capabilities", "no-such-command", "stop", "cont"]
# Commands with side effects outside the host only ever get arguments of the wrong type.
TYPE_ONLY = ["migrate", "migrate-incoming", "pmemsave", "quit", "human-monitor-command"]


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 2 else 6)
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 7:
        return {rng.choice(["uri", "value", "capabilities", "max-bandwidth", "a"]): random_value(rng, depth + 1)
                for _ in range(rng.randrange(4))}
    return [None, True, rng.randrange(-2**40, 2**40), rng.random() * 1e9, "x" * rng.randrange(40),
            rng.choice(["max-bandwidth", "downtime-limit", "events", "on", "-1"])][kind]


def random_command(rng: random.Random) -> dict:
    if rng.random() < 0.2:
        name = rng.choice(TYPE_ONLY)
        args = {rng.choice(["uri", "val", "size", "filename", "command-line"]): rng.choice([[], {}, None, 1.5])}
    else:
        name = rng.choice(SAFE_COMMANDS)
        args = {rng.choice(["max-bandwidth", "downtime-limit", "value", "capabilities", "bogus", "enable"]):
                random_value(rng) for _ in range(rng.randrange(3))}
        if name == "migrate-set-parameters" and "x-fault" in args:
            del args["x-fault"]
    msg: dict = {"execute": name, "arguments": args}
    if rng.random() < 0.5:
        msg["id"] = random_value(rng)
    if rng.random() < 0.1:
        msg[rng.choice(["extra", "exec-oob"])] = 1
    return msg


class QmpConnection:
    def __init__(self, path: str, negotiate: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        json.loads(self.file.readline())
        if negotiate:
            self.ask({"execute": "qmp_capabilities"})

    def ask(self, msg: dict) -> dict:
        self.sock.sendall(json.dumps(msg).encode())
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("monitor closed the connection")
            reply = json.loads(line)
            if "event" not in reply:
                return reply

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def fuzz_qmp(path: str, cases: int, seconds: float, seed: int = 0) -> dict:
    """Throw random commands and bytes at the monitor at `path`; after each
    batch a fresh client must still be answered."""
    rng = random.Random(seed)
    start = time.monotonic()
    counts = {"commands": 0, "errors": 0, "byte_cases": 0, "reconnects": 0}
    conn = QmpConnection(path, negotiate=rng.random() < 0.9)
    while counts["commands"] + counts["byte_cases"] < cases and time.monotonic() - start < seconds:
        try:
            if rng.random() < 0.85:
                reply = conn.ask(random_command(rng))
                assert "return" in reply or "error" in reply, reply
                counts["commands"] += 1
                counts["errors"] += "error" in reply
            else:
                blob = rng.choice([rng.randbytes(rng.randrange(1, 4096)),
                                   json.dumps(random_command(rng)).encode()[: rng.randrange(1, 60)],
                                   b"{" * rng.randrange(1, 500), b'{"execute": ' + rng.randbytes(30) + b"}"])
                conn.sock.sendall(blob)
                counts["byte_cases"] += 1
                conn.close()  # abrupt disconnect, possibly mid-message
                counts["reconnects"] += 1
                conn = QmpConnection(path)
        except (ConnectionError, OSError):
            counts["reconnects"] += 1
            conn = QmpConnection(path)
        if (counts["commands"] + counts["byte_cases"]) % 200 == 0:
            probe = QmpConnection(path)
            assert "return" in probe.ask({"execute": "query-status"})
            probe.close()
    conn.close()
    counts["seconds"] = round(time.monotonic() - start, 1)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description="Fuzz livemig's stream loader and QMP monitor.")
    parser.add_argument("--stream-cases", type=int, default=100_000)
    parser.add_argument("--multifd-cases", type=int, default=30_000)
    parser.add_argument("--multifd-host-cases", type=int, default=300)
    parser.add_argument("--qmp-cases", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=600, help="time bound for each part")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("stream fuzzing:", fuzz_streams(args.stream_cases, args.seconds, args.seed), flush=True)
    print("floods (peak MiB):", fuzz_floods(), flush=True)
    print("multifd channels:", fuzz_multifd(args.multifd_cases, args.seconds, args.seed), flush=True)
    from livemig.tools.launch import HostProcess

    def destination() -> HostProcess:
        return HostProcess(f"fuzz-mfd{time.time_ns() % 100000}", "--machine", "none", "--ram",
                           f"{MULTIFD_RAM >> 20}M", "--incoming", "defer", return_path=False)

    print("multifd destination:", fuzz_multifd_host(destination, args.multifd_host_cases, args.seconds,
                                                    args.seed), flush=True)

    with HostProcess(f"fuzz{time.time_ns() % 100000}", "--ram", "16M", "--workload", "idle") as host:
        result = fuzz_qmp(host.qmp_addr.removeprefix("unix:"), args.qmp_cases, args.seconds, args.seed)
        assert host.alive()
        print("QMP fuzzing:", result, flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
