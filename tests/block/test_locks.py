"""QEMU-compatible OFD image locks: one active writer, visible to qemu-img."""

from __future__ import annotations

import subprocess
import sys

import pytest

from livemig.block import ImageInUse, create_image, open_image

from .conftest import needs_qemu, qemu_img, run


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_second_active_writer_refused(tmp_path, fmt):
    img = tmp_path / f"a.{fmt}"
    create_image(img, 1 << 20, format=fmt)
    first = open_image(img)
    with pytest.raises(ImageInUse, match="image is in use") as ei:
        open_image(img)
    assert str(img) in str(ei.value)
    # In another process too (OFD locks are per open file description).
    code = "from livemig.block import open_image\nopen_image(__import__('sys').argv[1])"
    r = subprocess.run([sys.executable, "-c", code, str(img)], capture_output=True, text=True)
    assert r.returncode != 0 and "image is in use" in r.stderr
    # Inactive and read-only opens take no lock and are allowed alongside.
    with open_image(img, inactive=True) as dest, open_image(img, read_only=True) as ro:
        assert not dest.active and ro.active
        with pytest.raises(ImageInUse):
            dest.activate()
        first.inactivate()  # hand over, as the migration source does at switchover
        dest.activate()
        assert dest.active
        with pytest.raises(ImageInUse):
            first.activate()  # the old owner cannot come back while the new one runs
        dest.inactivate()
        first.activate()
    first.close()
    with open_image(img):  # close() released it
        pass


@needs_qemu
def test_qemu_sees_our_lock_and_we_see_qemus(tmp_path):
    img = tmp_path / "a.qcow2"
    create_image(img, 1 << 20)
    d = open_image(img)
    r = qemu_img("info", img, check=False)
    assert r.returncode == 1 and "lock" in r.stderr, r.stderr
    r = run("qemu-io", "-c", "write 0 4k", img, check=False)
    assert r.returncode == 1 and "lock" in r.stderr
    assert qemu_img("info", "-U", img, check=False).returncode == 0  # force-share works
    d.inactivate()
    assert qemu_img("info", img, check=False).returncode == 0  # inactive: no lock held
    p = subprocess.Popen(["qemu-io", "-f", "qcow2", str(img)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert p.stdout.read(9) == b"qemu-io> "
        with pytest.raises(ImageInUse):
            d.activate()
        with pytest.raises(ImageInUse):
            open_image(img)
    finally:
        p.communicate(b"quit\n", timeout=30)
    d.activate()
    assert qemu_img("info", img, check=False).returncode == 1
    d.close()
    assert qemu_img("info", img, check=False).returncode == 0
