"""QMP framing: the server reads a byte stream of concatenated JSON objects
(qemu.qmp sends them without newlines) and writes one object per CRLF line."""

from __future__ import annotations

import json
import re

MAX_PENDING = 1 << 20  # an unfinished value larger than this is garbage
MAX_DEPTH = 1024  # nesting limit, as QEMU's parser has
INT_RANGE = (-(1 << 63), 1 << 64)  # wider integers become numbers, as in QEMU


class FramingError(ValueError):
    pass


# Bytes that matter to the scanner. UTF-8 continuation bytes are never ASCII,
# so scanning bytes is safe; only whole values are decoded.
_BETWEEN = re.compile(rb"[^ \t\r\n]")
_OUTSIDE = re.compile(rb'[{}\[\]"\x00-\x08\x0b\x0c\x0e-\x1f\xff]')
_INSIDE = re.compile(rb'["\\\x00-\x08\x0b\x0c\x0e-\x1f\xff]')
_RESYNC = re.compile(rb"[{\[]")
_CLOSER = {ord("{"): ord("}"), ord("["): ord("]")}
_CONTROL = frozenset([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0xFF])


def _number(text: str) -> int | float:
    value = int(text)
    return value if INT_RANGE[0] <= value < INT_RANGE[1] else float(text)


def _no_constant(name: str):
    raise ValueError(f"invalid literal {name}")


class JsonStream:
    """Incremental decoder: feed bytes, get complete JSON values.

    It tracks nesting outside strings, so a value is decoded only once its
    closing bracket arrived. Bad input yields one FramingError, then the
    parser skips to the next '{' and stays quiet until a value decodes again
    (a flood of garbage costs one reply, not one per byte). A control
    character or 0xFF resets it, as in QEMU.
    """

    def __init__(self, max_pending: int = MAX_PENDING, max_depth: int = MAX_DEPTH) -> None:
        self.max_pending = max_pending
        self.max_depth = max_depth
        self.buf = bytearray()
        self.pos = 0  # next byte to scan
        self.start = -1  # where the value being scanned began; -1 between values
        self.stack = bytearray()  # closers expected, innermost last
        self.in_string = False
        self.quiet = False

    def feed(self, data: bytes) -> list:
        self.buf += data
        out: list = []
        buf, n = self.buf, len(self.buf)
        while self.pos < n:
            if self.start < 0:
                m = _BETWEEN.search(buf, self.pos)
                if m is None:
                    self.pos = n
                    break
                i, ch = m.start(), buf[m.start()]
                if ch in _CLOSER:
                    self.start, self.pos = i, i + 1
                    self.stack = bytearray([_CLOSER[ch]])
                elif ch in _CONTROL:
                    self.pos = i + 1  # a reset between values: nothing to drop
                else:
                    self._fail(out, "JSON parse error, expecting value")
                    self._resync(i)
                continue
            m = (_INSIDE if self.in_string else _OUTSIDE).search(buf, self.pos)
            if m is None:
                self.pos = n
                break
            i, ch = m.start(), buf[m.start()]
            self.pos = i + 1
            if ch in _CONTROL:
                self._fail(out, "JSON parse error, stray control character")
                self._reset()
            elif self.in_string:
                if ch == 0x5C:  # backslash: skip the escaped byte (wait for it if missing)
                    if i + 1 >= n:
                        self.pos = i
                        break
                    self.pos = i + 2
                else:
                    self.in_string = False
            elif ch == 0x22:
                self.in_string = True
            elif ch in _CLOSER:
                self.stack.append(_CLOSER[ch])
                if len(self.stack) > self.max_depth:
                    self._fail(out, "JSON parse error, nesting too deep")
                    self._resync(i + 1)
            elif self.stack.pop() != ch:
                self._fail(out, "JSON parse error, mismatched brackets")
                self._resync(i + 1)
            elif not self.stack:
                self._decode(bytes(buf[self.start:i + 1]), out)
                self.start = -1
        if self.start >= 0 and self.pos - self.start > self.max_pending:
            self._fail(out, "JSON parse error, object too large")
            self._resync(self.pos)
        keep = self.start if self.start >= 0 else self.pos
        del buf[:keep]  # once per feed: no quadratic copying on long garbage
        self.pos -= keep
        if self.start >= 0:
            self.start -= keep
        return out

    def _decode(self, chunk: bytes, out: list) -> None:
        try:
            value = json.loads(chunk, parse_int=_number, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            self._fail(out, f"JSON parse error, {exc}")
            return
        self.quiet = False
        out.append(value)

    def _fail(self, out: list, desc: str) -> None:
        if not self.quiet:
            out.append(FramingError(desc))
        self.quiet = True

    def _reset(self) -> None:
        self.start, self.stack, self.in_string = -1, bytearray(), False

    def _resync(self, at: int) -> None:
        """Drop the value in progress and skip to the next '{' or '['."""
        self._reset()
        m = _RESYNC.search(self.buf, at)
        self.pos = len(self.buf) if m is None else m.start()


def encode(obj: dict) -> bytes:
    return json.dumps(obj, separators=(", ", ": ")).encode() + b"\r\n"


def greeting(version: tuple[int, int, int], package: str) -> dict:
    major, minor, micro = version
    return {"QMP": {"version": {"qemu": {"major": major, "minor": minor, "micro": micro},
                                "package": package}, "capabilities": []}}


def error(cls: str, desc: str, id_=None) -> dict:
    out: dict = {"error": {"class": cls, "desc": desc}}
    if id_ is not None:
        out["id"] = id_
    return out
