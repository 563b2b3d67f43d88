"""The return path: messages from the destination back to the source on the
migration connection, each a be16 type, a be16 length and that many bytes.

A livemig destination answers a PING with PONG and reports the outcome of
the load with SHUT (be32 status, 0 for success, then a short reason as text,
which QEMU's SHUT lacks and ignores); a livemig source reads SHUT. A load
that fails sends X_FAILED (livemig's; QEMU has no such message) before its
SHUT and closes: a source still sending finds its write refused and reads
the cause.

Between two livemig hosts the hand-over adds X_HANDOVER (the destination's
state: loaded, running, abandoned) and a resolve connection on which a source
that lost its connection asks for it (docs/stream-format.md, docs/reliability.md).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from livemig.machine.ram import PAGE_SIZE
from livemig.protocol.savevm import StreamError

RP_SHUT = 1
RP_PONG = 2
# Post-copy's (protocol/postcopy.py has its commands on the main stream).
RP_REQ_PAGES_ID = 3  # be64 start, be32 length, u8 name length, name
RP_REQ_PAGES = 4  # be64 start, be32 length: the block of the last REQ_PAGES_ID
RP_RECV_BITMAP = 5
RP_RESUME_ACK = 6
RP_X_FAILED = 0x4C45  # livemig's ('LE'): the destination failed; the cause as text
RESUME_ACK_VALUE = 1
RECV_BITMAP_ENDING = 0x0123456789ABCDEF
MAX_SHUT_DESC = 200  # bytes of the reason a SHUT carries
# livemig's hand-over, far from QEMU's types: be32 state. A QEMU source never gets one.
RP_X_HANDOVER = 0x4C4D
HANDOVER_LOADED = 1  # everything loaded: the destination holds the guest's last state, waits for GO
HANDOVER_RUNNING = 2  # the guest runs on the destination
HANDOVER_ABANDONED = 3  # the destination never ran it and never will: the source holds it
HANDOVER_STATES = {HANDOVER_LOADED: "loaded", HANDOVER_RUNNING: "running", HANDOVER_ABANDONED: "abandoned"}
# The first bytes of a resolve connection (a migration's are QEMU's "QEVM"): the
# source asks, the destination answers X_HANDOVER; to LOADED the source says GO
# (devices.SWITCHOVER_GO: run it) or BACK (it never sent GO and takes the guest
# back), and the destination answers again (RUNNING, or ABANDONED).
RESOLVE_REQUEST = b"LMRQ"
RESOLVE_BACK = b"LMBK"
# The source's last word, on either connection, once it has the outcome: the
# destination need not answer resolves any more.
HANDOVER_DONE = b"LMOK"

_header = struct.Struct(">HH")
_be32 = struct.Struct(">I")
_be64 = struct.Struct(">Q")
_req = struct.Struct(">QI")


def block_name(name: str) -> bytes:
    """A RAM block's name as post-copy frames it: u8 length, then the name."""
    raw = name.encode()
    if not 0 < len(raw) < 256:
        raise ValueError(f"RAM block name {name!r} must be 1..255 bytes")
    return bytes([len(raw)]) + raw


def check_range(blocks: dict[str, int], block: str, start: int, length: int, what: str) -> None:
    """A byte range of a block: known block, page aligned, not empty, inside it."""
    size = blocks.get(block)
    if size is None:
        raise StreamError(f"{what}: unknown RAM block {block!r}")
    if start % PAGE_SIZE or length % PAGE_SIZE or not length:
        raise StreamError(f"{what}: range {start:#x}+{length:#x} of {block!r} is not whole pages")
    if start + length > size:
        raise StreamError(f"{what}: range {start:#x}+{length:#x} beyond RAM block {block!r} of {size} bytes")


class ReturnPathError(Exception):
    """The return path broke off inside a message."""


def message(mtype: int, data: bytes = b"") -> bytes:
    return _header.pack(mtype, len(data)) + data


def pong(value: int) -> bytes:
    return message(RP_PONG, _be32.pack(value))


def shut(rc: int, desc: str) -> bytes:
    return message(RP_SHUT, _be32.pack(rc) + desc.encode()[:MAX_SHUT_DESC])


def failed(desc: str) -> bytes:
    return message(RP_X_FAILED, desc.encode()[:MAX_SHUT_DESC])


def _exactly(recv: Callable[[int], bytes], n: int) -> bytes | None:
    """n bytes, or None if the peer closed first."""
    got = b""
    while len(got) < n:
        chunk = recv(n - len(got))
        if not chunk:
            return None
        got += chunk
    return got


def _next_message(recv: Callable[[int], bytes]) -> tuple[int, bytes] | None:
    """(type, body) of the next message, or None if the peer closed between messages."""
    header = _exactly(recv, _header.size)
    if header is None:
        return None
    mtype, length = _header.unpack(header)
    body = _exactly(recv, length)
    if body is None:
        raise ReturnPathError("return path cut mid-message")
    return mtype, body


def read_shut(recv: Callable[[int], bytes]) -> tuple[int, str] | None:
    """Read messages with `recv` (a socket's) up to the first SHUT or
    X_FAILED; returns (status, reason) (X_FAILED: status 1), or None if the
    peer closed between messages. Other messages are skipped."""
    while (msg := _next_message(recv)) is not None:
        mtype, body = msg
        length = len(body)
        if mtype == RP_SHUT and length >= 4:
            return _be32.unpack(body[:4])[0], body[4:].decode(errors="replace")
        if mtype == RP_X_FAILED:
            return 1, body.decode(errors="replace")
    return None


def handover(state: int) -> bytes:
    return message(RP_X_HANDOVER, _be32.pack(state))


def read_handover(recv: Callable[[int], bytes]) -> int | None:
    """Read messages up to the first X_HANDOVER; its state, or None if the
    peer closed between messages. Others (PONG, SHUT) are skipped."""
    while (msg := _next_message(recv)) is not None:
        mtype, body = msg
        if mtype == RP_X_HANDOVER:
            if len(body) != 4 or _be32.unpack(body)[0] not in HANDOVER_STATES:
                raise ReturnPathError(f"X_HANDOVER carries {body.hex() or 'nothing'}")
            return _be32.unpack(body)[0]
    return None


# --------------------------------------------------------------------------- post-copy


def req_pages(start: int, length: int, block: str | None = None) -> bytes:
    """A page request: REQ_PAGES_ID names the block; REQ_PAGES means the same block as before."""
    if block is None:
        return message(RP_REQ_PAGES, _req.pack(start, length))
    return message(RP_REQ_PAGES_ID, _req.pack(start, length) + block_name(block))


def resume_ack() -> bytes:
    return message(RP_RESUME_ACK, _be32.pack(RESUME_ACK_VALUE))


def recv_bitmap_reply(block: str, received: np.ndarray) -> bytes:
    """RECV_BITMAP message (u8 length + name) and, after it outside the framing,
    be64 size (a multiple of 8), the little-endian received bitmap, be64 ending."""
    bits = np.packbits(received.astype(np.bool_), bitorder="little").tobytes()
    bits += bytes(-len(bits) % 8)
    return (message(RP_RECV_BITMAP, block_name(block))
            + _be64.pack(len(bits)) + bits + _be64.pack(RECV_BITMAP_ENDING))


def parse_recv_bitmap_header(data: bytes) -> str:
    if not data or len(data) != data[0] + 1:
        raise StreamError(f"RECV_BITMAP reply header of {len(data)} bytes does not hold one block name")
    return data[1:].decode(errors="replace")


def read_recv_bitmap(read_exact: Callable[[int], bytes], pages: int) -> np.ndarray:
    """The trailer of a RECV_BITMAP reply for a block of `pages` pages: a bool per page."""
    size = _be64.unpack(read_exact(8))[0]
    want = -(-pages // 8)
    want += -want % 8
    if size != want:
        raise StreamError(f"received bitmap of {size} bytes for a block of {pages} pages (expected {want})")
    bits = np.unpackbits(np.frombuffer(read_exact(size), np.uint8), bitorder="little")[:pages].astype(np.bool_)
    ending = _be64.unpack(read_exact(8))[0]
    if ending != RECV_BITMAP_ENDING:
        raise StreamError(f"received bitmap ends with {ending:#018x}, expected {RECV_BITMAP_ENDING:#018x}")
    return bits


def parse_resume_ack(data: bytes) -> None:
    if len(data) != 4 or _be32.unpack(data)[0] != RESUME_ACK_VALUE:
        raise StreamError(f"RESUME_ACK carries {data.hex() or 'nothing'} (expected {RESUME_ACK_VALUE})")


@dataclass(frozen=True)
class PageRequest:
    block: str
    start: int  # bytes
    length: int


class PageRequests:
    """Validates page requests on the source against its RAM blocks."""

    def __init__(self, blocks: dict[str, int]) -> None:
        self.blocks = blocks
        self.last: str | None = None

    def parse(self, mtype: int, data: bytes) -> PageRequest:
        if mtype == RP_REQ_PAGES_ID:
            if len(data) < _req.size + 1 or len(data) != _req.size + 1 + data[_req.size]:
                raise StreamError(f"REQ_PAGES_ID of {len(data)} bytes is malformed")
            block = data[_req.size + 1:].decode(errors="replace")
            self.last = block
        elif mtype == RP_REQ_PAGES:
            if len(data) != _req.size:
                raise StreamError(f"REQ_PAGES of {len(data)} bytes (expected {_req.size})")
            if self.last is None:
                raise StreamError("REQ_PAGES with no block named by an earlier REQ_PAGES_ID")
            block = self.last
        else:
            raise StreamError(f"return-path message {mtype} is not a page request")
        start, length = _req.unpack_from(data)
        check_range(self.blocks, block, start, length, "page request")
        return PageRequest(block, start, length)
