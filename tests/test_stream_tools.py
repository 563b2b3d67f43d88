"""Codec pieces that QEMU interop needs, without QEMU: configuration
subsections, return-path commands, device subsections, and the stream
reader behind `livemig stream` (vmdesc location, skipping by description)."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest

from livemig.protocol import savevm
from livemig.protocol.devices import DEVICES, full_section
from livemig.protocol.inspect import find_vmdesc, scan
from livemig.protocol.ram import PageEncoder, RamBlock, RamLoader, ram_eos, ram_mem_size

BLOCK = 8 * 4096


def subsection(name: str, version: int = 1) -> bytes:
    return bytes([savevm.SUBSECTION]) + bytes([len(name)]) + name.encode() + struct.pack(">I", version)


def none_stream(*, config_tail: bytes = b"", commands: bytes = b"", timer_tail: bytes = b"",
                extra: bytes = b"", vmdesc: dict | None = None, pages: np.ndarray | None = None) -> bytes:
    """A `none` machine stream the way QEMU 7.2 lays it out (timer is section 0)."""
    pages = np.zeros((BLOCK // 4096, 4096), np.uint8) if pages is None else pages
    out = [savevm.header(), savevm.configuration("none"), config_tail, commands,
           savevm.section_start(savevm.SECTION_START, 2, "ram", 0, 4),
           ram_mem_size([("ram", BLOCK)]), ram_eos(), savevm.footer(2),
           savevm.section_part(savevm.SECTION_END, 2)]
    enc = PageEncoder(len(pages))
    idx = np.arange(len(pages))
    out += [bytes(b) for b in enc.encode("ram", idx, pages, ~pages.any(axis=1))]
    out += [ram_eos(), savevm.footer(2)]
    timer = DEVICES["timer"]
    out += [savevm.section_start(savevm.SECTION_FULL, 0, "timer", 0, 2),
            timer.encode({"cpu_ticks_offset": 7, "cpu_clock_offset": -3}), timer_tail, savevm.footer(0)]
    out.append(extra)
    out += full_section(4, DEVICES["globalstate"], 0, savevm.globalstate("paused"))
    out.append(savevm.eof())
    if vmdesc is not None:
        out.append(savevm.vmdescription(vmdesc))
    return b"".join(out)


def load(data: bytes, ping=None):
    pages = np.zeros((BLOCK // 4096, 4096), np.uint8)
    states: dict = {}

    def loader(name):
        return lambda r, instance, version: states.__setitem__(name, DEVICES[name].load(r, version))

    sl = savevm.StreamLoader(RamLoader([RamBlock("ram", pages)]),
                             {n: loader(n) for n in ("timer", "globalstate")}, machine="none", on_ping=ping)
    result = sl.load(savevm.BufferedReader(io.BytesIO(data).readinto))
    return result, states, pages


def test_none_stream_loads_with_timer_state():
    ram = np.random.default_rng(1).integers(0, 256, (BLOCK // 4096, 4096), np.uint8)
    ram[::2] = 0
    result, states, pages = load(none_stream(pages=ram))
    assert np.array_equal(pages, ram)
    assert states == {"timer": {"cpu_ticks_offset": 7, "cpu_clock_offset": -3}, "globalstate": "paused"}


def test_configuration_subsections():
    caps = subsection("configuration/capabilities") + struct.pack(">I", 1) + b"\x0bfake-option"
    tail = subsection("configuration/target-page-bits") + struct.pack(">I", 12) + caps \
        + subsection("configuration/uuid") + bytes(range(16))
    result, _, _ = load(none_stream(config_tail=tail))
    assert result.configuration == {"machine": "none", "target-page-bits": 12, "capabilities": ["fake-option"],
                                    "uuid": bytes(range(16)).hex()}
    with pytest.raises(savevm.StreamError, match="target pages of 65536 bytes"):
        load(none_stream(config_tail=subsection("configuration/target-page-bits") + struct.pack(">I", 16)))
    ignore = subsection("configuration/capabilities") + struct.pack(">I", 1) + b"\x0fx-ignore-shared"
    with pytest.raises(savevm.StreamError, match="capability 'x-ignore-shared'"):
        load(none_stream(config_tail=ignore))
    with pytest.raises(savevm.StreamError, match="unsupported configuration subsection 'configuration/new'"):
        load(none_stream(config_tail=subsection("configuration/new")))


def test_ping_needs_return_path_and_gets_its_value_back():
    ping = savevm.command(savevm.CMD_PING, struct.pack(">I", 0xC0FFEE))
    pongs: list[int] = []
    result, _, _ = load(none_stream(commands=savevm.command(savevm.CMD_OPEN_RETURN_PATH) + ping), pongs.append)
    assert result.return_path and pongs == [0xC0FFEE]
    with pytest.raises(savevm.StreamError, match="no return path"):
        load(none_stream(commands=ping))
    with pytest.raises(savevm.StreamError, match=r"command 3 \(POSTCOPY_ADVISE\)"):
        load(none_stream(commands=savevm.command(3, bytes(16))))


def test_unknown_device_subsection_and_section_are_named():
    with pytest.raises(savevm.StreamError, match="section 'timer' carries subsection 'timer/icount'"):
        load(none_stream(timer_tail=subsection("timer/icount") + bytes(16)))
    extra = savevm.section_start(savevm.SECTION_FULL, 3, "ipmi-bmc-sim", 0, 1) + bytes(4) + savevm.footer(3)
    with pytest.raises(savevm.StreamError, match="'ipmi-bmc-sim' 0 \\(version 1\\): this 'none' machine"):
        load(none_stream(extra=extra))
    with pytest.raises(savevm.StreamError, match="machine type received is 'none' and local is 'pc'"):
        savevm.StreamLoader(None, {}, machine="pc").load(
            savevm.BufferedReader(io.BytesIO(none_stream()).readinto))


def test_vmdesc_length_never_contains_a_brace():
    for n in range(0x7a00, 0x7c10, 7):  # lengths whose bytes would include 0x7b unpadded
        blob = savevm.vmdescription({"page_size": 4096, "pad": "x" * n})
        assert b"{" not in blob[1:5]


def test_inspect_skips_undescribed_devices_by_vmdesc(tmp_path):
    """A device livemig does not know, with a nested subsection, read through
    the trailer's sizes; and refused clearly once the trailer is gone."""
    body = bytes(range(6)) + subsection("thing/sub") + b"\xaa\xbb" + subsection("thing/sub/inner") + b"\xcc"
    extra = savevm.section_start(savevm.SECTION_FULL, 3, "thing", 2, 5) + body + savevm.footer(3)
    desc = {"page_size": 4096, "devices": [
        {"name": "thing", "instance_id": 2, "vmsd_name": "thing", "version": 5,
         "fields": [{"name": "a", "type": "uint16", "size": 2, "array_len": 2},
                    {"name": "s", "type": "struct", "size": 2, "struct": {"fields": []}}],
         "subsections": [{"vmsd_name": "thing/sub", "version": 1,
                          "fields": [{"name": "b", "type": "buffer", "size": 2}],
                          "subsections": [{"vmsd_name": "thing/sub/inner", "version": 1,
                                           "fields": [{"name": "c", "type": "uint8", "size": 1}]}]}]}]}
    ram = np.arange(BLOCK, dtype=np.uint64).astype(np.uint8).reshape(-1, 4096)
    path = tmp_path / "s"
    path.write_bytes(none_stream(extra=extra, vmdesc=desc, pages=ram))
    offset, found = find_vmdesc(str(path))
    assert found == desc
    info = scan(str(path), str(tmp_path / "ram"))
    assert [(s.name, s.described) for s in info.sections] == [
        ("ram", False), ("timer", False), ("thing", True), ("globalstate", False)]
    assert info.sections[1].state == {"cpu_ticks_offset": 7, "cpu_clock_offset": -3}
    assert (tmp_path / "ram" / "ram").read_bytes() == ram.tobytes()
    assert info.vmdesc_offset == offset and info.eof_offset == offset - 1

    wrong = dict(desc, devices=[dict(desc["devices"][0], subsections=[{"vmsd_name": "thing/other",
                                                                       "fields": []}])])
    path.write_bytes(none_stream(extra=extra, vmdesc=wrong))
    with pytest.raises(savevm.StreamError, match="subsection 'thing/sub' where the vmdesc says 'thing/other'"):
        scan(str(path))
    path.write_bytes(none_stream(extra=extra))
    assert find_vmdesc(str(path)) is None
    with pytest.raises(savevm.StreamError, match="cannot skip section 'thing' instance 2 .*no vmdesc trailer"):
        scan(str(path))
