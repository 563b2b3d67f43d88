"""XBZRLE encoding, decoding, page cache and statistics, checked against a
byte-by-byte model of QEMU 7.2's encoder and against QEMU's real output."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from livemig.protocol import xbzrle
from livemig.protocol.xbzrle import DELTA, SKIP, WHOLE, PageCache, XbzrleEncoder, XbzrleError

PAGE = 4096


def _uleb(n: int) -> bytes:
    return bytes([n]) if n < 0x80 else bytes([(n & 0x7F) | 0x80, n >> 7])


def model_encode(old: bytes, new: bytes, dlen: int = PAGE) -> bytes | None:
    """QEMU's encoder, one byte at a time, with its checks in its order."""
    out = bytearray()
    i, n = 0, len(new)
    while i < n:
        if len(out) + 2 > dlen:
            return None
        z = 0
        while i < n and old[i] == new[i]:
            i += 1
            z += 1
        if z == n:
            return b""
        if i == n:
            return bytes(out)
        out += _uleb(z)
        if len(out) + 2 > dlen:
            return None
        start = i
        while i < n and old[i] != new[i]:
            i += 1
        out += _uleb(i - start)
        if len(out) + i - start > dlen:
            return None
        out += new[start:i]
    return bytes(out)


def page_pair(rng: np.random.Generator, changed: float, runs: int = 0) -> tuple[np.ndarray, np.ndarray]:
    old = rng.integers(0, 256, PAGE, dtype=np.uint8)
    new = old.copy()
    if runs:
        for start in rng.integers(0, PAGE, runs):
            new[start:start + int(rng.integers(1, 300))] ^= 0x5A
    else:
        mask = rng.random(PAGE) < changed
        new[mask] ^= rng.integers(1, 256, int(mask.sum()), dtype=np.uint8)
    return old, new


@pytest.mark.parametrize("changed", [0.0, 0.001, 0.01, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_encode_matches_the_model_and_decodes_back(changed):
    rng = np.random.default_rng(int(changed * 1000))
    for _ in range(20):
        old, new = page_pair(rng, changed)
        enc = xbzrle.encode(old, new)
        assert enc == model_encode(old.tobytes(), new.tobytes())
        if enc:
            page = old.copy()
            xbzrle.decode_into(page, enc)
            assert np.array_equal(page, new)


def test_encode_runs_of_every_length_and_both_ends():
    rng = np.random.default_rng(7)
    for _ in range(200):
        old, new = page_pair(rng, 0, runs=int(rng.integers(1, 12)))
        enc = xbzrle.encode(old, new)
        assert enc == model_encode(old.tobytes(), new.tobytes())
        if enc:
            page = old.copy()
            xbzrle.decode_into(page, enc)
            assert np.array_equal(page, new)
    old = np.zeros(PAGE, np.uint8)
    first, last = old.copy(), old.copy()
    first[0] = last[-1] = 1
    assert xbzrle.encode(old, first) == b"\x00\x01\x01"  # an empty first zero run
    assert xbzrle.encode(old, last) == b"\xff\x1f\x01\x01"  # 4095 = two uleb128 bytes
    assert xbzrle.encode(old, old.copy()) == b""


def test_overflow_boundary_is_qemus():
    """Pages whose encoding lands right around 4096 bytes: the result (and
    whether it overflows) must be QEMU's, check for check."""
    rng = np.random.default_rng(3)
    seen = {"overflow": 0, "fits": 0}
    for stride in (2, 3, 4):
        for shift in range(0, 40):
            old = rng.integers(0, 256, PAGE, dtype=np.uint8)
            new = old.copy()
            # alternating one changed byte every `stride`: about 4096*3/stride bytes encoded
            idx = np.arange(shift % stride, PAGE - shift, stride)
            new[idx] ^= 0xFF
            enc = xbzrle.encode(old, new)
            assert enc == model_encode(old.tobytes(), new.tobytes()), (stride, shift)
            seen["overflow" if enc is None else "fits"] += 1
    assert seen["overflow"] and seen["fits"]
    # a dense change: the literal bytes alone overflow
    old = np.zeros(PAGE, np.uint8)
    assert xbzrle.encode(old, np.ones(PAGE, np.uint8)) is None


def test_encode_small_dlen_cases_match_the_model():
    rng = np.random.default_rng(11)
    for dlen in range(2, 40):
        for _ in range(30):
            old = rng.integers(0, 4, 64, dtype=np.uint8)
            new = rng.integers(0, 4, 64, dtype=np.uint8)
            assert xbzrle.encode(old, new, dlen) == model_encode(old.tobytes(), new.tobytes(), dlen)


@pytest.mark.parametrize("data, message", [
    (b"\x05", "ends inside the zero-run length"),
    (b"\x05\x01", "ends inside the non-zero run"),
    (b"\x00\x01\xaa\x00\x01\xbb", "zero run of length 0"),
    (b"\x05\x00\xaa", "non-zero run of length 0"),
    (b"\x85\x81\x01", "more than two uleb128 bytes"),
    (b"\x05\x85\x81\x01", "more than two uleb128 bytes"),
    (b"\xff\x3f\x01\xaa", "beyond the 4096-byte page"),
    (b"\xff\x1f\x02\xaa\xbb", "beyond the 4096-byte page"),
    (b"\x05\x03\xaa\xbb", "overruns the 4-byte encoding"),
])
def test_decode_refuses_malformed(data, message):
    page = np.arange(PAGE, dtype=np.uint32).astype(np.uint8)
    before = page.copy()
    with pytest.raises(XbzrleError, match=message):
        xbzrle.decode_into(page, data)
    assert np.array_equal(page, before)  # nothing patched


def test_decode_patches_in_place_and_accepts_empty():
    page = np.zeros(PAGE, np.uint8)
    xbzrle.decode_into(page, b"")
    xbzrle.decode_into(page, b"\x02\x02\xaa\xbb\x81\x01\x01\xcc")
    assert page[:4].tolist() == [0, 0, 0xAA, 0xBB] and page[4 + 129] == 0xCC and page.sum() == 0xAA + 0xBB + 0xCC


def test_record_header_checks():
    assert xbzrle.record_body(b"\x00\x01\x07") == b"\x01\x00\x03\x00\x01\x07"
    xbzrle.check_record_header(1, 4096)
    with pytest.raises(XbzrleError, match="encoding flag 0x02"):
        xbzrle.check_record_header(2, 10)
    with pytest.raises(XbzrleError, match="longer than a 4096-byte page"):
        xbzrle.check_record_header(1, 4097)


def test_cache_size_rules():
    for ok in (4096, 8192, 64 << 20):
        xbzrle.check_cache_size(ok)
    for bad in (0, 2048, 4096 + 4096 * 2, 3 << 20):
        with pytest.raises(ValueError, match="power of two no less than the target page size"):
            xbzrle.check_cache_size(bad)
    assert PageCache(8192).slots == 2


def test_cache_is_direct_mapped_with_qemus_age_rule():
    cache = PageCache(4 * PAGE)
    a, b = 0x1000, 0x1000 + 4 * PAGE  # same slot
    page = np.full(PAGE, 7, np.uint8)
    assert cache.insert(a, page, age=1) == 1
    assert cache.insert(b, page, age=2) is None  # a is fresh: 1 + 2 > 2
    assert cache.lookup(a, age=2) == 1  # a hit refreshes the age
    assert cache.insert(b, page, age=3) is None  # 2 + 2 > 3
    assert cache.insert(b, page * 2, age=4) == 1  # 2 + 2 == 4: evicted
    assert cache.lookup(a, 4) is None and cache.lookup(b, 4) == 1
    assert cache.data[1][0] == 14
    assert cache.insert(b, page, age=4) == 1  # the same address always refreshes


def test_encoder_follows_save_xbzrle_page():
    enc = XbzrleEncoder(16 * PAGE)
    guest = np.full(PAGE, 1, np.uint8)
    kind, src = enc.page(0x2000, guest, age=1, last_stage=False)
    assert kind == WHOLE and src is not guest and np.array_equal(src, guest)  # miss: sent from the cache copy
    assert (enc.stats.cache_miss, enc.stats.pages) == (1, 0)
    assert enc.page(0x2000, guest, 2, False) == (SKIP, None)  # a hit, unchanged
    guest[100:164] = 9
    kind, data = enc.page(0x2000, guest, 3, False)
    assert kind == DELTA and data == b"\x64\x40" + bytes([9] * 64)
    assert enc.stats.pages == 2 and enc.stats.bytes == 3 + 66
    guest[:] = np.arange(PAGE) % 251 + 1  # every byte differs: overflow
    kind, src = enc.page(0x2000, guest, 4, False, idstr_len=7)
    assert kind == WHOLE and np.array_equal(src, guest) and src is not guest
    assert enc.stats.overflow == 1 and enc.stats.bytes == 3 + 66 + PAGE
    # the last stage encodes against the cache but leaves it as it was
    cached = enc.cache.data[enc.cache.slot(0x2000)].copy()
    guest[0] ^= 0xFF
    kind, data = enc.page(0x2000, guest, 5, True, idstr_len=7)
    assert kind == DELTA and data == b"\x00\x01" + bytes([guest[0]])
    assert np.array_equal(enc.cache.data[enc.cache.slot(0x2000)], cached)
    assert enc.stats.bytes == 3 + 66 + PAGE + 7 + 3 + 3
    # a miss in the last stage is sent from guest RAM and not cached
    other = np.full(PAGE, 3, np.uint8)
    kind, src = enc.page(0x5000, other, 6, True)
    assert kind == WHOLE and src is other and enc.cache.lookup(0x5000, 6) is None


def test_zero_page_refreshes_the_slot():
    enc = XbzrleEncoder(16 * PAGE)
    guest = np.full(PAGE, 5, np.uint8)
    enc.page(0x3000, guest, 1, False)
    enc.zero_page(0x3000, 2)
    guest[:] = 0
    guest[10] = 1
    kind, data = enc.page(0x3000, guest, 3, False)
    assert kind == DELTA and data == b"\x0a\x01\x01"


def test_rates_per_period():
    stats = xbzrle.XbzrleStats()
    stats.cache_miss, stats.pages, stats.bytes = 10, 30, 4096 * 3
    stats.update_rates(100)
    assert stats.cache_miss_rate == 0.1 and stats.encoding_rate == 10.0
    stats.update_rates(0)  # no pages sent: unchanged
    assert stats.cache_miss_rate == 0.1
    stats.cache_miss += 5
    stats.update_rates(50)
    assert stats.cache_miss_rate == 0.1 and stats.encoding_rate == 0.0
    assert set(stats.to_qmp()) == {"cache-size", "bytes", "pages", "cache-miss", "cache-miss-rate",
                                   "encoding-rate", "overflow"}


def test_encode_is_fast_enough():
    """Vectorised: a page with a few changed runs encodes in well under a millisecond."""
    rng = np.random.default_rng(5)
    pairs = [page_pair(rng, 0, runs=3) for _ in range(200)]
    start = time.perf_counter()
    for old, new in pairs:
        xbzrle.encode(old, new)
    assert (time.perf_counter() - start) / len(pairs) < 1e-3


# --------------------------------------------------------------------------- QEMU's own output

QEMU = shutil.which("qemu-system-x86_64")


class _Qtest:
    """qtest over a unix socket: writes into guest RAM that QEMU's dirty log sees."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(10)
        self.file = sock.makefile("rwb", buffering=0)

    def cmd(self, line: str) -> str:
        self.file.write(line.encode() + b"\n")
        while True:
            reply = self.file.readline().decode()
            assert reply, "qtest connection closed"
            if reply.startswith(("OK", "FAIL", "ERR")):
                assert reply.startswith("OK"), reply
                return reply


def scan_ram(stream: bytes) -> tuple[dict[str, bytearray], list[tuple[bytes, bytes, bytes]]]:
    """Replay the RAM sections of a QEMU stream (up to the first FULL
    section); returns the blocks and every XBZRLE record as
    (page before, page after, encoded bytes)."""
    pos = 8
    blocks: dict[str, bytearray] = {}
    records = []
    last = ""

    def take(n: int) -> bytes:
        nonlocal pos
        pos += n
        return stream[pos - n:pos]

    def idstr() -> str:
        return take(take(1)[0]).decode()

    assert stream[:8] == b"QEVM\0\0\0\x03"
    while True:
        kind = take(1)[0]
        if kind == 0x07:
            take(struct.unpack(">I", take(4))[0])
            continue
        if kind == 0x04:
            return blocks, records
        assert kind in (0x01, 0x02, 0x03), kind
        take(4)
        if kind == 0x01:
            assert idstr() == "ram"
            take(8)
        while True:
            word = struct.unpack(">Q", take(8))[0]
            flags, addr = word & 0xFFF, word & ~0xFFF
            if flags & 0x04:
                total = addr
                while total:
                    name = idstr()
                    size = struct.unpack(">Q", take(8))[0]
                    blocks[name] = bytearray(size)
                    total -= size
                continue
            if flags & 0x10:
                break
            if not flags & 0x20:
                last = idstr()
            block = blocks[last]
            if flags & 0x02:
                block[addr:addr + PAGE] = take(1) * PAGE
            elif flags & 0x08:
                block[addr:addr + PAGE] = take(PAGE)
            else:
                assert flags & 0x40, hex(flags)
                flag, length = struct.unpack(">BH", take(3))
                xbzrle.check_record_header(flag, length)
                data = take(length)
                before = bytes(block[addr:addr + PAGE])
                page = np.frombuffer(before, np.uint8).copy()
                xbzrle.decode_into(page, data)
                block[addr:addr + PAGE] = page.tobytes()
                records.append((before, page.tobytes(), data))
        assert take(1) == b"\x7e"
        take(4)


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_qemu_xbzrle_stream_decodes_and_our_encoder_matches_it(tmp_path):
    """QEMU 7.2 migrates a guest whose pages qtest rewrites a few bytes at a
    time; every XBZRLE record it sends decodes here to QEMU's RAM, and our
    encoder produces the same bytes for the same pages."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    size = 16 << 20
    base = Path("/dev/shm") if os.path.isdir("/dev/shm") else tmp_path
    ram = base / f"livemig-xbzrle-{os.getpid()}.ram"
    rng = np.random.default_rng(1)
    ram.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    qt_path, qmp_path, stream = tmp_path / "qtest.sock", tmp_path / "qmp.sock", tmp_path / "stream"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(qt_path))
    listener.listen(1)
    listener.settimeout(30)
    proc = subprocess.Popen(
        [QEMU, "-nodefaults", "-display", "none", "-M", "pc", "-qtest", f"unix:{qt_path}",
         "-object", f"memory-backend-file,id=m,size={size},mem-path={ram},share=on",
         "-m", str(size >> 20), "-machine", "memory-backend=m", "-qmp", f"unix:{qmp_path},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        conn, _ = listener.accept()
        qtest = _Qtest(conn)
        deadline = time.monotonic() + 30
        while not qmp_path.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        mon = QEMUMonitorProtocol(str(qmp_path))
        mon.connect()
        # pause-before-switchover: qtest writes land even in a stopped guest,
        # so stop writing before the final dirty sync can happen
        mon.cmd("migrate-set-capabilities", capabilities=[{"capability": "xbzrle", "state": True},
                                                          {"capability": "pause-before-switchover", "state": True}])
        mon.cmd("migrate-set-parameters", **{"max-bandwidth": 64 << 20, "downtime-limit": 1})
        mon.cmd("migrate", uri=f"exec:cat > {stream}")
        slowed = False
        for r in range(2000):
            info = mon.cmd("query-migrate")
            if info.get("xbzrle-cache", {}).get("pages", 0) >= 300 or info["status"] not in ("setup", "active"):
                break
            if not slowed and info.get("ram", {}).get("dirty-sync-count", 0) >= 2:
                # after the first pass: slow enough that every pass sees fresh writes
                mon.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 20})
                slowed = True
            for p in range(64):
                addr = 0x200000 + p * PAGE
                if p % 16 == 15:  # a whole new page: an overflow
                    qtest.cmd(f"write {addr:#x} {PAGE} 0x{rng.bytes(PAGE).hex()}")
                elif p % 3 == 0:  # a run of 64 bytes
                    qtest.cmd(f"write {addr + (r * 136) % 4000:#x} 64 0x{rng.bytes(64).hex()}")
                else:  # one word
                    qtest.cmd(f"writeq {addr + (r * 8 * (p % 5 + 1)) % 4000:#x} {r * 7919 + p + 1:#x}")
        mon.cmd("migrate-set-parameters", **{"downtime-limit": 60000, "max-bandwidth": 64 << 20})
        deadline = time.monotonic() + 60
        while (info := mon.cmd("query-migrate"))["status"] in ("setup", "active", "pre-switchover"):
            if info["status"] == "pre-switchover":
                mon.cmd("migrate-continue", state="pre-switchover")
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert info["status"] == "completed", info
        cache = info["xbzrle-cache"]
        mon.close()
    finally:
        proc.kill()
        proc.wait(10)
        listener.close()
    blocks, records = scan_ram(stream.read_bytes())
    try:
        final = ram.read_bytes()
    finally:
        ram.unlink()
    assert cache["pages"] > 0 and len(records) > 0
    main = next(b for b in blocks.values() if len(b) == size)
    # the pages qtest wrote (the machine's firmware areas are its own business)
    assert main[0x200000:0x200000 + 64 * PAGE] == final[0x200000:0x200000 + 64 * PAGE]
    for before, after, data in records:
        old, new = np.frombuffer(before, np.uint8), np.frombuffer(after, np.uint8)
        assert xbzrle.encode(old, new) == data
    # QEMU's byte count is the records' bodies (no header; these are all CONTINUE)
    assert cache["overflow"] > 0 and len(records) >= 10, (cache, len(records), r)
    assert cache["bytes"] >= sum(3 + len(d) for _, _, d in records) + PAGE * cache["overflow"]


def test_encode_batch_equals_encode_row_by_row():
    rng = np.random.default_rng(9)
    for trial in range(40):
        k = int(rng.integers(1, 40))
        old = rng.integers(0, 4 if trial % 3 == 0 else 256, (k, PAGE), dtype=np.uint8)
        new = old.copy()
        for i in range(k):
            mode = int(rng.integers(0, 5))
            if mode == 1:
                s = int(rng.integers(0, PAGE - 64))
                new[i, s:s + 64] ^= 1
            elif mode == 2:
                new[i] = rng.integers(0, 4, PAGE, dtype=np.uint8)
            elif mode == 3:
                new[i, 0] ^= 1
                new[i, -1] ^= 1
            elif mode == 4:
                new[i, rng.random(PAGE) < rng.random()] ^= 0xFF
        assert xbzrle.encode_batch(old, new) == [xbzrle.encode(old[i], new[i]) for i in range(k)]


def test_encoder_batch_equals_page_by_page():
    """Cache slots shared within a batch (a 8-slot cache over 64 pages),
    misses, hits, skips, overflows and the last stage: the batch gives what
    page() gives one page at a time, stats and cache included."""
    rng = np.random.default_rng(12)
    ram = rng.integers(0, 256, (64, PAGE), dtype=np.uint8)
    one, many = XbzrleEncoder(8 * PAGE), XbzrleEncoder(8 * PAGE)
    for age in range(1, 9):
        touched = np.sort(rng.choice(64, 24, replace=False))
        for i in touched[::3]:
            ram[i, rng.integers(0, 4000):][:50] ^= 7
        for i in touched[1::5]:
            ram[i] = rng.integers(0, 256, PAGE, dtype=np.uint8)
        last = age == 8
        addrs = touched * PAGE
        expect = [one.page(int(a), ram[i], age, last) for a, i in zip(addrs, touched, strict=True)]
        got = many.batch(addrs, ram[touched], age, last)
        for (k1, p1), (k2, p2) in zip(expect, got, strict=True):
            assert k1 == k2
            if k1 == WHOLE:
                assert np.array_equal(p1, p2)
            else:
                assert p1 == p2
        assert one.stats == many.stats
        assert np.array_equal(one.cache.data, many.cache.data) and np.array_equal(one.cache.addr, many.cache.addr)
    assert one.stats.pages and one.stats.cache_miss and one.stats.overflow


# --------------------------------------------------------------------------- a livemig destination


def crafted_stream(ram: np.ndarray, records: list[bytes]) -> bytes:
    """A `none` stream: every page in one PART, then `records` (raw RAM
    records) in the END section, then QEMU's timer and globalstate."""
    from livemig.protocol import devices, savevm
    from livemig.protocol.ram import PageEncoder, ram_eos, ram_mem_size

    enc = PageEncoder(ram.shape[0])
    idx = np.arange(ram.shape[0])
    out = [savevm.header(), savevm.configuration("none"),
           savevm.section_start(savevm.SECTION_START, 2, "ram", 0, 4),
           ram_mem_size([("ram", ram.size)]), ram_eos(), savevm.footer(2),
           savevm.section_part(savevm.SECTION_PART, 2),
           *[bytes(b) for b in enc.encode("ram", idx, ram, ~ram.any(axis=1))], ram_eos(), savevm.footer(2),
           savevm.section_part(savevm.SECTION_END, 2), *records, ram_eos(), savevm.footer(2)]
    for sid, (name, state) in enumerate((("timer", None), ("globalstate", "running")), 3):
        out += devices.full_section(sid, devices.DEVICES[name], 0, devices.DEVICES[name].encode(state))
    out += [savevm.eof()]
    return b"".join(out)


def _record(page: int, body: bytes) -> bytes:
    return struct.pack(">Q", (page * PAGE) | 0x40 | 0x20) + body


@pytest.mark.parametrize("case", ["valid", "bad-flag", "too-long", "overrun", "zero-nzrun", "beyond-block"])
def test_destination_decodes_xbzrle_without_the_capability_and_refuses_bad_records(hosts, tmp_path, case):
    """XBZRLE records land on a livemig destination that never turned the
    capability on (as on QEMU); a malformed one fails the migration with a
    clear error and the guest is not started."""
    rng = np.random.default_rng(5)
    ram = rng.integers(0, 256, (1024, PAGE), dtype=np.uint8)
    new = ram[7].copy()
    new[100:164] ^= 0x5A
    new[4000] ^= 1
    delta = xbzrle.encode(ram[7], new)
    records = {
        "valid": [_record(7, xbzrle.record_body(delta))],
        "bad-flag": [_record(7, b"\x02" + xbzrle.record_body(delta)[1:])],
        "too-long": [_record(7, b"\x01\x10\x01" + bytes(4097))],
        "overrun": [_record(7, b"\x01\x00\x04\x05\x09\xaa\xbb")],
        "zero-nzrun": [_record(7, b"\x01\x00\x03\x05\x00\xaa")],
        "beyond-block": [_record(1024, xbzrle.record_body(delta))],
    }[case]
    path = tmp_path / "crafted.mig"
    path.write_bytes(crafted_stream(ram, records))
    dst = hosts.start("dst", "--machine", "none", "--ram", "4M", "--incoming", f"file:{path}")
    info = dst.wait_migration(60)
    if case == "valid":
        assert info["status"] == "completed", info
        dump = tmp_path / "ram"
        dst.cmd("pmemsave", val=0, size=ram.size, filename=str(dump))
        got = np.fromfile(dump, np.uint8).reshape(-1, PAGE)
        expect = ram.copy()
        expect[7] = new
        assert np.array_equal(got, expect)
        return
    message = {"bad-flag": "encoding flag 0x02", "too-long": "4097 bytes is longer than a 4096-byte page",
               "overrun": "overruns the 4-byte encoding", "zero-nzrun": "non-zero run of length 0",
               "beyond-block": "beyond block 'ram'"}[case]
    assert info["status"] == "failed" and message in info["error-desc"], info
    time.sleep(0.3)
    assert dst.cmd("query-status")["status"] == "inmigrate"


def test_livemig_to_livemig_with_xbzrle_and_a_running_guest(hosts, tmp_path, port):
    """A guest rewriting 64 bytes per page migrates with XBZRLE: deltas go
    on the wire, the statistics say so, and the destination equals a replay."""
    from tests.conftest import guest_args, replay_matches

    args = guest_args(ram="64M", workload="memtouch:rate=4M,wss=8M,bytes=64")
    src = hosts.start("src", *args)
    dst = hosts.start("dst", *args, "--incoming", f"tcp:127.0.0.1:{port}")
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "xbzrle", "state": True}])
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 32 << 20, "xbzrle-cache-size": 16 << 20})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = src.wait_migration(120)
    assert info["status"] == "completed", info
    cache = info["xbzrle-cache"]
    assert cache["cache-size"] == 16 << 20 and cache["pages"] > 0 and cache["bytes"] > 0, info
    assert cache["bytes"] < cache["pages"] * PAGE / 5  # 64 bytes rewritten: far less than whole pages
    hmp = src.cmd("human-monitor-command", **{"command-line": "info migrate"})
    assert f"xbzrle pages: {cache['pages']} pages" in hmp and "cache size: 16777216 bytes" in hmp
    dst.wait_status("running", 30)
    # normal counts whole pages only, as QEMU's: what the destination loaded whole
    assert info["ram"]["normal"] == dst.cmd("query-migrate")["x-ram"]["normal"], info
    result = replay_matches(dst, tmp_path)
    assert result["ram_equal"] and result["vcpu_equal"]


def test_xbzrle_cache_size_rules_and_default(hosts):
    host = hosts.start("h", "--ram", "32M")
    assert host.cmd("query-migrate-parameters")["xbzrle-cache-size"] == 64 << 20
    for bad in (1024, 3 << 20):
        with pytest.raises(Exception, match="power of two no less than the target page size"):
            host.cmd("migrate-set-parameters", **{"xbzrle-cache-size": bad})
    host.cmd("migrate-set-parameters", **{"xbzrle-cache-size": 4096})
    assert host.cmd("query-migrate-parameters")["xbzrle-cache-size"] == 4096
