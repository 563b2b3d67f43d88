"""Disks in migration: shared storage handed over with inactivate/activate
(the seed's fix, and the bug without it), and block migration (blk, inc),
each checked with qemu-img against a replay of the guest's steps."""

from __future__ import annotations

import json
import subprocess
import time

import numpy as np
import pytest

from livemig.block import create_image, open_image
from livemig.machine.disk import Disk, DriveSpec
from livemig.machine.ram import fill_ram
from livemig.machine.workload import WorkloadSpec, replay
from tests.conftest import guest_args

DISKWRITE = "diskwrite:iops=400,size=4096"
# Block migration re-sends whole 1 MiB chunks: a gentler writer lets it converge.
SLOW_DISKWRITE = "diskwrite:iops=20,size=4096"
BLOCK_PARAMS = {"max-bandwidth": 32 << 20}


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=120)


def check_clean(path) -> None:
    out = qemu_img("check", "--output=json", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert not report.get("leaks") and not report.get("corruptions"), report


def replay_disk(tmp_path, host_guest: dict, regs: list[dict], size: int, fmt: str, cluster: int,
                backing=None, backing_format: str = "raw", ram_out: list | None = None
                ) -> tuple[str, bool, list[dict]]:
    """Replay the guest's steps on a fresh image; returns (image, vcpu_equal,
    registers), and the replayed RAM in ram_out when given."""
    path = str(tmp_path / f"replay.{fmt}")
    if backing:
        create_image(path, size, fmt, cluster_size=cluster, backing=str(backing), backing_format=backing_format)
    disk = Disk(DriveSpec(file=path, id="disk0", format=fmt, size=size, cluster_size=cluster))
    ram_size = sum(b[1] for b in host_guest["blocks"])
    pages = np.zeros(ram_size, np.uint8)
    fill_ram(pages, host_guest["fill"], host_guest["seed"])
    regs_replayed = replay(pages.reshape(-1, 4096), WorkloadSpec.parse(host_guest["workload"]),
                           host_guest["seed"], host_guest["vcpus"], [r["step"] for r in regs], [disk])
    disk.close()
    if ram_out is not None:
        ram_out.append(pages)
    return path, regs_replayed == regs, regs_replayed


def run_migration(hosts, port, src_drive: str, dst_drive: str, *, params=None, caps_dst=None, blk=False,
                  inc=False, ram="32M", workload=DISKWRITE):
    args = guest_args(ram=ram, workload=workload)
    src = hosts.start("src", *args, "--drive", src_drive)
    dst = hosts.start("dst", *args, "--drive", dst_drive, "--incoming", f"tcp:127.0.0.1:{port}")
    if caps_dst:
        dst.cmd("migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in caps_dst])
    src.cmd("migrate-set-parameters", **(params or {"max-bandwidth": 8 << 20}))
    time.sleep(0.5)
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}", blk=blk, inc=inc)
    info = src.wait_migration(120)
    return src, dst, info


def finish(dst, tmp_path):
    """Let the destination run on, stop it, and take its state; quit so the image is closed."""
    dst.wait_status("running", 30)
    time.sleep(0.5)
    dst.cmd("stop")
    regs = dst.cmd("x-query-vcpus")
    guest = dst.cmd("x-query-host")["guest"]
    dst.close()
    return regs, guest


@pytest.mark.parametrize("cluster", [pytest.param(4096, marks=pytest.mark.long), 65536])
def test_shared_storage_qcow2(hosts, tmp_path, port, cluster):
    img = tmp_path / "shared.qcow2"
    create_image(str(img), 64 << 20, "qcow2", cluster_size=cluster)
    drive = f"file={img},format=qcow2,id=disk0"
    src, dst, info = run_migration(hosts, port, drive, drive)
    assert info["status"] == "completed", info
    regs, guest = finish(dst, tmp_path)
    src.close()
    check_clean(img)
    replayed, vcpu_equal, _ = replay_disk(tmp_path, guest, regs, 64 << 20, "qcow2", cluster)
    assert vcpu_equal
    check_clean(replayed)
    cmp = qemu_img("compare", str(img), replayed)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def test_skip_invalidate_reproduces_the_seed_bug(hosts, tmp_path, port):
    """Without dropping cached metadata the destination resumes on stale
    tables: the disk no longer equals the replay (or qemu-img finds damage)."""
    img = tmp_path / "shared.qcow2"
    create_image(str(img), 64 << 20, "qcow2", cluster_size=4096)
    drive = f"file={img},format=qcow2,id=disk0"
    src, dst, info = run_migration(hosts, port, drive, drive, caps_dst=["x-skip-invalidate"])
    assert info["status"] == "completed", info
    regs, guest = finish(dst, tmp_path)
    src.close()
    replayed, _, _ = replay_disk(tmp_path, guest, regs, 64 << 20, "qcow2", 4096)
    check = qemu_img("check", str(img))
    cmp = qemu_img("compare", str(img), replayed)
    assert check.returncode != 0 or cmp.returncode != 0, "stale metadata went unnoticed"


def test_only_one_side_holds_the_lock(hosts, tmp_path, port):
    img = tmp_path / "shared.qcow2"
    create_image(str(img), 64 << 20, "qcow2")
    drive = f"file={img},format=qcow2,id=disk0"
    args = guest_args(ram="32M", workload=DISKWRITE)
    src = hosts.start("src", *args, "--drive", drive)
    dst = hosts.start("dst", *args, "--drive", drive, "--incoming", f"tcp:127.0.0.1:{port}")
    # Source active (locked), destination inactive: a second writer is refused...
    assert "lock" in qemu_img("info", str(img)).stderr.lower()
    # ...and the inactive side cannot write.
    with open_image(str(img), inactive=True) as inactive:
        with pytest.raises(Exception, match="inactive"):
            inactive.write(0, b"x" * 512)
    blocks = {h: h.cmd("query-block") for h in (src, dst)}
    assert blocks[src][0]["inserted"]["active"] and not blocks[dst][0]["inserted"]["active"]
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert src.wait_migration(60)["status"] == "completed"
    dst.wait_status("running", 30)
    assert not src.cmd("query-block")[0]["inserted"]["active"]
    assert dst.cmd("query-block")[0]["inserted"]["active"]


@pytest.mark.parametrize("fmt", [pytest.param("raw", marks=pytest.mark.long), "qcow2"])  # raw in the next
def test_block_migration_blk(hosts, tmp_path, port, fmt):
    src_img, dst_img = tmp_path / f"src.{fmt}", tmp_path / f"dst.{fmt}"
    create_image(str(src_img), 32 << 20, fmt)
    with open_image(str(src_img)) as d:  # some content before the guest starts
        d.write(5 << 20, bytes(range(256)) * 4096)
    src, dst, info = run_migration(hosts, port, f"file={src_img},format={fmt},id=disk0",
                                   f"file={dst_img},format={fmt},id=disk0,size=32M", blk=True,
                                   workload=SLOW_DISKWRITE, params=BLOCK_PARAMS)
    assert info["status"] == "completed", info
    assert info["disk"]["total"] == 32 << 20 and info["disk"]["transferred"] >= 32 << 20
    regs, guest = finish(dst, tmp_path)
    src.close()
    base = tmp_path / "base.raw"
    create_image(str(base), 32 << 20, "raw")
    with open_image(str(base)) as d:
        d.write(5 << 20, bytes(range(256)) * 4096)
    replayed, vcpu_equal, _ = replay_disk(tmp_path, guest, regs, 32 << 20, "qcow2", 65536, backing=base)
    assert vcpu_equal
    if fmt == "qcow2":
        check_clean(dst_img)
    cmp = qemu_img("compare", "-f", fmt, str(dst_img), replayed)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


@pytest.mark.parametrize("fmt", ["raw", pytest.param("qcow2", marks=pytest.mark.long)])  # qcow2 in the last
def test_block_migration_inc_over_shared_base(hosts, tmp_path, port, fmt):
    base = tmp_path / f"base.{fmt}"
    create_image(str(base), 32 << 20, fmt)
    with open_image(str(base)) as d:
        d.write(1 << 20, b"\xab" * (3 << 20))
    src_img, dst_img = tmp_path / "src.qcow2", tmp_path / "dst.qcow2"
    for p in (src_img, dst_img):
        create_image(str(p), 32 << 20, "qcow2", backing=str(base), backing_format=fmt)
    src, dst, info = run_migration(hosts, port, f"file={src_img},format=qcow2,id=disk0",
                                   f"file={dst_img},format=qcow2,id=disk0", inc=True,
                                   workload=SLOW_DISKWRITE, params=BLOCK_PARAMS)
    assert info["status"] == "completed", info
    regs, guest = finish(dst, tmp_path)
    src.close()
    replayed, vcpu_equal, _ = replay_disk(tmp_path, guest, regs, 32 << 20, "qcow2", 65536,
                                          backing=base, backing_format=fmt)
    assert vcpu_equal
    check_clean(dst_img)
    cmp = qemu_img("compare", str(dst_img), replayed)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def test_inc_sends_only_what_the_top_image_allocates(hosts, tmp_path, port):
    base = tmp_path / "base.raw"
    create_image(str(base), 32 << 20, "raw")
    with open_image(str(base)) as d:
        d.write(0, b"\x11" * (32 << 20))
    src_img, dst_img = tmp_path / "src.qcow2", tmp_path / "dst.qcow2"
    for p in (src_img, dst_img):
        create_image(str(p), 32 << 20, "qcow2", backing=str(base), backing_format="raw")
    with open_image(str(src_img)) as d:
        d.write(3 << 20, b"\x22" * (2 << 20))  # two chunks in the top image
    src, dst, info = run_migration(hosts, port, f"file={src_img},format=qcow2,id=disk0",
                                   f"file={dst_img},format=qcow2,id=disk0", inc=True, workload="idle")
    assert info["status"] == "completed", info
    assert info["disk"]["transferred"] == 2 << 20, info["disk"]
    dst.wait_status("running", 30)
    dst.close()
    src.close()
    cmp = qemu_img("compare", str(src_img), str(dst_img))
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


@pytest.mark.parametrize("how", ["cancel", "kill-destination"])
def test_block_migration_interrupted_source_runs_on(hosts, tmp_path, port, how):
    src_img, dst_img = tmp_path / "src.qcow2", tmp_path / "dst.qcow2"
    create_image(str(src_img), 32 << 20, "qcow2")
    args = guest_args(ram="32M", workload=DISKWRITE)
    src = hosts.start("src", *args, "--drive", f"file={src_img},format=qcow2,id=disk0")
    dst = hosts.start("dst", *args, "--drive", f"file={dst_img},format=qcow2,id=disk0,size=32M",
                      "--incoming", f"tcp:127.0.0.1:{port}")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 4 << 20})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}", blk=True)
    src.wait_migration(20, states=("active",))
    time.sleep(1.0)
    assert src.cmd("query-migrate")["disk"]["transferred"] > 0
    if how == "cancel":
        src.cmd("migrate_cancel")
    else:
        dst.kill()
    info = src.wait_migration(60)
    assert info["status"] == ("cancelled" if how == "cancel" else "failed"), info
    assert src.cmd("query-status")["status"] == "running"
    before = src.cmd("x-query-vcpus")[0]["step"]
    time.sleep(0.5)
    assert src.cmd("x-query-vcpus")[0]["step"] > before
    regs, guest = finish(src, tmp_path)
    check_clean(src_img)
    replayed, vcpu_equal, _ = replay_disk(tmp_path, guest, regs, 32 << 20, "qcow2", 65536)
    assert vcpu_equal
    cmp = qemu_img("compare", str(src_img), replayed)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def test_capability_block_and_block_incremental_do_what_blk_and_inc_do(hosts, tmp_path, port):
    """QEMU's other way to ask for block migration: capability block, parameter block-incremental."""
    base = tmp_path / "base.raw"
    create_image(str(base), 32 << 20, "raw")
    src_img, dst_img = tmp_path / "src.qcow2", tmp_path / "dst.qcow2"
    for p in (src_img, dst_img):
        create_image(str(p), 32 << 20, "qcow2", backing=str(base), backing_format="raw")
    with open_image(str(src_img)) as d:
        d.write(3 << 20, b"\x22" * (2 << 20))  # two chunks in the top image
    args = guest_args(ram="32M", workload="idle")
    src = hosts.start("src", *args, "--drive", f"file={src_img},format=qcow2,id=disk0")
    dst = hosts.start("dst", *args, "--drive", f"file={dst_img},format=qcow2,id=disk0",
                      "--incoming", f"tcp:127.0.0.1:{port}")
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "block", "state": True}])
    src.cmd("migrate-set-parameters", **{"block-incremental": True})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = src.wait_migration(120)
    assert info["status"] == "completed" and info["disk"]["transferred"] == 2 << 20, info
    dst.wait_status("running", 30)
    dst.close()
    src.close()
    cmp = qemu_img("compare", str(src_img), str(dst_img))
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
