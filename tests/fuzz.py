"""Fuzzing of the two inputs a host takes from the outside: migration streams
and QMP. `scripts/fuzz` runs it at scale (python -m tests.fuzz); the test
suite runs a sample (tests/test_fuzz.py).

Stream cases are mutations of valid streams (bit flips, byte changes,
insertions, deletions, splices), every truncation of a small valid stream,
and random bytes; each must load or fail with StreamError, nothing else, and
memory must stay bounded. QMP cases are random JSON commands (names and
argument types) and random or mutated bytes sent to a live monitor, which must
answer or close, and keep serving other clients."""

from __future__ import annotations

import argparse
import io
import json
import random
import resource
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np

from livemig.protocol import devices, savevm, xbzrle
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
    counts["seconds"] = round(time.monotonic() - start, 1)
    counts["maxrss_growth_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    assert counts["maxrss_growth_kib"] < 256 << 10, counts
    return counts


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
    parser.add_argument("--qmp-cases", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=600, help="time bound for each part")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("stream fuzzing:", fuzz_streams(args.stream_cases, args.seconds, args.seed), flush=True)
    print("floods (peak MiB):", fuzz_floods(), flush=True)
    from livemig.tools.launch import HostProcess

    with HostProcess(f"fuzz{time.time_ns() % 100000}", "--ram", "16M", "--workload", "idle") as host:
        result = fuzz_qmp(host.qmp_addr.removeprefix("unix:"), args.qmp_cases, args.seconds, args.seed)
        assert host.alive()
        print("QMP fuzzing:", result, flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
