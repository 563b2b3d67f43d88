"""The return path: messages from the destination back to the source on the
migration connection, each a be16 type, a be16 length and that many bytes.

A livemig destination answers a PING with PONG and reports the outcome of
the load with SHUT (be32 status, 0 for success, then a short reason as text,
which QEMU's SHUT lacks and ignores); a livemig source reads SHUT.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

RP_SHUT = 1
RP_PONG = 2
MAX_SHUT_DESC = 200  # bytes of the reason a SHUT carries

_header = struct.Struct(">HH")
_be32 = struct.Struct(">I")


class ReturnPathError(Exception):
    """The return path broke off inside a message."""


def message(mtype: int, data: bytes = b"") -> bytes:
    return _header.pack(mtype, len(data)) + data


def pong(value: int) -> bytes:
    return message(RP_PONG, _be32.pack(value))


def shut(rc: int, desc: str) -> bytes:
    return message(RP_SHUT, _be32.pack(rc) + desc.encode()[:MAX_SHUT_DESC])


def _exactly(recv: Callable[[int], bytes], n: int) -> bytes | None:
    """n bytes, or None if the peer closed first."""
    got = b""
    while len(got) < n:
        chunk = recv(n - len(got))
        if not chunk:
            return None
        got += chunk
    return got


def read_shut(recv: Callable[[int], bytes]) -> tuple[int, str] | None:
    """Read messages with `recv` (a socket's) up to the first SHUT; returns
    its (status, reason), or None if the peer closed between messages. Other
    messages are skipped."""
    while True:
        header = _exactly(recv, _header.size)
        if header is None:
            return None
        mtype, length = _header.unpack(header)
        body = _exactly(recv, length)
        if body is None:
            raise ReturnPathError("return path cut mid-message")
        if mtype == RP_SHUT and length >= 4:
            return _be32.unpack(body[:4])[0], body[4:].decode(errors="replace")
