"""Every failure and cancel point ends with exactly one running guest, and
that guest equals a replay of its own steps: RAM, vCPU state and its shared
qcow2 disk (qemu-img check clean, qemu-img compare identical).

The matrix is fault point x side x action, injected with the x-fault
parameter (docs/reliability.md). LIVEMIG_MATRIX=full runs every combination;
the default run takes every point and side with a rotating action, so that
each action is exercised too."""

from __future__ import annotations

import itertools
import os
import time

import numpy as np
import pytest

from block import create_image
from tests.conftest import guest_args
from tests.test_disks import check_clean, qemu_img, replay_disk

SOURCE_POINTS = ["connect", "setup", "pass", "before-stop", "after-stop", "after-eof"]
DEST_POINTS = ["incoming", "after-eof"]
ACTIONS = ["fail", "kill", "stall", "cancel"]


def cases():
    every = [("source", p, a) for p in SOURCE_POINTS for a in ACTIONS] + \
            [("destination", p, a) for p in DEST_POINTS for a in ACTIONS if a != "cancel"]
    if os.environ.get("LIVEMIG_MATRIX") == "full":
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
