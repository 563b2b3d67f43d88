"""The stale-metadata hazard (docs qcow2.md §2.3 and §5) and its fix.

Two openers share one image file, as two hosts on shared storage do during a
migration.  The destination D keeps warm caches while the source S writes;
activate() must drop everything and re-read.  Each positive test has a negative
control that skips the re-read (or the source's inactivate()) and asserts that
the oracle catches the damage, so these tests would fail if activate() did
nothing.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from livemig.block import BlockError, ImageInactive, ImageInUse, open_image

from .conftest import QemuIO, compare_raw, needs_qemu, qemu_create, qemu_img, qemu_io

pytestmark = needs_qemu

MiB = 1 << 20
KiB = 1 << 10

# What the other opener does while D is inactive.  512-byte clusters: an L2 table
# covers 32 KiB and one refcount-table cluster covers only 8 MiB of clusters.
SOURCE_OPS = [
    ("write", 0xB1, 16 * KiB, 8 * KiB),  # (i) into the L2 table D has cached
    ("write", 0xB2, 40 * MiB, 4 * KiB),  # (ii) needs a new L2 table
    ("resize", 128 * MiB),  # (iii) the L1 table grows and moves
    ("write", 0xB3, 100 * MiB, 4 * KiB),
    ("write", 0xB4, 48 * MiB, 12 * MiB),  # (iv) > 8 MiB allocated: refcount table moves
]
DEST_WRITES = [(0xD1, 24 * KiB, 4 * KiB), (0xD2, 44 * MiB, 4 * KiB), (0xD3, 62 * MiB, 4 * KiB)]

_OUR_WRITER = """
import json, sys
from livemig.block import open_image
ops = json.loads(sys.argv[2])
with open_image(sys.argv[1]) as img:
    for op in ops:
        if op[0] == "write":
            img.write(op[2], bytes([op[1]]) * op[3])
        else:
            img.resize(op[1])
"""


def run_source_ops(img: Path, ops: list, writer: str) -> None:
    if writer == "ours":  # a second instance of our driver, in its own process
        r = subprocess.run([sys.executable, "-c", _OUR_WRITER, str(img), json.dumps(ops)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return
    for op in ops:
        if op[0] == "write":
            qemu_io(img, f"write -P {op[1]:#x} {op[2]} {op[3]}")
        else:
            qemu_img("resize", "-q", "-f", "qcow2", img, str(op[1]))


def apply(expected: bytearray, ops: list) -> bytearray:
    for op in ops:
        if op[0] == "write":
            expected[op[2]:op[2] + op[3]] = bytes([op[1]]) * op[3]
        else:
            expected.extend(bytes(op[1] - len(expected)))
    return expected


def oracle(img: Path, expected: bytes, tmp: Path) -> tuple[int, dict, int]:
    """(check rc, check json, compare rc) without asserting: callers decide."""
    r = qemu_img("check", "--output=json", img, check=False)
    info = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}
    raw = tmp / "expected.raw"
    raw.write_bytes(bytes(expected))
    c = qemu_img("compare", "-f", "qcow2", "-F", "raw", img, raw, check=False)
    return r.returncode, info, c.returncode


def destination_scenario(tmp_path: Path, writer: str, reload: bool, warm_active: bool):
    img = tmp_path / "shared.qcow2"
    qemu_create(img, "64M", "cluster_size=512")
    qemu_io(img, "write -P 0xa0 0 8k", "write -P 0xa1 32M 4k")
    expected = bytearray(64 * MiB)
    expected[:8 * KiB] = b"\xa0" * 8 * KiB
    expected[32 * MiB:32 * MiB + 4 * KiB] = b"\xa1" * 4 * KiB
    if warm_active:
        # D ran before (e.g. a failed earlier migration): refcount cache and hint are warm.
        d = open_image(img)
        d.write(MiB, b"\xd0" * 4 * KiB)
        expected[MiB:MiB + 4 * KiB] = b"\xd0" * 4 * KiB
        d.inactivate()
    else:
        d = open_image(img, inactive=True)  # what an incoming migration does
    assert d.read(0, 64 * KiB) == expected[:64 * KiB]  # warm the L2 cache
    assert d.read(32 * MiB, 4 * KiB) == b"\xa1" * 4 * KiB
    run_source_ops(img, SOURCE_OPS, writer)
    apply(expected, SOURCE_OPS)
    if reload:
        d.activate()
    else:
        d.activate_keeping_metadata()
    stale_reads = 0
    for op in SOURCE_OPS:
        if op[0] == "write" and op[2] + op[3] <= d.size:
            if d.read(op[2], op[3]) != bytes([op[1]]) * op[3]:
                stale_reads += 1
    errors = []
    try:
        for pat, off, ln in DEST_WRITES:
            d.write(off, bytes([pat]) * ln)
            expected[off:off + ln] = bytes([pat]) * ln
        d.close()
    except BlockError as e:  # stale metadata may also be caught as inconsistency
        errors.append(e)
        d._release_lock()
    return img, expected, stale_reads, errors, d


@pytest.mark.parametrize("writer", ["qemu", "ours"])
@pytest.mark.parametrize("warm_active", [False, True], ids=["opened-inactive", "was-active"])
def test_destination_activate_rereads_metadata(tmp_path, writer, warm_active):
    img, expected, stale_reads, errors, d = destination_scenario(tmp_path, writer, True,
                                                                 warm_active)
    assert stale_reads == 0 and not errors
    assert d.closed
    rc, info, crc = oracle(img, expected, tmp_path)
    assert rc == 0 and "leaks" not in info and "corruptions" not in info, info
    assert crc == 0
    for op in SOURCE_OPS:
        if op[0] == "write":
            qemu_io(img, f"read -P {op[1]:#x} {op[2]} {op[3]}")
    for pat, off, ln in DEST_WRITES:
        qemu_io(img, f"read -P {pat:#x} {off} {ln}")
    # The image was resized by the source: D saw the new size after activate().
    assert json.loads(qemu_img("info", "--output=json", img).stdout)["virtual-size"] == 128 * MiB


@pytest.mark.parametrize("writer", ["qemu", "ours"])
def test_negative_control_stale_destination_corrupts(tmp_path, writer):
    img, expected, stale_reads, errors, d = destination_scenario(tmp_path, writer, False, True)
    assert stale_reads > 0, "stale caches should have shown old data"
    rc, info, crc = oracle(img, expected, tmp_path)
    # The content check must fail: check alone can miss silent loss (qcow2.md §2.3 c).
    assert crc != 0, (rc, info)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# 4 KiB clusters: an L2 table covers 2 MiB, so these land in distinct tables.
SRC_WRITES = [(0xA1, 0, 64 * KiB), (0xA2, 3 * MiB + 100, 5000), (0xA3, 40 * MiB, 4 * KiB)]
NEW_OWNER_WRITES = [("write", 0xBB, 48 * MiB, 4 * KiB), ("write", 0xBC, 128 * KiB, 4 * KiB),
                    ("write", 0xBD, 56 * MiB, 64 * KiB)]


def source_scenario(tmp_path: Path, inactivate: bool, new_owner: str):
    img = tmp_path / "src.qcow2"
    qemu_create(img, "64M", "cluster_size=4096")
    s = open_image(img)
    expected = bytearray(64 * MiB)
    for pat, off, ln in SRC_WRITES:  # stays in the write-back caches: no flush
        s.write(off, bytes([pat]) * ln)
        expected[off:off + ln] = bytes([pat]) * ln
    if inactivate:
        s.inactivate()
        with pytest.raises(ImageInactive):
            s.write(0, b"x")
        run_source_ops(img, NEW_OWNER_WRITES, new_owner)
    else:
        q = QemuIO(img)  # no lock coordination: the old owner still runs
        for op in NEW_OWNER_WRITES:
            q.cmd(f"write -P {op[1]:#x} {op[2]} {op[3]}")
        q.quit()
    apply(expected, NEW_OWNER_WRITES)
    before = _sha(img)
    s.close()  # late close: must not touch an inactive image
    return img, expected, before


@pytest.mark.parametrize("new_owner", ["qemu", "ours"])
def test_source_inactivate_hands_over_cleanly(tmp_path, new_owner):
    img, expected, before = source_scenario(tmp_path, True, new_owner)
    assert _sha(img) == before, "close() of an inactive image wrote to it"
    rc, info, crc = oracle(img, expected, tmp_path)
    assert rc == 0 and "leaks" not in info and "corruptions" not in info, info
    assert crc == 0


def test_negative_control_source_without_inactivate_corrupts(tmp_path):
    img, expected, before = source_scenario(tmp_path, False, "qemu")
    assert _sha(img) != before  # the late close flushed stale caches
    rc, info, crc = oracle(img, expected, tmp_path)
    assert rc == 2 or crc != 0, (rc, info, crc)
    assert crc != 0


def test_activate_refuses_while_other_writer_holds_lock(tmp_path):
    img = tmp_path / "l.qcow2"
    qemu_create(img, "1M")
    d = open_image(img, inactive=True)
    p = subprocess.Popen(["qemu-io", "-f", "qcow2", str(img)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert p.stdout.read(9) == b"qemu-io> "  # qemu-io now holds its write lock
        with pytest.raises(ImageInUse, match="in use"):
            d.activate()
        assert not d.active
    finally:
        p.communicate(b"quit\n", timeout=30)
    d.activate()
    d.write(0, b"ok")
    d.close()
    compare = tmp_path / "e.raw"
    compare.write_bytes(b"ok" + bytes(MiB - 2))
    compare_raw(img, compare)
