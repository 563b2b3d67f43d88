"""Multifd framing and compression: round trips, every refusal, and QEMU
7.2's real channels (captured from a QEMU source) decoded here."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import zstandard

from livemig.protocol import multifd
from livemig.protocol.multifd import Compressor, Decompressor, MultifdError

PAGE = 4096
BLOCKS = {"ram": 64 * PAGE}


def test_sizes_are_qemus():
    assert multifd.INIT_SIZE == 64 and multifd.HEADER_SIZE == 320 and multifd.PACKET_SIZE == 1344
    assert multifd.PACKET_PAGES == 128


def test_init_round_trip_and_refusals():
    raw = multifd.init_packet(1)
    assert len(raw) == 64 and raw[:8] == bytes.fromhex("1122334400000001") and raw[24] == 1
    assert multifd.parse_init(raw, channels=2) == 1
    uuid = bytes(range(16))
    assert multifd.parse_init(multifd.init_packet(0, uuid), 2, uuid) == 0
    cases = [
        (b"\x00" * 4 + raw[4:], "magic 0x0 expected 0x11223344"),
        (raw[:4] + b"\0\0\0\x02" + raw[8:], "version 2 expected 1"),
        (multifd.init_packet(0, uuid), "received uuid '00010203-0405-0607-0809-0a0b0c0d0e0f' and expected"),
        (multifd.init_packet(2), "channel id 2, but multifd-channels is 2"),
        (raw[:63], "init packet of 63 bytes"),
    ]
    for data, message in cases:
        with pytest.raises(MultifdError, match=message):
            multifd.parse_init(data, 2)


def test_packet_round_trip():
    offs = np.array([0, 5 * PAGE, 63 * PAGE], np.int64)
    raw = multifd.packet_header(multifd.FLAG_SYNC | multifd.FLAG_ZLIB, "ram", offs, 777, 9)
    assert len(raw) == 1344
    p = multifd.parse_packet(raw, BLOCKS)
    assert (p.sync, p.compression, p.normal, p.pages_alloc, p.next_packet_size, p.packet_num, p.ramblock) == \
        (True, multifd.FLAG_ZLIB, 3, 128, 777, 9, "ram")
    assert p.offsets.tolist() == offs.tolist() and multifd.payload_size(p) == 777
    nocomp = multifd.parse_packet(multifd.packet_header(0, "ram", offs, 0, 1), BLOCKS)
    assert multifd.payload_size(nocomp) == 3 * PAGE


def test_bare_sync_with_stale_size_and_unknown_block_is_fine():
    """normal = 0: no payload whatever next_packet_size says, and the block is not looked up."""
    p = multifd.parse_packet(multifd.packet_header(multifd.FLAG_SYNC, "gone", np.zeros(0, np.int64),
                                                   123456789, 4), BLOCKS)
    assert p.sync and multifd.payload_size(p) == 0


def _patch(raw: bytes, at: int, fmt: str, value: int) -> bytes:
    return raw[:at] + struct.pack(fmt, value) + raw[at + struct.calcsize(fmt):]


def test_packet_refusals():
    offs = np.array([PAGE], np.int64)
    raw = multifd.packet_header(0, "ram", offs, 0, 0)
    cases = [
        (_patch(raw, 0, ">I", 0xDEADBEEF), "magic 0xdeadbeef and expected magic 0x11223344"),
        (_patch(raw, 4, ">I", 7), "version 7 and expected version 1"),
        (_patch(raw, 12, ">I", 129), "with size 129 and expected a size of 128"),
        (_patch(_patch(raw, 12, ">I", 4), 16, ">I", 5), "with 5 pages and expected maximum pages are 4"),
        (_patch(raw, 320, ">Q", 64 * PAGE), "offset too long 262144"),
        (_patch(raw, 320, ">Q", 63 * PAGE + 1), "offset too long"),
        (_patch(raw, 320, ">Q", 2**64 - PAGE), "offset too long"),
        (_patch(raw, 320, ">Q", 100), "offset 0x64 is not page aligned"),
        (multifd.packet_header(0, "rom", offs, 0, 0), "unknown ram block 'rom'"),
        (multifd.packet_header(multifd.FLAG_ZSTD, "ram", offs, 2 << 20, 0), "compressed payload of 2097152"),
        (raw[:1000], "packet header of 1000 bytes"),
    ]
    for data, message in cases:
        with pytest.raises(MultifdError, match=message):
            multifd.parse_packet(data, BLOCKS)
    with pytest.raises(ValueError, match="at most 128 pages"):
        multifd.packet_header(0, "ram", np.zeros(129, np.int64), 0, 0)


def _pages(rng: np.random.Generator, n: int) -> np.ndarray:
    pages = rng.integers(0, 256, (n, PAGE), dtype=np.uint8)
    pages[::3] = 0
    pages[1::3, 2048:] = 7
    return pages


@pytest.mark.parametrize("method", ["zlib", "zstd"])
def test_continuous_stream_round_trip(method):
    rng = np.random.default_rng(1)
    comp, decomp = Compressor(method, 1), Decompressor(method)
    sizes = []
    for n in (1, 128, 7, 128, 3):
        pages = _pages(rng, n)
        payload = comp.compress(pages)
        sizes.append(len(payload))
        out = [np.zeros(PAGE, np.uint8) for _ in range(n)]
        decomp.decompress_into(payload, out)
        assert np.array_equal(np.stack(out), pages)
    assert sum(sizes) < 0.8 * (1 + 128 + 7 + 128 + 3) * PAGE
    # the stream continues: a later packet cannot be decoded by a fresh decoder
    with pytest.raises(MultifdError):
        Decompressor(method).decompress_into(comp.compress(_pages(rng, 2)), [np.zeros(PAGE, np.uint8)] * 2)


@pytest.mark.parametrize("method", ["zlib", "zstd"])
def test_payload_of_the_wrong_size_or_garbage_is_refused(method):
    rng = np.random.default_rng(2)
    comp = Compressor(method, 3)
    payload = comp.compress(_pages(rng, 4))
    with pytest.raises(MultifdError, match="more than"):
        Decompressor(method).decompress_into(payload, [np.zeros(PAGE, np.uint8) for _ in range(3)])
    with pytest.raises(MultifdError, match="gives 16384 bytes for 5 pages|gave 16384 bytes for 5 pages"):
        Decompressor(method).decompress_into(payload, [np.zeros(PAGE, np.uint8) for _ in range(5)])
    with pytest.raises(MultifdError, match="does not decompress"):
        Decompressor(method).decompress_into(b"\x01garbage" * 10, [np.zeros(PAGE, np.uint8)])


@pytest.mark.parametrize("method", ["zlib", "zstd"])
def test_decompression_bomb_stays_bounded(method):
    """A tiny payload that would inflate to a GiB stops at the packet's pages."""
    if method == "zlib":
        c = zlib.compressobj(9)
        bomb = c.compress(bytes(1 << 30)) + c.flush(zlib.Z_SYNC_FLUSH)
    else:
        bomb = zstandard.ZstdCompressor(level=1).compress(bytes(1 << 30))
    assert len(bomb) < 2 << 20
    with pytest.raises(MultifdError, match="more than"):
        Decompressor(method).decompress_into(bomb, [np.zeros(PAGE, np.uint8) for _ in range(128)])


def test_flags_and_levels():
    dec = Decompressor("zstd")
    pkt = multifd.parse_packet(multifd.packet_header(multifd.FLAG_ZLIB, "ram", np.array([0]), 10, 0), BLOCKS)
    with pytest.raises(MultifdError, match="flags received 0x2 flags expected 0x4"):
        dec.check_flags(pkt)
    Decompressor("zlib").check_flags(pkt)
    for method, bad in (("zlib", 10), ("zstd", 21), ("zlib", -1)):
        with pytest.raises(ValueError, match=f"multifd_{method}_level"):
            Compressor(method, bad)
    with pytest.raises(ValueError, match="use none, zlib or zstd"):
        Compressor("lz4", 1)


def test_qemu_decodes_a_python_zlib_stream_the_way_it_reads():
    """QEMU inflates page by page with 4096 bytes of room and never carries
    input over to the next packet: emulate that with zlib's raw API limits."""
    rng = np.random.default_rng(3)
    comp = Compressor("zlib", 1)
    d = zlib.decompressobj()
    for n in (5, 128, 1):
        pages = _pages(rng, n)
        payload = comp.compress(pages)
        tail = payload
        for i in range(n):
            out = d.decompress(tail, PAGE)
            tail = d.unconsumed_tail
            assert out == pages[i].tobytes()
        assert d.decompress(tail) == b""  # what is left is only the flush marker


def _channel_pair():
    from livemig.protocol.transport import Channel

    a, b = socket.socketpair()
    return Channel(a.fileno(), a), Channel(b.fileno(), b)


@pytest.mark.parametrize("method", ["none", "zlib", "zstd"])
def test_channel_sender_and_receiver_move_pages_between_rams(method):
    rng = np.random.default_rng(4)
    src = _pages(rng, 300)
    dst = np.zeros_like(src)
    tx, rx = _channel_pair()
    batches = [np.arange(0, 128), np.array([5, 9, 7, 200, 201, 202]), np.arange(128, 256), np.arange(256, 300)]
    result: dict = {}

    def send() -> None:
        sender = multifd.PacketSender(tx, 1, method, 1)
        for num, idx in enumerate(batches):
            sender.send("ram", src, idx, num, sync=num == 1)
        sender.send("ram", src, np.zeros(0, np.int64), 9, sync=True)
        result["bytes"] = sender.bytes
        tx.shutdown_write()

    t = threading.Thread(target=send)
    t.start()
    init = bytearray(64)
    multifd.read_exact(rx, memoryview(init))
    assert multifd.parse_init(bytes(init), 2) == 1
    recv = multifd.PacketReceiver(rx, method, {"ram": dst})
    syncs = []
    while (pkt := recv.receive()) is not None:
        syncs.append(pkt.sync)
    t.join(10)
    tx.close()
    rx.close()
    assert syncs == [False, True, False, False, True]
    assert np.array_equal(dst, src) and recv.pages == 306
    assert recv.bytes + 64 == result["bytes"]
    if method == "none":
        assert result["bytes"] == 64 + 5 * 1344 + 306 * PAGE


def test_receiver_refuses_a_cut_payload():
    tx, rx = _channel_pair()
    src = np.ones((4, PAGE), np.uint8)
    multifd.PacketSender(tx, 0).send("ram", src, np.arange(4), 0)
    tx.close()
    rx.read_into(memoryview(bytearray(64)))
    recv = multifd.PacketReceiver(rx, "none", {"ram": np.zeros((2, PAGE), np.uint8)})
    with pytest.raises(MultifdError, match="offset too long 8192"):
        recv.receive()
    rx.close()
    tx, rx = _channel_pair()
    tx.write(multifd.packet_header(0, "ram", np.array([0]), PAGE, 0) + bytes(100))
    tx.close()
    recv = multifd.PacketReceiver(rx, "none", {"ram": np.zeros((2, PAGE), np.uint8)})
    with pytest.raises(MultifdError, match="channel ended early: wanted 3996 more bytes"):
        recv.receive()
    rx.close()


# --------------------------------------------------------------------------- QEMU's own channels

QEMU = shutil.which("qemu-system-x86_64")


def scan_main(stream: bytes) -> tuple[dict[int, int], int]:
    """Zero pages (offset -> fill byte) and the number of RAM EOS on QEMU's
    main channel, up to its first FULL section."""
    pos = 8
    zero: dict[int, int] = {}
    eos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        pos += n
        return stream[pos - n:pos]

    assert stream[:8] == b"QEVM\0\0\0\x03"
    while True:
        kind = take(1)[0]
        if kind == 0x07:
            take(struct.unpack(">I", take(4))[0])
            continue
        if kind == 0x04:
            return zero, eos
        take(4)
        if kind == 0x01:
            take(take(1)[0] + 8)
        while True:
            word = struct.unpack(">Q", take(8))[0]
            flags, addr = word & 0xFFF, word & ~0xFFF
            if flags & 0x04:
                while addr:
                    take(take(1)[0])
                    addr -= struct.unpack(">Q", take(8))[0]
                continue
            if flags & 0x10:
                eos += 1
                break
            assert flags & 0x02, f"only zero pages go on the main channel, not flags {flags:#x}"
            if not flags & 0x20:
                take(take(1)[0])
            zero[addr] = take(1)[0]
        assert take(1) == b"\x7e"
        take(4)


class _Bytes:
    """Captured channel bytes, read like a Channel."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read_into(self, buf: memoryview) -> int:
        n = min(len(buf), len(self.data) - self.pos)
        buf[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


def replay_channel(data: bytes, channels: int, ram: np.ndarray, method: str) -> tuple[int, int]:
    """Apply one captured multifd channel to `ram` ((n, 4096)) through the
    receiver; returns (its id, its SYNC packets)."""
    cid = multifd.parse_init(data[:64], channels)
    channel = _Bytes(data[64:])
    recv = multifd.PacketReceiver(channel, method, {"m": ram})
    syncs = 0
    while (pkt := recv.receive()) is not None:
        syncs += pkt.sync
    assert channel.pos == len(channel.data)
    return cid, syncs


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
@pytest.mark.parametrize("channels", [2, 4])
@pytest.mark.parametrize("method", ["none", "zlib", "zstd"])
def test_qemu_multifd_channels_decode_here(tmp_path, channels, method):
    """A QEMU 7.2 -M none source migrates to a socket that records every
    connection: the first is the main channel, the others open with
    MultiFDInit_t; replaying them gives QEMU's RAM, with one SYNC per
    channel for every RAM end of section."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    size = 32 << 20
    base = Path("/dev/shm") if os.path.isdir("/dev/shm") else tmp_path
    ram_file = base / f"livemig-multifd-{os.getpid()}.ram"
    rng = np.random.default_rng(channels)
    image = rng.integers(0, 256, size, dtype=np.uint8).reshape(-1, PAGE)
    image[::4] = 0
    image[1::4, :3000] = 0  # compressible
    ram_file.write_bytes(image.tobytes())
    sock_path, qmp_path = tmp_path / "mig.sock", tmp_path / "qmp.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock_path))
    listener.listen(8)
    listener.settimeout(30)
    captured: list[bytearray] = []

    def record(conn: socket.socket, into: bytearray) -> None:
        conn.settimeout(60)
        while chunk := conn.recv(1 << 20):
            into += chunk
        conn.close()

    proc = subprocess.Popen(
        [QEMU, "-nodefaults", "-display", "none", "-M", "none",
         "-object", f"memory-backend-file,id=m,size={size},mem-path={ram_file},share=on",
         "-m", str(size >> 20), "-machine", "memory-backend=m", "-qmp", f"unix:{qmp_path},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    threads = []
    try:
        deadline = time.monotonic() + 30
        while not qmp_path.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        mon = QEMUMonitorProtocol(str(qmp_path))
        mon.connect()
        mon.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
        params = {"multifd-channels": channels, "multifd-compression": method, "max-bandwidth": 8 << 30}
        mon.cmd("migrate-set-parameters", **params)
        mon.cmd("migrate", uri=f"unix:{sock_path}")
        for _ in range(channels + 1):
            conn, _ = listener.accept()
            captured.append(bytearray())
            threads.append(threading.Thread(target=record, args=(conn, captured[-1])))
            threads[-1].start()
        deadline = time.monotonic() + 60
        while (info := mon.cmd("query-migrate"))["status"] in ("setup", "active", "device"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert info["status"] == "completed", info
        mon.close()
    finally:
        proc.kill()
        proc.wait(10)
        listener.close()
        for t in threads:
            t.join(30)
        ram_file.unlink()
    zero, eos = scan_main(bytes(captured[0]))
    ram = np.full((size // PAGE, PAGE), 0xEE, np.uint8)
    for addr, fill in zero.items():
        ram[addr // PAGE] = fill
    ids = set()
    for data in captured[1:]:
        cid, syncs = replay_channel(bytes(data), channels, ram, method)
        ids.add(cid)
        assert syncs == eos  # one SYNC per channel before every RAM EOS
    assert ids == set(range(channels))
    assert np.array_equal(ram, image)
    assert info["ram"]["multifd-bytes"] > 0
