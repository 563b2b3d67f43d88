"""Dirty images (crash with metadata in flight) are repaired on read-write open."""

from __future__ import annotations

import subprocess
import sys

import pytest

from livemig.block import open_image
from livemig.block.qcow2 import format as F

from .conftest import (
    check_image,
    digest,
    needs_qemu,
    poke_incompatible,
    qemu_create,
    qemu_img,
    qemu_io,
    run,
)

pytestmark = needs_qemu


def test_qemu_lazy_refcount_crash_is_repaired(tmp_path):
    img = tmp_path / "lazy.qcow2"
    qemu_create(img, "4M", "lazy_refcounts=on", "cluster_size=4096")
    r = run("qemu-io", "-f", "qcow2", "-c", "write -P 0x55 0 100k", "-c", "write -P 0x66 2M 8k",
            "-c", "abort", img, check=False)
    assert r.returncode != 0
    assert qemu_img("check", img, check=False).returncode == 2  # refcount=0 reference=1
    before = digest(img)
    with open_image(img, read_only=True) as ro:  # reading a dirty image is fine, untouched
        assert ro.read(0, 3) == b"\x55" * 3
    d = open_image(img, inactive=True)
    assert digest(img) == before  # an inactive open does not repair either
    d.activate()  # becoming writable repairs
    assert not d.header.incompatible & F.INCOMPAT_DIRTY
    d.write(1 << 20, b"\x77" * 10000)
    d.close()
    check_image(img)
    qemu_io(img, "read -P 0x55 0 100k", "read -P 0x66 2M 8k", "read -P 0x77 1M 10000")


_CRASH = """
import os, sys
from livemig.block import open_image
d = open_image(sys.argv[1], l2_cache_size=1024, refcount_cache_size=1024)
d.write(0, b"\\x11" * 300000)
d.flush()  # this much is durable
for i in range(60):  # evictions put some metadata on disk, the rest is lost
    d.write(400000 + i * 7000, bytes([i]) * 5000)
os._exit(3)
"""


def test_our_own_crash_is_repaired(tmp_path):
    img = tmp_path / "crash.qcow2"
    qemu_create(img, "2M", "cluster_size=512")
    r = subprocess.run([sys.executable, "-c", _CRASH, str(img)], capture_output=True,
                       text=True)
    assert r.returncode == 3, r.stderr
    with open(img, "rb") as f:
        assert F.parse_header(f.read(512), str(img)).incompatible & F.INCOMPAT_DIRTY
    # Write-back ordering means the crash leaked clusters at worst, never corrupted.
    assert qemu_img("check", img, check=False).returncode in (0, 3)
    with open_image(img) as d:
        assert d.read(0, 300000) == b"\x11" * 300000
        d.write(1 << 20, b"\x22" * 3000)
    check_image(img)
    qemu_io(img, "read -P 0x11 0 300000", "read -P 0x22 1M 3000")


@pytest.mark.parametrize("extra", ["snapshot", "compressed"])
def test_repair_counts_snapshots_and_compressed_clusters(tmp_path, extra):
    img = tmp_path / "s.qcow2"
    qemu_create(img, "2M", "cluster_size=4096")
    if extra == "snapshot":
        qemu_io(img, "write -P 0x31 0 64k")
        qemu_img("snapshot", "-c", "s1", img)
        qemu_io(img, "write -P 0x32 32k 64k")
    else:
        qemu_io(img, "write -c -P 0x31 0 64k", "write -c -P 0x32 64k 4k", "write -P 1 1M 4k")
    poke_incompatible(img, F.INCOMPAT_DIRTY)
    with open_image(img) as d:
        d.write(1536 * 1024, b"\x44" * 4096)
    check_image(img)
    qemu_io(img, "read -P 0x44 1536k 4k")
    if extra == "snapshot":
        qemu_img("snapshot", "-a", "s1", img)
        qemu_io(img, "read -P 0x31 0 64k")
        check_image(img)
