"""QMP framing: the server reads a byte stream of concatenated JSON objects
(qemu.qmp sends them without newlines) and writes one object per CRLF line."""

from __future__ import annotations

import json
import re
import time

MAX_PENDING = 1 << 20  # an unfinished object larger than this is garbage


class FramingError(ValueError):
    pass


_OUTSIDE = re.compile(r'[{}\[\]"\x00-\x08\x0b\x0c\x0e-\x1f\xff]')
_INSIDE = re.compile(r'["\\]')


class JsonStream:
    """Incremental decoder: feed bytes, get complete JSON values.

    It tracks nesting depth outside strings, so an object is decoded only
    once its closing brace arrived. Bad input yields a FramingError in the
    output and the parser skips ahead, as QEMU's JSON streamer does; a control
    character resets it.
    """

    def __init__(self) -> None:
        self.buf = ""
        self.scan = 0
        self.depth = 0
        self.in_string = False
        self.stack: list[str] = []
        self.pending = b""

    def feed(self, data: bytes) -> list:
        data = self.pending + data
        self.pending = b""
        try:
            text = data.decode()
        except UnicodeDecodeError as exc:
            if exc.reason == "unexpected end of data":
                text, self.pending = data[:exc.start].decode(errors="replace"), data[exc.start:]
            else:
                text = data.decode(errors="replace")
        self.buf += text
        out: list = []
        while True:
            if self.depth == 0 and not self.in_string:
                # Between values: only whitespace may stand before the next one.
                stripped = self.buf.lstrip(" \t\r\n")
                if stripped and stripped[0] not in "{[":
                    nxt = stripped.find("{")
                    out.append(FramingError("JSON parse error, expecting value"))
                    stripped = "" if nxt < 0 else stripped[nxt:]
                self.buf, self.scan = stripped, 0
                if not self.buf:
                    return out
            pattern = _INSIDE if self.in_string else _OUTSIDE
            m = pattern.search(self.buf, self.scan)
            if m is None:
                self.scan = len(self.buf)
                if len(self.buf) > MAX_PENDING:
                    out.append(FramingError("JSON parse error, object too large"))
                    self.reset()
                return out
            ch = m.group()
            i = m.start()
            self.scan = i + 1
            if self.in_string:
                if ch == "\\":
                    if i + 1 >= len(self.buf):
                        self.scan = i
                        return out
                    self.scan = i + 2
                else:
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.stack.append("}" if ch == "{" else "]")
                self.depth += 1
            elif ch in "}]":
                if self.stack.pop() != ch:
                    out.append(FramingError("JSON parse error, mismatched brackets"))
                    self.buf = self.buf[i + 1:]
                    self.scan, self.depth, self.in_string, self.stack = 0, 0, False, []
                    continue
                self.depth -= 1
                if self.depth == 0:
                    chunk, self.buf, self.scan = self.buf[:i + 1], self.buf[i + 1:], 0
                    try:
                        out.append(json.loads(chunk))
                    except ValueError as exc:
                        out.append(FramingError(f"JSON parse error, {exc}"))
            else:  # control character: drop what was pending, as QEMU does
                out.append(FramingError("JSON parse error, stray control character"))
                self.buf = self.buf[i + 1:]
                self.scan, self.depth, self.in_string, self.stack = 0, 0, False, []

    def reset(self) -> None:
        self.buf, self.scan, self.depth, self.in_string, self.stack = "", 0, 0, False, []


def encode(obj: dict) -> bytes:
    return json.dumps(obj, separators=(", ", ": ")).encode() + b"\r\n"


def timestamp() -> dict:
    now = time.time()
    return {"seconds": int(now), "microseconds": int(now % 1 * 1_000_000)}


def greeting(version: tuple[int, int, int], package: str) -> dict:
    major, minor, micro = version
    return {"QMP": {"version": {"qemu": {"major": major, "minor": minor, "micro": micro},
                                "package": package}, "capabilities": []}}


def error(cls: str, desc: str, id_=None) -> dict:
    out: dict = {"error": {"class": cls, "desc": desc}}
    if id_ is not None:
        out["id"] = id_
    return out
