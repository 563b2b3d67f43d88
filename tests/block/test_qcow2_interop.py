"""Interoperability with QEMU both ways, qemu-img/qemu-io being the oracle."""

from __future__ import annotations

import json
import random

import pytest

from livemig.block import Qcow2Image, create_image, open_image

from .conftest import (
    assert_no_shared_host_clusters,
    check_image,
    needs_qemu,
    qemu_create,
    qemu_img,
    qemu_io,
    qemu_to_raw,
    verify_image,
)

pytestmark = needs_qemu

MiB = 1 << 20

# Writes qemu-io applies to an image before our driver reads it: aligned, unaligned,
# crossing clusters/L2 tables, and zeroes (zero clusters on v3, written zeros on v2).
QEMU_WRITES = [
    "write -P 0xab 0 64k",
    "write -P 0x11 100000 12345",
    "write -z 256k 128k",
    "write -P 0x22 4M 1M",
    "write -P 0x33 7340000 33333",
    "write -z 4128k 8k",
]


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("cluster", [512, 4096, 65536])
def test_read_qemu_written_images(tmp_path, compat, cluster):
    img = tmp_path / "q.qcow2"
    qemu_create(img, "8M", f"compat={compat}", f"cluster_size={cluster}")
    qemu_io(img, *QEMU_WRITES)
    expected = qemu_to_raw(img, tmp_path / "q.raw")
    with open_image(img, read_only=True) as d:
        assert d.format == "qcow2" and d.size == 8 * MiB
        assert d.header.version == (2 if compat == "0.10" else 3)
        assert d.read(0, d.size) == expected
        assert d.read(100001, 7) == b"\x11" * 7
        assert d.is_allocated(0, 1) and not d.is_allocated(6 * MiB, 4096)
        # On v3 the zeroed range is a zero cluster: allocated in the top image.
        assert d.is_allocated(256 * 1024 + cluster, cluster) == (compat == "1.1")


@pytest.mark.parametrize("bits", [1, 8, 64])
def test_read_other_refcount_widths_and_write(tmp_path, bits):
    img = tmp_path / "q.qcow2"
    qemu_create(img, "4M", f"refcount_bits={bits}", "cluster_size=4096")
    qemu_io(img, "write -P 0x44 8k 20k")
    expected = bytearray(qemu_to_raw(img, tmp_path / "q.raw"))
    rng = random.Random(bits)
    with open_image(img) as d:
        assert d.read(0, d.size) == expected
        for _ in range(40):
            off, n = rng.randrange(0, d.size - 70000), rng.randrange(1, 70000)
            data = rng.randbytes(n)
            d.write(off, data)
            expected[off:off + n] = data
    verify_image(img, expected, 4096)


def test_read_compressed_clusters(tmp_path):
    img = tmp_path / "c.qcow2"
    qemu_create(img, "4M", "cluster_size=4096")
    qemu_io(img, "write -c -P 0x5a 0 64k", "write -c -P 0x6b 1M 4k", "write -P 1 2M 4k")
    expected = qemu_to_raw(img, tmp_path / "c.raw")
    with open_image(img) as d:
        assert d.read(0, d.size) == expected
        assert d.read(4095, 2) == b"\x5a\x5a" and d.is_allocated(MiB, 1)


@pytest.mark.parametrize("base_fmt", ["qcow2", "raw"])
def test_read_qemu_overlays(tmp_path, base_fmt):
    base = tmp_path / f"base.{base_fmt}"
    qemu_create(base, "4M", *(["cluster_size=4096"] if base_fmt == "qcow2" else []),
                fmt=base_fmt)
    qemu_io(base, "write -P 0xb0 0 4M", fmt=base_fmt)
    top = tmp_path / "top.qcow2"
    # Relative backing name: resolved against the overlay's directory, not our cwd.
    qemu_create(top, "6M", "cluster_size=65536", backing=base.name, backing_fmt=base_fmt)
    qemu_io(top, "write -P 0x70 1000 3000", "write -z 128k 64k", "write -P 0x71 5M 4k")
    expected = qemu_to_raw(top, tmp_path / "top.raw")
    with open_image(top) as d:
        assert d.backing is not None and d.backing.format == base_fmt
        assert d.read(0, d.size) == expected
        assert d.read(5000, 1) == b"\xb0"  # COW filled from backing by qemu
        assert d.read(130 * 1024, 1) == b"\0"  # zero cluster hides the backing data
        assert d.read(4 * MiB + 1, 1) == b"\0"  # beyond the shorter backing file
        assert d.is_allocated(0, 1) and not d.is_allocated(65536, 65536)


def random_ops(d, expected: bytearray, rng: random.Random, n: int, max_len: int,
               zero_ratio: float = 0.15) -> None:
    for _ in range(n):
        ln = rng.randrange(1, max_len)
        off = rng.randrange(0, d.size - ln)
        if rng.random() < zero_ratio:
            d.write_zeroes(off, ln)
            expected[off:off + ln] = bytes(ln)
        else:
            data = rng.randbytes(ln)
            d.write(off, data)
            expected[off:off + ln] = data
        if rng.random() < 0.05:
            d.flush()


@pytest.mark.parametrize("cluster,size,ops,max_len", [
    (512, 4 * MiB, 150, 20000),
    (4096, 16 * MiB, 150, 100000),
    (65536, 64 * MiB, 120, 300000),
    (2 * MiB, 32 * MiB, 40, 3 * MiB),
])
def test_our_random_writes_pass_qemu_check(tmp_path, cluster, size, ops, max_len):
    img = tmp_path / "w.qcow2"
    create_image(img, size, cluster_size=cluster)
    expected = bytearray(size)
    rng = random.Random(cluster)
    # Small caches force evictions, exercising the write-back ordering mid-run.
    with open_image(img, l2_cache_size=2 * cluster, refcount_cache_size=2 * cluster) as d:
        random_ops(d, expected, rng, ops, max_len)
        assert d.read(0, size) == expected
    verify_image(img, expected, cluster)
    with open_image(img, read_only=True) as d:
        assert d.read(0, size) == expected


def test_refcount_table_moves_and_l1_grows_with_512b_clusters(tmp_path, patterned):
    img = tmp_path / "m.qcow2"
    create_image(img, 1 * MiB, cluster_size=512)
    with open_image(img) as d:
        rt0, l10 = d.header.refcount_table_offset, d.header.l1_table_offset
        d.resize(24 * MiB)  # L1 grows from 32 to 768 entries: it moves
        data = patterned(7, 12 * MiB)
        d.write(3 * MiB, data)  # > 8 MiB of clusters: one table cluster is not enough
        d.write(24 * MiB - 700, data[:700])
        assert d.header.refcount_table_offset != rt0
        assert d.header.refcount_table_clusters > 1
        assert d.header.l1_table_offset != l10 and d.header.l1_size == 768
    expected = bytearray(24 * MiB)
    expected[3 * MiB:15 * MiB] = data
    expected[-700:] = data[:700]
    verify_image(img, expected, 512)
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert info["virtual-size"] == 24 * MiB


@pytest.mark.parametrize("compat,bits", [("0.10", 16), ("1.1", 1), ("1.1", 64)])
def test_images_we_create_are_valid_for_qemu(tmp_path, compat, bits):
    img = tmp_path / "n.qcow2"
    create_image(img, 8 * MiB, cluster_size=4096, compat=compat, refcount_bits=bits)
    check_image(img)
    with open_image(img) as d:
        d.write(12345, b"\xcd" * 50000)
        d.write_zeroes(20000, 5000)
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert info["format-specific"]["data"]["compat"] == compat
    assert info["format-specific"]["data"]["refcount-bits"] == bits
    expected = bytearray(8 * MiB)
    expected[12345:62345] = b"\xcd" * 50000
    expected[20000:25000] = bytes(5000)
    verify_image(img, expected, 4096)
    qemu_io(img, "read -P 0xcd 25000 37345", "read -P 0 20000 5000")


@pytest.mark.parametrize("base_fmt", ["qcow2", "raw"])
def test_our_overlay_writes_cow_from_backing(tmp_path, base_fmt, patterned):
    sub = tmp_path / "images"
    sub.mkdir()
    base = sub / f"base.{base_fmt}"
    base_data = patterned(3, 3 * MiB)
    create_image(base, 3 * MiB, format=base_fmt, cluster_size=4096)
    with open_image(base) as b:
        b.write(0, base_data)
    top = sub / "top.qcow2"
    create_image(top, 4 * MiB, cluster_size=65536, backing=base.name)
    expected = bytearray(base_data + bytes(MiB))
    rng = random.Random(11)
    with open_image(top, l2_cache_size=2 * 65536) as d:
        assert d.header.backing_format == base_fmt
        for _ in range(60):
            ln = rng.randrange(1, 150000)
            off = rng.randrange(0, d.size - ln)
            if rng.random() < 0.2:
                d.write_zeroes(off, ln)
                expected[off:off + ln] = bytes(ln)
            else:
                data = rng.randbytes(ln)
                d.write(off, data)
                expected[off:off + ln] = data
        assert d.read(0, d.size) == expected
    info = json.loads(qemu_img("info", "--output=json", top).stdout)
    assert info["backing-filename"] == base.name
    assert info["backing-filename-format"] == base_fmt
    verify_image(top, expected, 65536)
    with open_image(base, read_only=True) as b:
        assert b.read(0, 3 * MiB) == base_data  # the backing image is never written


def test_partial_write_on_qemu_zero_cluster_fills_zeros_not_backing(tmp_path):
    base = tmp_path / "base.qcow2"
    qemu_create(base, "1M")
    qemu_io(base, "write -P 0xee 0 1M")
    top = tmp_path / "top.qcow2"
    qemu_create(top, "1M", "cluster_size=4096", backing=base.name, backing_fmt="qcow2")
    qemu_io(top, "write -z 0 64k")
    with open_image(top) as d:
        d.write(100, b"\x01" * 10)  # inside a ZERO_PLAIN cluster
        d.write(70000, b"\x02" * 10)  # inside an unallocated cluster: COW from backing
    qemu_io(top, "read -P 0 0 100", "read -P 1 100 10", "read -P 0 110 3986",
            "read -P 0xee 65536 4464", "read -P 2 70000 10", "read -P 0xee 70010 3710")
    check_image(top)


def test_write_to_qemu_made_image_and_zero_alloc(tmp_path, patterned):
    img = tmp_path / "z.qcow2"
    qemu_create(img, "2M", "cluster_size=4096")
    qemu_io(img, "write -P 0x99 0 64k")
    with open_image(img) as d:
        assert isinstance(d, Qcow2Image)
        d.write_zeroes(0, 16384)  # allocated clusters become ZERO_ALLOC
        d.write(4096 + 10, b"\x07" * 5)  # partial write in a ZERO_ALLOC cluster
        d.write(8192, patterned(1, 4096))  # full overwrite of a ZERO_ALLOC cluster
    expected = bytearray(2 * MiB)
    expected[:65536] = b"\x99" * 65536
    expected[:16384] = bytes(16384)
    expected[4106:4111] = b"\x07" * 5
    expected[8192:12288] = patterned(1, 4096)
    verify_image(img, expected, 4096)
    assert_no_shared_host_clusters(img, 4096)


def test_three_level_chain_raw_qcow2_qcow2(tmp_path, patterned):
    """raw <- qcow2 (qemu) <- qcow2 (ours): reads fall through two levels, COW too."""
    raw = tmp_path / "base.raw"
    raw.write_bytes(patterned(1, 2 * MiB))
    mid = tmp_path / "mid.qcow2"
    qemu_create(mid, "3M", "cluster_size=4096", backing=raw.name, backing_fmt="raw")
    qemu_io(mid, "write -P 0x4d 1M 64k")
    top = tmp_path / "top.qcow2"
    create_image(top, None, cluster_size=65536, backing=mid.name)
    with open_image(top) as d:
        assert d.size == 3 * MiB and d.backing.backing.format == "raw"
        d.write(MiB + 100, b"\x70" * 10)  # COW fill mixes mid's data and raw's
        d.write(2 * MiB + 5, b"\x71")  # past the raw base: fill is zeros
    expected = bytearray(patterned(1, 2 * MiB) + bytes(MiB))
    expected[MiB:MiB + 65536] = b"\x4d" * 65536
    expected[MiB + 100:MiB + 110] = b"\x70" * 10
    expected[2 * MiB + 5] = 0x71
    verify_image(top, expected, 65536)
    assert qemu_to_raw(top, tmp_path / "top.raw") == expected
