"""The public API contract, independent of qemu: raw driver, probing, states, errors."""

from __future__ import annotations

import pytest

from livemig.block import (
    BlockError,
    ImageClosed,
    ImageInactive,
    ImageNotFound,
    OutOfRange,
    ReadOnlyImage,
    UnsupportedFeature,
    create_image,
    open_image,
    probe_format,
)


def test_raw_roundtrip(tmp_path):
    p = tmp_path / "d.raw"
    create_image(p, 1 << 20, format="raw")
    assert probe_format(str(p)) == "raw"
    with open_image(p) as img:
        assert (img.format, img.size, img.path, img.active) == ("raw", 1 << 20, str(p), True)
        img.write(4095, b"abc")
        img.write_zeroes(4096, 1)
        assert img.read(4094, 5) == b"\0a\0c\0"
        assert img.is_allocated(0, 10)
        img.flush()
        img.resize(2 << 20)
        assert img.size == 2 << 20
    assert p.read_bytes()[4095:4098] == b"a\0c"


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_states_and_errors(tmp_path, fmt):
    p = tmp_path / f"d.{fmt}"
    create_image(p, 1 << 20, format=fmt)
    img = open_image(p)
    assert img.format == fmt and probe_format(str(p)) == fmt
    with pytest.raises(OutOfRange):
        img.read((1 << 20) - 1, 2)
    with pytest.raises(OutOfRange):
        img.write(-1, b"x")
    img.write(0, b"x")
    img.inactivate()
    assert not img.active
    with pytest.raises(ImageInactive, match="inactive"):
        img.write(0, b"y")
    with pytest.raises(ImageInactive):
        img.write_zeroes(0, 1)
    assert img.read(0, 1) == b"x"  # reads stay allowed
    img.flush()  # a no-op while inactive, not an error
    img.activate()
    img.write(0, b"y")
    img.close()
    with pytest.raises(ImageClosed):
        img.read(0, 1)
    img.close()  # idempotent
    with open_image(p, read_only=True) as ro:
        assert ro.read(0, 1) == b"y"
        with pytest.raises(ReadOnlyImage):
            ro.write(0, b"z")


def test_open_inactive_then_activate(tmp_path):
    p = tmp_path / "d.qcow2"
    create_image(p, 1 << 20)
    img = open_image(p, inactive=True)
    assert not img.active
    with pytest.raises(ImageInactive):
        img.write(0, b"x")
    img.activate()
    img.write(0, b"x")
    img.close()
    with open_image(p) as img:
        assert img.read(0, 2) == b"x\0"


def test_unknown_formats_are_refused(tmp_path):
    p = tmp_path / "d.vmdk"
    p.write_bytes(b"KDMV" + bytes(1020))
    assert probe_format(str(p)) == "vmdk"
    with pytest.raises(UnsupportedFeature, match="vmdk"):
        open_image(p)
    with pytest.raises(UnsupportedFeature):
        create_image(tmp_path / "x", 10, format="vdi")
    with pytest.raises(BlockError, match="backing"):
        create_image(tmp_path / "r", 10, format="raw", backing="d.vmdk")
    with pytest.raises(BlockError, match="cluster size"):
        create_image(tmp_path / "c", 10, cluster_size=1000)
    with pytest.raises(ImageNotFound, match="missing.qcow2"):
        open_image(tmp_path / "missing.qcow2")
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError, for plain callers
        open_image(tmp_path / "missing.qcow2")
    (tmp_path / "b.raw").write_bytes(bytes(4096))
    create_image(tmp_path / "o.qcow2", 4096, backing="b.raw", backing_format="raw")
    (tmp_path / "b.raw").unlink()
    with pytest.raises(ImageNotFound, match="backing file"):
        open_image(tmp_path / "o.qcow2")


def test_qcow2_exported_basics(tmp_path, patterned):
    p = tmp_path / "d.qcow2"
    create_image(p, 3 << 20, cluster_size=4096)
    data = patterned(1, 10000)
    with open_image(p) as img:
        assert not img.is_allocated(0, 3 << 20)
        img.write(5000, data)
        assert img.read(5000, 10000) == data
        assert img.is_allocated(4096, 1) and not img.is_allocated(16384, 4096)
        img.write_zeroes(0, 3 << 20)
        assert img.read(0, 3 << 20) == bytes(3 << 20)
        assert img.is_allocated(0, 4096)  # zero clusters are allocated in the top image
