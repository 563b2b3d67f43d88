"""Reading any savevm v3 stream from a file, QEMU's or livemig's: what is in
it (sections, versions, sizes, RAM blocks, the vmdesc trailer) and, on
request, the RAM it carries, one raw file per RAM block.

FULL device sections are skipped with the field sizes that the vmdesc
trailer gives (that is what the trailer is for), so a stream from a machine
livemig cannot host still reads, as long as its trailer describes it. Devices
livemig knows are decoded too. The receiver's codec (ram.RamLoader,
savevm.BufferedReader) does the reading, so what the tool accepts is what
a livemig destination accepts, minus the machine check.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field

import numpy as np

from livemig.machine.ram import PAGE_SIZE
from livemig.protocol import blockmig, savevm
from livemig.protocol.devices import DEVICES
from livemig.protocol.ram import RamBlock, RamLoader

_TRAILER_HEAD = 5  # type byte + be32 length


@dataclass
class Section:
    """One savevm section: a FULL one, or a live one with its START/PART/END pieces."""
    section_id: int
    name: str
    instance: int
    version: int
    kind: str  # "live" or "full"
    offset: int  # of its first header byte
    bytes: int = 0  # every piece, headers and footers included
    pieces: dict[str, int] = field(default_factory=dict)
    state: object = None  # decoded device state, for devices livemig knows (JSON's types)
    described: bool = False  # the vmdesc trailer describes it

    def as_dict(self) -> dict:
        out = {"section_id": self.section_id, "name": self.name, "instance": self.instance,
               "version": self.version, "kind": self.kind, "offset": self.offset, "bytes": self.bytes,
               "pieces": dict(self.pieces), "described": self.described}
        if self.state is not None:
            out["state"] = self.state
        return out


def _plain(value: object) -> object:
    """A decoded state as JSON can carry it: bytes (a digest) as hex."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@dataclass
class StreamInfo:
    path: str
    size: int
    configuration: dict = field(default_factory=dict)
    commands: list[dict] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    ram_blocks: list[tuple[str, int]] = field(default_factory=list)
    ram_pages: dict[str, int] = field(default_factory=dict)  # records: normal / zero
    drives: list[str] = field(default_factory=list)  # drives in a block migration section
    eof_offset: int | None = None
    vmdesc: dict | None = None
    vmdesc_offset: int | None = None
    ram_files: dict[str, str] = field(default_factory=dict)  # block -> extracted file

    def as_dict(self) -> dict:
        return {"path": self.path, "size": self.size, "version": savevm.VERSION,
                "configuration": self.configuration, "commands": self.commands,
                "sections": [s.as_dict() for s in self.sections],
                "ram_blocks": [{"name": n, "size": sz} for n, sz in self.ram_blocks],
                "ram_pages": self.ram_pages, "drives": self.drives, "eof_offset": self.eof_offset,
                "vmdesc_offset": self.vmdesc_offset, "vmdesc": self.vmdesc,
                "ram_files": self.ram_files}


def find_vmdesc(path: str) -> tuple[int, dict] | None:
    """Locate the vmdesc trailer that ends a stream file: the VMDESCRIPTION
    byte whose be32 length reaches exactly the end of the file and is
    followed by valid JSON. Returns (offset, description) or None."""
    size = os.path.getsize(path)
    span = min(size, savevm.MAX_VMDESC + _TRAILER_HEAD)
    with open(path, "rb") as f:
        f.seek(size - span)
        tail = np.frombuffer(f.read(span), np.uint8)
    if len(tail) < _TRAILER_HEAD + 2:
        return None
    pos = np.flatnonzero(tail[:-_TRAILER_HEAD] == savevm.VMDESCRIPTION)
    if not len(pos):
        return None
    length = np.zeros(len(pos), np.int64)
    for i in range(1, 5):
        length = (length << 8) | tail[pos + i].astype(np.int64)
    for p in pos[length == span - pos - _TRAILER_HEAD]:  # earliest first: the longest JSON
        body = tail[p + _TRAILER_HEAD:].tobytes()
        if not body.startswith(b"{"):
            continue
        try:
            desc = json.loads(body)
        except ValueError:
            continue
        if isinstance(desc, dict):
            return size - span + int(p), desc
    return None


def _block_file_name(name: str) -> str:
    """A RAM block's idstr as a file name ('/rom@etc/acpi/tables' has slashes)."""
    safe = name.replace("%", "%25").replace("/", "%2F")
    return "%2E" + safe[1:] if safe.startswith(".") else safe


def _skip_described(r: savevm.BufferedReader, desc: dict, where: str) -> bytes:
    """Read one vmstate as its vmdesc entry describes it: the fields' bytes,
    then each subsection behind its marker. Returns the fields' bytes (not
    the subsections'), which is what livemig's device loaders read."""
    chunks = []
    for f in desc.get("fields", []):
        size = f.get("size")
        if not isinstance(size, int) or size < 0:
            raise savevm.StreamError(f"vmdesc gives no size for field {f.get('name')!r} of {where}")
        chunks.append(bytes(r.take(size * int(f.get("array_len", 1)))))
    for sub in desc.get("subsections", []):
        name = sub.get("vmsd_name", "?")
        if r.u8() != savevm.SUBSECTION:
            raise savevm.StreamError(f"{where}: subsection {name!r} expected at offset {r.consumed - 1}")
        got = r.idstr()
        if got != name:
            raise savevm.StreamError(f"{where}: subsection {got!r} where the vmdesc says {name!r}")
        r.be32()
        _skip_described(r, sub, f"{where}/{name}")
    return b"".join(chunks)


def _decode(name: str, version: int, payload: bytes) -> object:
    """The state of a device livemig knows, from its field bytes; None if undecodable."""
    device = DEVICES.get(name)
    if device is None:
        return None
    try:
        return device.load(savevm.BufferedReader(io.BytesIO(payload).readinto, len(payload) + 1), version)
    except savevm.StreamError:
        return None


class _Scanner:
    def __init__(self, info: StreamInfo, ram_dir: str | None) -> None:
        self.info = info
        self.ram_dir = ram_dir
        self.maps: list[np.memmap] = []
        self.ram = RamLoader([], create_block=self.create_block)
        self.devices: dict[tuple[str, int], dict] = {}
        if info.vmdesc is not None:
            for d in info.vmdesc.get("devices", []):
                if isinstance(d, dict):
                    self.devices[(d.get("name"), d.get("instance_id"))] = d
        self.live: dict[int, Section] = {}
        # Block migration chunks are read and dropped: only which drives travel is shown.
        self.block = blockmig.BlockLoader(self.block_target)
        self.loaders = {"ram": self.ram, "block": self.block}

    def block_target(self, name: str) -> blockmig.BlockTarget:
        if name not in self.info.drives:
            self.info.drives.append(name)
        return blockmig.BlockTarget(1 << 62, lambda _o, _d: None, lambda _o, _n: None)

    def create_block(self, name: str, length: int) -> RamBlock:
        if length % PAGE_SIZE or length <= 0:
            raise savevm.StreamError(f"RAM block {name!r} of {length} bytes is not a whole number of pages")
        self.info.ram_blocks.append((name, length))
        npages = length // PAGE_SIZE
        if self.ram_dir is None:
            # Nothing to keep: every page lands on one scratch page (stride 0).
            scratch = np.zeros(PAGE_SIZE, np.uint8)
            pages = np.lib.stride_tricks.as_strided(scratch, (npages, PAGE_SIZE), (0, 1),
                                                    writeable=True)
        else:
            path = os.path.join(self.ram_dir, _block_file_name(name))
            with open(path, "wb") as f:
                f.truncate(length)  # pages the stream never sends read as zero, as in a fresh guest
            pages = np.memmap(path, np.uint8, "r+", shape=(npages, PAGE_SIZE))
            self.maps.append(pages)
            self.info.ram_files[name] = path
        return RamBlock(name, pages)

    def scan(self, r: savevm.BufferedReader) -> None:
        info = self.info
        magic = r.be32()
        if magic != savevm.MAGIC:
            raise savevm.StreamError(f"not a savevm stream: magic {magic:#010x}, expected "
                                     f"{savevm.MAGIC:#010x} ('QEVM')")
        version = r.be32()
        if version != savevm.VERSION:
            raise savevm.StreamError(f"savevm stream version {version} unsupported (need {savevm.VERSION})")
        while True:
            at = r.consumed
            kind = r.u8()
            if kind == savevm.EOF:
                info.eof_offset = at
                break
            if kind == savevm.CONFIGURATION:
                info.configuration = savevm.read_configuration(r)
            elif kind == savevm.COMMAND:
                cmd, length = r.be16(), r.be16()
                r.take(length)
                info.commands.append({"offset": at, "command": cmd, "length": length,
                                      "name": savevm.COMMAND_NAMES.get(cmd, "unknown")})
            elif kind in (savevm.SECTION_START, savevm.SECTION_FULL):
                self.start(r, kind, at)
            elif kind in (savevm.SECTION_PART, savevm.SECTION_END):
                sid = r.be32()
                sec = self.live.get(sid)
                if sec is None:
                    raise savevm.StreamError(f"{savevm.SECTION_NAMES[kind]} at offset {at} for section id "
                                             f"{sid}, which was never started")
                self.loaders[sec.name].load(r, sec.version)
                self.footer(r, sid)
                self.account(sec, kind, at, r.consumed)
            else:
                raise savevm.StreamError(f"unknown section type {kind:#04x} at offset {at}")
        info.ram_pages = {"normal": self.ram.stats.normal, "zero": self.ram.stats.zero}

    def start(self, r: savevm.BufferedReader, kind: int, at: int) -> None:
        sid = r.be32()
        name = r.idstr()
        instance, version = r.be32(), r.be32()
        sec = Section(sid, name, instance, version, "full" if kind == savevm.SECTION_FULL else "live", at)
        self.info.sections.append(sec)
        where = f"section {name!r} instance {instance}"
        if kind == savevm.SECTION_START:
            if name not in self.loaders or instance != 0:
                # The vmdesc never describes live sections: only those known here can be read.
                raise savevm.StreamError(f"cannot read live {where} (version {version}) at offset {at}: "
                                         f"only {' and '.join(map(repr, self.loaders))} are known")
            self.live[sid] = sec
            self.loaders[name].load(r, version)
        else:
            desc = self.devices.get((name, instance))
            if desc is not None:
                sec.described = True
                sec.state = _plain(_decode(name, version, _skip_described(r, desc, where)))
            elif name in DEVICES:
                sec.state = _plain(DEVICES[name].load(r, version))
            elif self.info.vmdesc is None:
                raise savevm.StreamError(f"cannot skip {where} at offset {at}: the stream has no vmdesc "
                                         "trailer to give its size")
            else:
                raise savevm.StreamError(f"cannot skip {where} at offset {at}: the vmdesc trailer does "
                                         "not describe it")
        self.footer(r, sid)
        self.account(sec, kind, at, r.consumed)

    @staticmethod
    def footer(r: savevm.BufferedReader, sid: int) -> None:
        if r.peek_u8() != savevm.SECTION_FOOTER:
            raise savevm.StreamError(f"section {sid}: footer expected at offset {r.consumed}")
        r.u8()
        got = r.be32()
        if got != sid:
            raise savevm.StreamError(f"footer for section {got} where {sid} was expected")

    @staticmethod
    def account(sec: Section, kind: int, start: int, end: int) -> None:
        piece = savevm.SECTION_NAMES[kind]
        sec.pieces[piece] = sec.pieces.get(piece, 0) + 1
        sec.bytes += end - start

    def close(self) -> None:
        for m in self.maps:
            m.flush()
        self.maps.clear()


def scan(path: str, ram_dir: str | None = None) -> StreamInfo:
    """Parse the savevm v3 stream in `path`. With `ram_dir`, write each RAM
    block there as one raw file holding the last content sent for each page.
    Raises StreamError (naming what is wrong and where) for what it cannot read."""
    info = StreamInfo(path=path, size=os.path.getsize(path))
    found = find_vmdesc(path)
    if found is not None:
        info.vmdesc_offset, info.vmdesc = found
    if ram_dir is not None:
        os.makedirs(ram_dir, exist_ok=True)
    scanner = _Scanner(info, ram_dir)
    try:
        with open(path, "rb") as f:
            r = savevm.BufferedReader(f.readinto)
            scanner.scan(r)
            # What follows EOF: nothing, or the trailer found above.
            rest = info.size - r.consumed
            if rest and info.vmdesc_offset != r.consumed:
                raise savevm.StreamError(f"{rest} bytes after EOF (offset {r.consumed}) that are not a "
                                         "vmdesc trailer")
    finally:
        scanner.close()
    return info
