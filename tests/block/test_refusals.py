"""Features we refuse: a clear error naming file and feature, and not one byte written."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from livemig.block import BlockError, CorruptImage, UnsupportedFeature, open_image
from livemig.block.qcow2 import format as F

from .conftest import (
    check_image,
    digest,
    needs_qemu,
    poke_incompatible,
    qemu_create,
    qemu_img,
    qemu_io,
    verify_image,
)

pytestmark = needs_qemu

MiB = 1 << 20


def make(tmp_path: Path, kind: str) -> Path:
    img = tmp_path / f"{kind}.qcow2"
    if kind == "luks":
        for attempt in range(3):  # qemu-img's PBKDF timing sometimes reads no CPU time and gives up
            try:
                qemu_img("create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw",
                         "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", img, "1M")
                break
            except AssertionError as exc:
                if "Unable to get accurate CPU usage" not in str(exc) or attempt == 2:
                    raise
    elif kind == "extended_l2":
        qemu_create(img, "1M", "extended_l2=on")
    elif kind == "data_file":
        qemu_create(img, "1M", f"data_file={tmp_path / 'data.raw'}")
    elif kind == "zstd":
        qemu_create(img, "1M", "compression_type=zstd")
    else:
        qemu_create(img, "1M")
        qemu_io(img, "write -P 0x11 0 64k")
        if kind == "unknown_incompat":
            poke_incompatible(img, 1 << 9)
        elif kind == "corrupt":
            poke_incompatible(img, F.INCOMPAT_CORRUPT)
        elif kind == "dirty":
            poke_incompatible(img, F.INCOMPAT_DIRTY)
    return img


@pytest.mark.parametrize("kind,match", [
    ("luks", "encrypt"),
    ("extended_l2", "extended L2"),
    ("data_file", "external data file"),
    ("zstd", "compression type"),
    ("unknown_incompat", "unknown feature bit 9"),
])
def test_unsupported_images_are_refused_untouched(tmp_path, kind, match):
    img = make(tmp_path, kind)
    before = digest(img)
    for kwargs in ({}, {"read_only": True}, {"inactive": True}):
        with pytest.raises(UnsupportedFeature, match=match) as ei:
            open_image(img, **kwargs)
        assert str(img) in str(ei.value)
    assert digest(img) == before


@pytest.mark.parametrize("kind,match", [("corrupt", "corrupt")])
def test_corrupt_images_are_read_only(tmp_path, kind, match):
    img = make(tmp_path, kind)
    before = digest(img)
    with pytest.raises(CorruptImage, match=match):
        open_image(img)
    with open_image(img, read_only=True) as d:  # reading is still allowed
        assert d.read(0, 4) == b"\x11" * 4
    d = open_image(img, inactive=True)  # as a migration destination would
    with pytest.raises(CorruptImage, match=match):
        d.activate()
    assert not d.active
    d.close()
    assert digest(img) == before


def test_writes_over_compressed_clusters_are_refused(tmp_path):
    img = tmp_path / "c.qcow2"
    qemu_create(img, "4M", "cluster_size=4096")
    qemu_io(img, "write -c -P 0x5a 64k 64k", "write -P 0x11 0 4k")
    with open_image(img) as d:
        before = digest(img)
        # Spanning an ordinary cluster and compressed ones: nothing may be written,
        # not even the ordinary part or the dirty bit.
        calls = [lambda: d.write(0, b"\1" * 80 * 1024),  # one L2 table, checked inline
                 lambda: d.write(70000, b"\2"),
                 lambda: d.write_zeroes(0, 256 * 1024),
                 lambda: d.write(0, bytes(3 * MiB))]  # several L2 tables: checked up front
        for call in calls:
            with pytest.raises(UnsupportedFeature, match="compressed cluster") as ei:
                call()
            assert str(img) in str(ei.value)
            d.flush()
            assert digest(img) == before
        assert d.read(64 * 1024, 4) == b"\x5a" * 4
    check_image(img)


def test_compressed_refusal_leaves_bytes_identical(tmp_path):
    img = tmp_path / "c.qcow2"
    qemu_create(img, "4M", "cluster_size=4096")
    qemu_io(img, "write -c -P 0x5a 1M 64k")
    before = digest(img)
    with open_image(img) as d:
        with pytest.raises(UnsupportedFeature):
            d.write(0, bytes(2 * MiB))  # the first MiB is fine, the rest is compressed
        with pytest.raises(UnsupportedFeature):
            d.write_zeroes(MiB, 4096)
    assert digest(img) == before


def test_internal_snapshot_shared_clusters(tmp_path):
    """COPIED=0 clusters are refused; everything else still writes correctly."""
    img = tmp_path / "s.qcow2"
    qemu_create(img, "2M", "cluster_size=4096")
    qemu_io(img, "write -P 0x21 0 64k")
    qemu_img("snapshot", "-c", "snap1", img)
    before = digest(img)
    with open_image(img) as d:
        with pytest.raises(UnsupportedFeature, match="shared"):
            d.write(100, b"x")
        d.flush()
        assert digest(img) == before
    # Fresh L2 tables are not shared, so writes past the snapshot's data work.
    qemu_io(img, "write -P 0x22 1M 8k")  # let qemu COW the L2 table for this range
    with open_image(img) as d:
        d.write(1536 * 1024, b"\x23" * 10000)
    check_image(img)
    qemu_io(img, "read -P 0x21 0 64k", "read -P 0x22 1M 8k", "read -P 0x23 1536k 10000")


def test_header_rewrite_keeps_unknown_fields_and_extensions(tmp_path, patterned):
    img = tmp_path / "h.qcow2"
    base = tmp_path / "b.qcow2"
    qemu_create(base, "1M")
    qemu_create(img, "1M", "cluster_size=4096", backing=base.name, backing_fmt="qcow2")
    with open(img, "r+b") as f:
        h = F.parse_header(f.read(4096), str(img))
        h.header_length = 120
        h.unknown_fields = b"FUTURE!!"
        h.extensions.insert(1, (0x12345678, b"unknown extension data"))
        h.autoclear |= 1 << 7  # an autoclear bit nobody knows
        f.seek(0)
        f.write(h.pack())
    check_image(img)  # qemu accepts the doctored header
    with open_image(img) as d:
        d.write(0, patterned(1, 5000))
        assert d.header.incompatible & F.INCOMPAT_DIRTY  # set while metadata is in flight
        assert d.header.autoclear == 0  # unknown autoclear bits cleared before writing
        d.flush()
        assert not d.header.incompatible & F.INCOMPAT_DIRTY
    with open(img, "rb") as f:
        h2 = F.parse_header(f.read(4096), str(img))
    assert h2.header_length == 120 and h2.unknown_fields == b"FUTURE!!"
    assert h2.extensions == h.extensions and h2.backing_file == "b.qcow2"
    assert h2.autoclear == 0 and h2.incompatible == 0
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert info["backing-filename-format"] == "qcow2"
    verify_image(img, patterned(1, 5000) + bytes(MiB - 5000), 4096)


def test_truncated_or_garbage_headers(tmp_path):
    p = tmp_path / "bad.qcow2"
    p.write_bytes(b"QFI\xfb" + struct.pack(">I", 4) + bytes(600))
    with pytest.raises(UnsupportedFeature, match="version 4"):
        open_image(p, format="qcow2")
    p.write_bytes(b"QFI\xfb" + struct.pack(">IQII", 3, 0, 0, 30) + bytes(600))
    with pytest.raises(UnsupportedFeature, match="cluster size"):
        open_image(p)
    p.write_bytes(b"not a qcow2")
    with pytest.raises(BlockError, match="bad magic"):
        open_image(p, format="qcow2")
