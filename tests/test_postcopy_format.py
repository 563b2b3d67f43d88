"""Post-copy commands and return-path messages: bytes as QEMU 7.2 frames them,
and clear refusals for anything malformed, out of order or beyond RAM."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest

from livemig.protocol import postcopy as pc
from livemig.protocol import returnpath as rp
from livemig.protocol.savevm import StreamError

BLOCKS = {"pc.ram": 64 << 20, "extra": 1 << 20}


def _cmd(record: bytes) -> tuple[int, bytes]:
    """(cmd, data) of one savevm COMMAND record, checking its framing."""
    assert record[0] == 0x08
    cmd, length = struct.unpack_from(">HH", record, 1)
    assert len(record) == 5 + length
    return cmd, record[5:]


def _rp(msg: bytes) -> tuple[int, bytes, bytes]:
    mtype, length = struct.unpack_from(">HH", msg)
    return mtype, msg[4:4 + length], msg[4 + length:]


def test_command_bytes_match_qemu_layout():
    assert pc.advise() == b"\x08\x00\x03\x00\x10" + struct.pack(">QQ", 4096, 4096)
    assert pc.listen() == b"\x08\x00\x04\x00\x00"
    assert pc.run() == b"\x08\x00\x05\x00\x00"
    assert pc.resume() == b"\x08\x00\x09\x00\x00"
    assert pc.recv_bitmap("pc.ram") == b"\x08\x00\x0a\x00\x07\x06pc.ram"
    assert pc.packaged(b"xyz") == b"\x08\x00\x07\x00\x04\x00\x00\x00\x03xyz"
    (one,) = pc.ram_discard("pc.ram", [(0x1000, 0x3000)])
    assert one == (b"\x08\x00\x06" + struct.pack(">H", 3 + 6 + 16) + b"\x00\x06pc.ram\x00"
                   + struct.pack(">QQ", 0x1000, 0x3000))


def test_discard_splits_at_twelve_ranges_and_round_trips():
    pages = np.zeros(1000, np.bool_)
    pages[::3] = True  # 334 single-page runs
    cmds = pc.discard_pages("pc.ram", pages)
    assert len(cmds) == -(-334 // 12)
    state = pc.IncomingPostcopy(BLOCKS)
    state.on_advise(_cmd(pc.advise())[1])
    got = []
    for record in cmds:
        cmd, data = _cmd(record)
        assert cmd == pc.CMD_RAM_DISCARD
        d = state.on_discard(data)
        assert d.block == "pc.ram" and len(d.ranges) <= pc.MAX_DISCARD_RANGES
        got += d.ranges
    assert got == [(p * 4096, 4096) for p in range(0, 1000, 3)]
    assert pc.page_runs(np.array([1, 1, 0, 1, 0, 0, 1, 1, 1], np.bool_)) == [(0, 2), (3, 1), (6, 3)]
    assert pc.page_runs(np.zeros(5, np.bool_)) == []


def test_full_sequence_in_order():
    state = pc.IncomingPostcopy(BLOCKS)
    assert state.on_advise(_cmd(pc.advise())[1]) == pc.Advise(4096, 4096)
    for record in pc.ram_discard("extra", [(0, 4096)]):
        state.on_discard(_cmd(record)[1])
    blob = pc.listen() + b"devices" + pc.run()
    assert state.on_packaged(_cmd(pc.packaged(blob)[:9])[1]) == len(blob)
    state.on_listen(b"")
    state.on_run(b"")
    state.end_package(len(blob))
    assert state.state is pc.State.RUNNING
    assert state.on_recv_bitmap(_cmd(pc.recv_bitmap("pc.ram"))[1]) == "pc.ram"
    state.on_resume(b"")


@pytest.mark.parametrize("steps, error", [
    (["run"], "POSTCOPY_RUN out of order: post-copy state is none, needs listening"),
    (["listen"], "POSTCOPY_LISTEN out of order: post-copy state is none"),
    (["discard"], "POSTCOPY_RAM_DISCARD out of order: post-copy state is none"),
    (["advise", "advise"], "POSTCOPY_ADVISE out of order: post-copy state is advise"),
    (["advise", "run"], "POSTCOPY_RUN out of order: post-copy state is advise"),
    (["advise", "listen", "discard"], "POSTCOPY_RAM_DISCARD out of order: post-copy state is listening"),
    (["advise", "listen", "listen"], "POSTCOPY_LISTEN out of order"),
    (["advise", "resume"], "POSTCOPY_RESUME out of order"),
    (["advise", "listen", "recv_bitmap"], "RECV_BITMAP out of order"),
])
def test_out_of_order_is_refused(steps, error):
    state = pc.IncomingPostcopy(BLOCKS)
    records = {"advise": pc.advise(), "listen": pc.listen(), "run": pc.run(), "resume": pc.resume(),
               "discard": pc.ram_discard("pc.ram", [(0, 4096)])[0], "recv_bitmap": pc.recv_bitmap("pc.ram")}
    with pytest.raises(StreamError, match=error):
        for step in steps:
            cmd, data = _cmd(records[step])
            state.handler(cmd)(data)


@pytest.mark.parametrize("data, error", [
    (b"\x00\x06pc.ram\x00" + struct.pack(">QQ", 64 << 20, 4096), "beyond RAM block 'pc.ram' of 67108864 bytes"),
    (b"\x00\x06pc.ram\x00" + struct.pack(">QQ", (64 << 20) - 4096, 8192), "beyond RAM block"),
    (b"\x00\x06pc.ram\x00" + struct.pack(">QQ", 2**64 - 4096, 4096), "beyond RAM block"),
    (b"\x00\x04nope\x00" + struct.pack(">QQ", 0, 4096), "unknown RAM block 'nope'"),
    (b"\x00\x06pc.ram\x00" + struct.pack(">QQ", 100, 4096), "is not whole pages"),
    (b"\x00\x06pc.ram\x00" + struct.pack(">QQ", 0, 0), "is not whole pages"),
    (b"\x01\x06pc.ram\x00" + struct.pack(">QQ", 0, 4096), "version 1"),
    (b"\x00\x06pc.ram\x01" + struct.pack(">QQ", 0, 4096), "not NUL-terminated"),
    (b"\x00\x06pc.ram\x00" + struct.pack(">QQ", 0, 4096) + b"\x00", "not whole"),
    (b"\x00\x06pc.ram\x00", "too short"),
    (b"\x00\xffpc.ram\x00" + struct.pack(">QQ", 0, 4096), "not NUL-terminated"),
])
def test_bad_discard_is_refused(data, error):
    state = pc.IncomingPostcopy(BLOCKS)
    state.on_advise(_cmd(pc.advise())[1])
    with pytest.raises(StreamError, match=error):
        state.on_discard(data)


@pytest.mark.parametrize("data, enabled, error", [
    (struct.pack(">QQ", 4096, 8192), True, "target pages are 8192 bytes"),
    (struct.pack(">QQ", 0x201000, 4096), True, "huge pages are not supported"),
    (b"\x00" * 8, True, "8 bytes of data"),
    (b"", True, "enabled here but the source's POSTCOPY_ADVISE is empty"),
    (struct.pack(">QQ", 4096, 4096), False, "postcopy-ram is not set here"),
])
def test_bad_advise_is_refused(data, enabled, error):
    with pytest.raises(StreamError, match=error):
        pc.IncomingPostcopy(BLOCKS, enabled).on_advise(data)


def test_empty_advise_without_capability_is_no_postcopy():
    state = pc.IncomingPostcopy(BLOCKS, enabled=False)
    assert state.on_advise(b"") is None and state.state is pc.State.NONE


def test_packaged_limits():
    state = pc.IncomingPostcopy(BLOCKS)
    state.on_advise(_cmd(pc.advise())[1])
    with pytest.raises(StreamError, match="exceeds the 16777216-byte limit"):
        state.on_packaged(struct.pack(">I", (1 << 24) + 1))
    with pytest.raises(StreamError, match="empty PACKAGED"):
        state.on_packaged(struct.pack(">I", 0))
    with pytest.raises(StreamError, match="expected 4"):
        state.on_packaged(b"\x00\x01")
    with pytest.raises(ValueError, match="exceeds"):
        pc.packaged(bytes((1 << 24) + 1))
    state = pc.IncomingPostcopy(BLOCKS)
    state.on_advise(_cmd(pc.advise())[1])
    state.on_packaged(struct.pack(">I", 100))
    state.on_listen(b"")
    state.on_run(b"")
    with pytest.raises(StreamError, match="ended after 60"):
        state.end_package(60)


def test_page_requests_round_trip_and_refusals():
    reqs = rp.PageRequests(BLOCKS)
    mtype, data, rest = _rp(rp.req_pages(0x5000, 0x2000, "extra"))
    assert mtype == rp.RP_REQ_PAGES_ID and not rest
    assert data == struct.pack(">QI", 0x5000, 0x2000) + b"\x05extra"
    assert reqs.parse(mtype, data) == rp.PageRequest("extra", 0x5000, 0x2000)
    mtype, data, _ = _rp(rp.req_pages(0x9000, 0x1000))
    assert mtype == rp.RP_REQ_PAGES and len(data) == 12
    assert reqs.parse(mtype, data) == rp.PageRequest("extra", 0x9000, 0x1000)  # same block as the last
    with pytest.raises(StreamError, match="page request: range 0x100000\\+0x1000 beyond RAM block 'extra'"):
        reqs.parse(*_rp(rp.req_pages(1 << 20, 4096))[:2])
    with pytest.raises(StreamError, match="unknown RAM block 'x'"):
        reqs.parse(*_rp(rp.req_pages(0, 4096, "x"))[:2])
    with pytest.raises(StreamError, match="not whole pages"):
        reqs.parse(*_rp(rp.req_pages(10, 4096, "pc.ram"))[:2])
    with pytest.raises(StreamError, match="no block named"):
        rp.PageRequests(BLOCKS).parse(*_rp(rp.req_pages(0, 4096))[:2])
    with pytest.raises(StreamError, match="REQ_PAGES_ID of 14 bytes is malformed"):
        reqs.parse(rp.RP_REQ_PAGES_ID, struct.pack(">QI", 0, 4096) + b"\x05x")
    with pytest.raises(StreamError, match="REQ_PAGES of 11 bytes"):
        reqs.parse(rp.RP_REQ_PAGES, bytes(11))
    with pytest.raises(StreamError, match="not a page request"):
        reqs.parse(2, bytes(4))


@pytest.mark.parametrize("pages", [1, 63, 64, 65, 1000, 16384])
def test_recv_bitmap_reply_round_trip(pages):
    rng = np.random.default_rng(pages)
    received = rng.random(pages) < 0.3
    msg = rp.recv_bitmap_reply("pc.ram", received)
    mtype, data, trailer = _rp(msg)
    assert mtype == rp.RP_RECV_BITMAP and rp.parse_recv_bitmap_header(data) == "pc.ram"
    size = struct.unpack_from(">Q", trailer)[0]
    assert size % 8 == 0 and len(trailer) == 8 + size + 8
    # Little-endian bitmap: page i is bit i % 8 of byte i // 8.
    for i in np.flatnonzero(received)[:20]:
        assert trailer[8 + i // 8] >> (i % 8) & 1
    src = io.BytesIO(trailer)
    assert np.array_equal(rp.read_recv_bitmap(src.read, pages), received)


def test_recv_bitmap_reply_refusals():
    _, _, trailer = _rp(rp.recv_bitmap_reply("pc.ram", np.ones(100, np.bool_)))
    with pytest.raises(StreamError, match="for a block of 200 pages"):
        rp.read_recv_bitmap(io.BytesIO(trailer).read, 200)
    bad = trailer[:-1] + b"\x00"
    with pytest.raises(StreamError, match="received bitmap ends with"):
        rp.read_recv_bitmap(io.BytesIO(bad).read, 100)
    with pytest.raises(StreamError, match="does not hold one block name"):
        rp.parse_recv_bitmap_header(b"\x09pc.ram")


def test_resume_ack():
    mtype, data, _ = _rp(rp.resume_ack())
    assert mtype == rp.RP_RESUME_ACK
    rp.parse_resume_ack(data)
    with pytest.raises(StreamError, match="expected 1"):
        rp.parse_resume_ack(struct.pack(">I", 2))
