"""Every failure and cancel point ends with exactly one running guest, and
that guest equals a replay of its own steps: RAM, vCPU state and its shared
qcow2 disk (qemu-img check clean, qemu-img compare identical).

The matrix is fault point x side x action, injected with the x-fault
parameter (docs/reliability.md). LIVEMIG_LONG=1 runs every combination;
the default run takes every point and side with a rotating action, so that
each action is exercised too."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from livemig.block import create_image
from tests.conftest import LONG, guest_args
from tests.test_disks import check_clean, qemu_img, replay_disk

SOURCE_POINTS = ["connect", "setup", "pass", "before-stop", "after-stop", "after-eof"]
DEST_POINTS = ["incoming", "after-eof"]
ACTIONS = ["fail", "kill", "stall", "cancel"]


def cases():
    every = [("source", p, a) for p in SOURCE_POINTS for a in ACTIONS] + \
            [("destination", p, a) for p in DEST_POINTS for a in ACTIONS if a != "cancel"]
    if LONG:
        return every
    rotation = itertools.cycle(ACTIONS)
    sample = [("source", p, next(rotation)) for p in SOURCE_POINTS]
    dest_rotation = itertools.cycle(["fail", "kill", "stall"])
    sample += [("destination", p, next(dest_rotation)) for p in DEST_POINTS for _ in range(1)]
    sample += [("source", "pass", "cancel"), ("source", "after-eof", "cancel")]
    return list(dict.fromkeys(sample))


@pytest.mark.parametrize("side, point, action", cases())
def test_fault_matrix(hosts, tmp_path, port, side, point, action):
    img = tmp_path / "shared.qcow2"
    create_image(str(img), 16 << 20, "qcow2", cluster_size=4096)
    args = [*guest_args(ram="32M", workload="kv:rate=300"), "--drive", f"file={img},format=qcow2,id=disk0"]
    src = hosts.start("src", *args)
    dst = hosts.start("dst", *args, "--incoming", f"tcp:127.0.0.1:{port}")
    (src if side == "source" else dst).cmd("migrate-set-parameters", **{"x-fault": f"{point}:{action}"})
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 16 << 20})
    time.sleep(0.3)
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = src.wait_migration(90)
    src.cmd("migrate_cancel")  # a late cancel is harmless
    deadline = time.monotonic() + 30  # a host may take a moment to settle (e.g. hand back a disk)
    while True:
        states = {name: h.cmd("query-status")["status"] for name, h in (("src", src), ("dst", dst))}
        running = [name for name, st in states.items() if st == "running"]
        if len(running) == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(running) == 1, (states, info)
    if info["status"] == "completed":
        assert action == "cancel" and point == "after-eof", info  # too late to cancel: it completed
        survivor = dst
    else:
        assert info["status"] in ("failed", "cancelled") and running == ["src"], (states, info)
        if info["status"] == "failed":
            assert info.get("error-desc"), info
        assert dst.cmd("query-status")["status"] == "inmigrate"
        survivor = src
    # The survivor runs on, and equals the replay of its own steps.
    before = survivor.cmd("x-query-vcpus")[0]["step"]
    deadline = time.monotonic() + 10
    while survivor.cmd("x-query-vcpus")[0]["step"] <= before:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    survivor.cmd("stop")
    regs = survivor.cmd("x-query-vcpus")
    guest = survivor.cmd("x-query-host")["guest"]
    dump = tmp_path / "ram.bin"
    survivor.cmd("pmemsave", val=0, size=32 << 20, filename=str(dump))
    for h in (src, dst):
        h.close()
    check_clean(img)
    ram: list = []
    replayed, vcpu_equal, _ = replay_disk(tmp_path, guest, regs, 16 << 20, "qcow2", 4096, ram_out=ram)
    assert vcpu_equal
    assert np.array_equal(np.fromfile(dump, np.uint8), ram[0])
    cmp = qemu_img("compare", str(img), replayed)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def start_pair(hosts, port, extra_src=(), extra_dst=()):
    args = guest_args(ram="32M", workload="memtouch:rate=2M,wss=4M")
    src = hosts.start("src", *args, *extra_src)
    dst = hosts.start("dst", *args, *extra_dst, "--incoming", f"tcp:127.0.0.1:{port}")
    return src, dst


def test_slow_destination_back_pressure(hosts, tmp_path, port):
    """A destination that reads slowly holds the source back; nothing is lost."""
    from tests.conftest import replay_matches

    src, dst = start_pair(hosts, port)
    dst.cmd("migrate-set-parameters", **{"x-fault": "incoming:slow"})
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = src.wait_migration(120)
    assert info["status"] == "completed", info
    assert info["total-time"] > 1000  # 32 MiB at ~13 MB/s: the slow reader set the pace
    dst.wait_status("running", 30)
    result = replay_matches(dst, tmp_path)
    assert result["ram_equal"] and result["vcpu_equal"]


@pytest.mark.parametrize("side", ["source", "destination"])
def test_connection_reset(hosts, tmp_path, port, side):
    from tests.conftest import replay_matches

    src, dst = start_pair(hosts, port)
    point = "pass" if side == "source" else "incoming"
    (src if side == "source" else dst).cmd("migrate-set-parameters", **{"x-fault": f"{point}:reset"})
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 16 << 20})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = src.wait_migration(60)
    assert info["status"] == "failed" and info["error-desc"], info
    assert dst.wait_migration(30)["status"] == "failed"
    assert dst.cmd("query-status")["status"] == "inmigrate"
    result = replay_matches(src, tmp_path)
    assert result["ram_equal"] and result["vcpu_equal"]


def test_fault_during_block_bulk(hosts, tmp_path, port):
    """kill the block sender in the bulk phase: the migration fails with the
    cause, and the source guest and its disk carry on intact."""
    src_img, dst_img = tmp_path / "src.qcow2", tmp_path / "dst.qcow2"
    create_image(str(src_img), 32 << 20, "qcow2")
    args = guest_args(ram="32M", workload="diskwrite:iops=200,size=4096")
    src = hosts.start("src", *args, "--drive", f"file={src_img},format=qcow2,id=disk0")
    dst = hosts.start("dst", *args, "--drive", f"file={dst_img},format=qcow2,id=disk0,size=32M",
                      "--incoming", f"tcp:127.0.0.1:{port}")
    src.cmd("migrate-set-parameters", **{"x-fault": "block-bulk:kill-block_sender", "max-bandwidth": 8 << 20})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}", blk=True)
    info = src.wait_migration(60)
    assert info["status"] == "failed" and "block_sender" in info["error-desc"], info
    assert src.cmd("query-status")["status"] == "running"
    src.cmd("stop")
    regs = src.cmd("x-query-vcpus")
    guest = src.cmd("x-query-host")["guest"]
    for h in (src, dst):
        h.close()
    check_clean(src_img)
    replayed, vcpu_equal, _ = replay_disk(tmp_path, guest, regs, 32 << 20, "qcow2", 65536)
    assert vcpu_equal
    cmp = qemu_img("compare", str(src_img), replayed)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
