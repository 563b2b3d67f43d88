"""The savevm stream codec on its own: what we write, we read back; what is
malformed is refused with a StreamError that says why."""

import io
import json
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.protocol import savevm
from livemig.protocol.ram import RAM_PAGE, PageEncoder, RamBlock, RamLoader, ram_eos, ram_mem_size

PAGES = 64


def make_ram(seed=1):
    rng = np.random.default_rng(seed)
    ram = rng.integers(0, 255, (PAGES, 4096), np.uint8, endpoint=True)
    ram[::3] = 0
    return ram


def build_stream(ram, name="pc.ram", size=None, machine="pc", version=3, magic=savevm.MAGIC,
                 regs=None) -> bytes:
    size = PAGES * 4096 if size is None else size
    out = [struct.pack(">II", magic, version), savevm.configuration(machine),
           savevm.section_start(savevm.SECTION_START, 2, "ram", 0, 4),
           ram_mem_size([(name, size)]), ram_eos(), savevm.footer(2)]
    enc = PageEncoder(16)
    for start in range(0, PAGES, 16):
        if start % 32 == 0:
            out.append(savevm.section_part(savevm.SECTION_PART if start else savevm.SECTION_PART, 2))
            enc.new_section()
        idx = np.arange(start, start + 16)
        zero = ~ram[idx].any(axis=1)
        out += [bytes(b) for b in enc.encode(name, idx, ram, zero)]
        if start % 32 == 16:
            out += [ram_eos(), savevm.footer(2)]
    out += [savevm.section_part(savevm.SECTION_END, 2), ram_eos(), savevm.footer(2)]
    blob = msgpack.packb(regs or {"step": 5})
    out += [savevm.section_start(savevm.SECTION_FULL, 4, "livemig/vcpu", 0, 1),
            struct.pack(">I", len(blob)), blob, savevm.footer(4),
            savevm.section_start(savevm.SECTION_FULL, 3, "globalstate", 0, 1),
            savevm.globalstate("running"), savevm.footer(3), savevm.eof(),
            savevm.vmdescription({"page_size": 4096, "devices": [savevm.GLOBALSTATE_DESC]})]
    return b"".join(out)


def load(data: bytes, pages=None, machine="pc"):
    pages = np.zeros((PAGES, 4096), np.uint8) if pages is None else pages
    got = {}

    def vcpu(r, instance, version):
        n = r.be32()
        got["vcpu"] = msgpack.unpackb(bytes(r.take(n)))

    def gs(r, instance, version):
        got["runstate"] = savevm.read_globalstate(r, version)

    f = io.BytesIO(data)
    loader = savevm.StreamLoader(RamLoader([RamBlock("pc.ram", pages)]),
                                 {"livemig/vcpu": vcpu, "globalstate": gs}, machine=machine)
    result = loader.load(savevm.BufferedReader(f.readinto, capacity=1 << 16))
    return pages, got, result


def test_round_trip():
    ram = make_ram()
    data = build_stream(ram)
    assert data[:8] == b"QEVM\0\0\0\3"
    pages, got, result = load(data)
    assert np.array_equal(pages, ram)
    assert got == {"vcpu": {"step": 5}, "runstate": "running"}
    assert result.machine == "pc" and result.vmdesc["page_size"] == 4096
    assert result.bytes == len(data)


def test_vmdesc_length_never_contains_brace():
    for n in range(0x7B, 0x7B + 600, 37):
        trailer = savevm.vmdescription({"page_size": 4096, "devices": [], "pad": "x" * n})
        length = struct.unpack(">I", trailer[1:5])[0]
        assert b"{" not in trailer[1:5]
        assert json.loads(trailer[5:5 + length])["page_size"] == 4096


@pytest.mark.parametrize("kwargs, message", [
    ({"magic": 0x12345678}, "not a savevm stream"),
    ({"version": 2}, "version 2 is obsolete"),
    ({"version": 4}, "unsupported savevm stream version 4"),
    ({"name": "vga.vram"}, "unknown RAM block 'vga.vram'"),
    ({"size": 2 * PAGES * 4096}, "has 524288 bytes in the stream but 262144 here"),
    ({"machine": "q35"}, "machine type received is 'q35'"),
])
def test_refusals(kwargs, message):
    data = build_stream(make_ram(), **kwargs)
    with pytest.raises(savevm.StreamError, match=message):
        load(data)


def test_every_truncation_is_refused():
    ram = make_ram()
    ram[:] = 0  # zero pages keep the stream short, so every offset can be tried
    data = build_stream(ram)
    eof_at = data.rindex(savevm.eof() + bytes([savevm.VMDESCRIPTION]))
    for cut in range(0, eof_at + 1, 1):
        with pytest.raises(savevm.StreamError):
            load(data[:cut])


def test_page_beyond_block_is_refused():
    data = bytearray(build_stream(make_ram()))
    # a PAGE record for page 10_000 in a 64-page block
    bad = struct.pack(">Q", (10_000 << 12) | RAM_PAGE) + b"\x06pc.ram" + bytes(4096)
    pos = data.index(savevm.section_part(savevm.SECTION_END, 2))
    data[pos + 5:pos + 5] = bad
    with pytest.raises(savevm.StreamError, match="beyond block"):
        load(bytes(data))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutations_never_crash(data):
    """A mutated stream either loads or raises StreamError: nothing else."""
    stream = bytearray(build_stream(make_ram(2)))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(stream) - 1))
        stream[pos] = data.draw(st.integers(0, 255))
    try:
        load(bytes(stream))
    except savevm.StreamError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_are_refused(blob):
    with pytest.raises(savevm.StreamError):
        load(b"QEVM\0\0\0\3" + blob)
