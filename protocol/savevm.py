"""QEMU's savevm stream, version 3: the wire between hosts.

Everything is big-endian. See docs/stream-format.md for the layout. This module
knows bytes and records only; what a section means to a guest is decided by the
handlers that the receiving actor registers with `StreamLoader`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from livemig.machine.ram import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from livemig.protocol.ram import RamLoader

MAGIC = 0x5145564D  # "QEVM"
VERSION = 3
VERSION_COMPAT = 2

EOF = 0x00
SECTION_START = 0x01
SECTION_PART = 0x02
SECTION_END = 0x03
SECTION_FULL = 0x04
SUBSECTION = 0x05
VMDESCRIPTION = 0x06
CONFIGURATION = 0x07
COMMAND = 0x08
SECTION_FOOTER = 0x7E

SECTION_NAMES = {
    EOF: "EOF", SECTION_START: "START", SECTION_PART: "PART", SECTION_END: "END",
    SECTION_FULL: "FULL", SUBSECTION: "SUBSECTION", VMDESCRIPTION: "VMDESCRIPTION",
    CONFIGURATION: "CONFIGURATION", COMMAND: "COMMAND", SECTION_FOOTER: "FOOTER",
}

# COMMAND sub-commands (be16) that livemig sends or understands.
CMD_OPEN_RETURN_PATH = 1
CMD_PING = 2
# The rest of QEMU's numbering, so that a refusal can say what was sent.
COMMAND_NAMES = {1: "OPEN_RETURN_PATH", 2: "PING", 3: "POSTCOPY_ADVISE", 4: "POSTCOPY_LISTEN",
                 5: "POSTCOPY_RUN", 6: "POSTCOPY_RAM_DISCARD", 7: "PACKAGED", 8: "ENABLE_COLO",
                 9: "POSTCOPY_RESUME", 10: "RECV_BITMAP", 11: "SWITCHOVER_START"}

GLOBALSTATE_RUNSTATE_LEN = 100
# QEMU's vmdesc for a q35 guest with a dozen devices is 70 KiB; decoded
# JSON costs up to 20 times its text, so this bounds it to about 20 MiB.
MAX_VMDESC = 1 << 20
MAX_MACHINE_NAME = 256
MAX_CAPABILITIES = 64  # in the configuration section (QEMU 9.2 knows 2)

_be32 = struct.Struct(">I")
_be64 = struct.Struct(">Q")


class StreamError(ValueError):
    """A stream that is malformed or that this destination cannot accept."""


def encode_idstr(name: str) -> bytes:
    """A length-prefixed id string, as section headers and RAM records carry it."""
    raw = name.encode()
    if not 0 < len(raw) < 256:
        raise ValueError(f"id string {name!r} must be 1..255 bytes")
    return bytes([len(raw)]) + raw


# --------------------------------------------------------------------------- writing


def header() -> bytes:
    return _be32.pack(MAGIC) + _be32.pack(VERSION)


def configuration(machine: str) -> bytes:
    raw = machine.encode()
    return bytes([CONFIGURATION]) + _be32.pack(len(raw)) + raw


def section_start(kind: int, section_id: int, idstr: str, instance_id: int, version: int) -> bytes:
    return (bytes([kind]) + _be32.pack(section_id) + encode_idstr(idstr)
            + _be32.pack(instance_id) + _be32.pack(version))


def section_part(kind: int, section_id: int) -> bytes:
    return bytes([kind]) + _be32.pack(section_id)


def footer(section_id: int) -> bytes:
    return bytes([SECTION_FOOTER]) + _be32.pack(section_id)


def command(cmd: int, data: bytes = b"") -> bytes:
    return bytes([COMMAND]) + struct.pack(">HH", cmd, len(data)) + data


def eof() -> bytes:
    return bytes([EOF])


def vmdescription(desc: dict) -> bytes:
    """The JSON trailer. Padded so that no byte of its be32 length is '{':
    analyze-migration.py finds the JSON by searching for that byte."""
    text = json.dumps(desc, separators=(",", ":")).encode()
    while b"{" in _be32.pack(len(text)):
        text += b" "
    return bytes([VMDESCRIPTION]) + _be32.pack(len(text)) + text


def globalstate(runstate: str) -> bytes:
    raw = runstate.encode()
    return _be32.pack(len(raw) + 1) + raw.ljust(GLOBALSTATE_RUNSTATE_LEN, b"\0")


GLOBALSTATE_DESC = {
    "name": "globalstate", "instance_id": 0, "vmsd_name": "globalstate", "version": 1,
    "fields": [{"name": "size", "type": "uint32", "size": 4},
               {"name": "runstate", "type": "buffer", "size": GLOBALSTATE_RUNSTATE_LEN}],
}


# --------------------------------------------------------------------------- reading


class BufferedReader:
    """A byte reader over `read_into(memoryview) -> int` with a large buffer,
    so that runs of page records can be decoded in bulk."""

    def __init__(self, read_into: Callable[[memoryview], int], capacity: int = 8 << 20) -> None:
        self._read_into = read_into
        self.buf = bytearray(capacity)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.consumed = 0  # bytes handed out so far

    def available(self) -> int:
        return self.end - self.start

    def fill(self, need: int) -> None:
        """Make at least `need` bytes available, or raise StreamError at end of input."""
        if need > len(self.buf):
            raise StreamError(f"record of {need} bytes exceeds the reader's buffer")
        while self.end - self.start < need:
            if self.start and len(self.buf) - self.start < need + (len(self.buf) >> 2):
                n = self.end - self.start
                self.buf[:n] = bytes(self.view[self.start:self.end])
                self.start, self.end = 0, n
            got = self._read_into(self.view[self.end:])
            if not got:
                raise StreamError(
                    f"stream ended early: wanted {need} more bytes at offset "
                    f"{self.consumed}, got {self.end - self.start}")
            self.end += got

    def try_fill(self) -> bool:
        """One read if there is room; False at end of input."""
        if self.start and self.start == self.end:
            self.start = self.end = 0
        if self.end == len(self.buf):
            return True
        got = self._read_into(self.view[self.end:])
        self.end += got
        return bool(got)

    def take(self, n: int) -> memoryview:
        self.fill(n)
        out = self.view[self.start:self.start + n]
        self.start += n
        self.consumed += n
        return out

    def skip(self, n: int) -> None:
        self.start += n
        self.consumed += n

    def u8(self) -> int:
        self.fill(1)
        b = self.buf[self.start]
        self.start += 1
        self.consumed += 1
        return b

    def peek_u8(self) -> int:
        self.fill(1)
        return self.buf[self.start]

    def be16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def be32(self) -> int:
        return _be32.unpack(self.take(4))[0]

    def be64(self) -> int:
        return _be64.unpack(self.take(8))[0]

    def idstr(self) -> str:
        n = self.u8()
        raw = bytes(self.take(n))
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise StreamError(f"id string is not UTF-8: {raw!r}") from None



class LiveLoader(Protocol):
    """The loader of an iterative section (START, PARTs, END): ram, block."""

    def load(self, r: BufferedReader, version: int) -> None: ...


DeviceLoader = Callable[[BufferedReader, int, int], None]
"""A FULL-section loader: (reader, instance_id, version_id) -> None."""


@dataclass
class LoadResult:
    machine: str | None = None
    configuration: dict = field(default_factory=dict)
    sections: list[tuple[str, int, int]] = field(default_factory=list)  # (idstr, instance, version)
    return_path: bool = False
    vmdesc: dict | None = None
    bytes: int = 0


class StreamLoader:
    """Reads a whole stream, dispatching each section to its loader.

    Raises StreamError for anything malformed or unknown; the caller must not
    run the guest unless `load()` returned normally (EOF was reached).
    """

    def __init__(self, ram: RamLoader | None, devices: dict[str, DeviceLoader],
                 machine: str | None = None,
                 on_return_path: Callable[[], None] | None = None,
                 live: dict[str, LiveLoader] | None = None,
                 on_ping: Callable[[int], None] | None = None,
                 on_command: Callable[[int, bytes, BufferedReader], None] | None = None) -> None:
        """on_command: the other commands (post-copy's), with the reader so that
        a PACKAGED blob can be bounded; without it they are refused."""
        self.ram = ram
        self.devices = devices
        self.live: dict[str, LiveLoader] = dict(live or {})
        if ram is not None:
            self.live["ram"] = ram
        self.machine = machine
        self.on_return_path = on_return_path
        self.on_ping = on_ping
        self.on_command = on_command
        self.return_path = False  # the source asked for answers on the return path
        self.open_sections: dict[int, tuple[str, int]] = {}  # section id -> (idstr, version)
        # Each live section starts once, each device section comes once: a
        # stream of repeats must not grow what the destination keeps.
        self.started: set[str] = set()
        self.loaded: set[tuple[str, int]] = set()
        self.refusal: str | None = None  # the stream is refused; reading on only to say more

    def load(self, r: BufferedReader, read_trailer: bool = True) -> LoadResult:
        result = LoadResult()
        magic = r.be32()
        if magic != MAGIC:
            raise StreamError(f"not a savevm stream: magic {magic:#010x}, expected {MAGIC:#010x} ('QEVM')")
        version = r.be32()
        if version == VERSION_COMPAT:
            raise StreamError("savevm stream version 2 is obsolete and not supported")
        if version != VERSION:
            raise StreamError(f"unsupported savevm stream version {version} (need {VERSION})")
        self._sections(r, result)
        if read_trailer:
            result.vmdesc = self.trailer(r)
        result.bytes = r.consumed
        return result

    def resume(self, r: BufferedReader) -> LoadResult:
        """Go on loading a stream that broke off, on a new connection (post-copy
        recovery: no header; the source starts again at a record boundary)."""
        result = LoadResult()
        self._sections(r, result)
        result.bytes = r.consumed
        return result

    def _sections(self, r: BufferedReader, result: LoadResult) -> None:
        """Records up to EOF."""
        while True:
            kind = r.u8()
            if kind == EOF:
                break
            if kind == CONFIGURATION:
                result.machine = self._configuration(r, result)
            elif kind == COMMAND:
                self._command(r, result)
            elif kind in (SECTION_START, SECTION_FULL):
                sid = r.be32()
                idstr = r.idstr()
                instance = r.be32()
                ver = r.be32()
                if idstr in self.live and instance == 0:
                    if kind == SECTION_FULL:
                        raise StreamError(f"{idstr} section sent as FULL")
                    if idstr in self.started:
                        raise StreamError(f"section {idstr!r} started a second time (section id {sid})")
                    self.started.add(idstr)
                    result.sections.append((idstr, instance, ver))
                    self.open_sections[sid] = (idstr, ver)
                    self.live[idstr].load(r, ver)
                elif kind == SECTION_FULL and idstr in self.devices:
                    if (idstr, instance) in self.loaded:
                        raise StreamError(f"section {idstr!r} instance {instance} sent a second time")
                    self.loaded.add((idstr, instance))
                    result.sections.append((idstr, instance, ver))
                    self.devices[idstr](r, instance, ver)
                    if r.peek_u8() == SUBSECTION:
                        # Optional device state the loader does not know (e.g. QEMU's
                        # timer/icount): refuse rather than drop it.
                        r.u8()
                        raise StreamError(f"section {idstr!r} carries subsection {r.idstr()!r}, "
                                          "which this machine cannot load")
                else:
                    machine = f" {self.machine!r}" if self.machine else ""
                    unknown = (f"unknown savevm section or instance {idstr!r} {instance} "
                               f"(version {ver}): this{machine} machine cannot load it")
                    if self.refusal:
                        raise StreamError(f"{self.refusal}; the first section it lacks: {unknown}")
                    raise StreamError(unknown)
                self._footer(r, sid)
            elif kind in (SECTION_PART, SECTION_END):
                sid = r.be32()
                opened = self.open_sections.get(sid)
                if opened is None:
                    raise StreamError(f"{SECTION_NAMES[kind]} for unknown section id {sid}")
                self.live[opened[0]].load(r, opened[1])
                if kind == SECTION_END:
                    del self.open_sections[sid]
                self._footer(r, sid)
            else:
                raise StreamError(f"unknown section type {kind:#04x} at offset {r.consumed - 1}")
        if self.refusal:
            raise StreamError(self.refusal)
        if self.ram is not None and not self.ram.sized:
            raise StreamError("stream ended without a RAM block list")

    def _configuration(self, r: BufferedReader, result: LoadResult) -> str:
        config = read_configuration(r)
        result.configuration = config
        name = config["machine"]
        if self.machine is not None and name != self.machine:
            # Refused; but read on (RAM discarded, nothing started) to name the
            # first section this machine does not have, which says more.
            self.refusal = (f"configuration section: machine type received is {name!r} and local is "
                            f"{self.machine!r}; a {self.machine!r} guest cannot load that machine's sections")
            if self.ram is not None:
                self.live["ram"] = self.ram.skipper()
        return name

    def _command(self, r: BufferedReader, result: LoadResult) -> None:
        cmd = r.be16()
        length = r.be16()
        data = bytes(r.take(length))
        if cmd == CMD_OPEN_RETURN_PATH:
            result.return_path = self.return_path = True
            if self.on_return_path:
                self.on_return_path()
        elif cmd == CMD_PING:
            # QEMU pings right after opening the return path and expects a PONG with the value.
            if length != 4:
                raise StreamError(f"PING command with {length} bytes of data (expected 4)")
            if not self.return_path:
                raise StreamError("PING command received with no return path open")
            if self.on_ping:
                self.on_ping(_be32.unpack(data)[0])
        elif self.on_command is not None and cmd in COMMAND_NAMES:
            self.on_command(cmd, data, r)
        else:
            name = COMMAND_NAMES.get(cmd, "unknown")
            raise StreamError(f"unsupported stream command {cmd} ({name})")

    def _footer(self, r: BufferedReader, sid: int) -> None:
        if r.peek_u8() != SECTION_FOOTER:
            raise StreamError(f"missing footer for section {sid} at offset {r.consumed}")
        r.u8()
        got = r.be32()
        if got != sid:
            raise StreamError(f"footer for section {got} where {sid} was expected")

    def trailer(self, r: BufferedReader) -> dict | None:
        """The JSON trailer after EOF, or None if the stream ends there. For a
        caller that loaded with read_trailer=False, to read it on its own terms."""
        try:
            kind = r.u8()
        except StreamError:
            return None  # no trailer: QEMU does not need one either
        if kind != VMDESCRIPTION:
            raise StreamError(f"unexpected byte {kind:#04x} after EOF")
        n = r.be32()
        if n > MAX_VMDESC:
            raise StreamError(f"vmdesc of {n} bytes is too large")
        try:
            return json.loads(bytes(r.take(n)))
        except ValueError as exc:
            raise StreamError(f"vmdesc is not JSON: {exc}") from None
        except RecursionError:  # the decoder counts its depth: nothing grows past the limit
            raise StreamError("vmdesc nests deeper than any machine description") from None


# Subsections of QEMU's configuration section (vmstate "configuration").
CONFIG_PAGE_BITS = "configuration/target-page-bits"
CONFIG_CAPABILITIES = "configuration/capabilities"
CONFIG_UUID = "configuration/uuid"
# Capabilities that change how RAM travels: a stream made with them cannot be read here.
RAM_FORMAT_CAPABILITIES = ("x-ignore-shared", "mapped-ram")


def read_configuration(r: BufferedReader) -> dict:
    """The body of a CONFIGURATION record: machine name, then the optional
    subsections QEMU sends when they matter (page size, capabilities, UUID)."""
    n = r.be32()
    if n > MAX_MACHINE_NAME:
        raise StreamError(f"machine name of {n} bytes in the configuration section")
    config: dict = {"machine": bytes(r.take(n)).decode(errors="replace")}
    while r.peek_u8() == SUBSECTION:
        r.u8()
        name = r.idstr()
        r.be32()  # subsection version: every known one is 1
        if name == CONFIG_PAGE_BITS:
            bits = r.be32()
            if bits != PAGE_SHIFT:
                raise StreamError(f"stream uses target pages of {1 << bits} bytes; livemig needs {PAGE_SIZE}")
            config["target-page-bits"] = bits
        elif name == CONFIG_CAPABILITIES:
            count = r.be32()
            if count > MAX_CAPABILITIES:
                raise StreamError(f"configuration section lists {count} capabilities")
            caps = [r.idstr() for _ in range(count)]
            refused = [c for c in caps if c in RAM_FORMAT_CAPABILITIES]
            if refused:
                raise StreamError(f"stream was made with capability {refused[0]!r}, which changes the RAM "
                                  "format; livemig cannot read it")
            config["capabilities"] = caps
        elif name == CONFIG_UUID:
            config["uuid"] = bytes(r.take(16)).hex()  # livemig guests have no UUID to check it against
        else:
            raise StreamError(f"unsupported configuration subsection {name!r}")
    return config


def read_globalstate(r: BufferedReader, version: int) -> str:
    if version != 1:
        raise StreamError(f"globalstate version {version} unsupported")
    size = r.be32()
    raw = bytes(r.take(GLOBALSTATE_RUNSTATE_LEN))
    if size > GLOBALSTATE_RUNSTATE_LEN:
        raise StreamError(f"globalstate run state of {size} bytes")
    return raw[:size].split(b"\0", 1)[0].decode(errors="replace")
