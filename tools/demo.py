"""`livemig demo`: two hosts on loopback, a running guest migrated between
them with a progress bar, then verified by replay without migration."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

import numpy as np

from livemig.block import open_image
from livemig.cli.progress import follow, print_summary
from livemig.cli.qmp_client import Qmp
from livemig.machine.disk import Disk, DriveSpec
from livemig.machine.ram import fill_ram
from livemig.machine.workload import WorkloadSpec, replay
from livemig.tools.launch import HostProcess, free_port

DEFAULT_WORKLOAD = "memtouch:rate=16M,wss=32M"
DISK_WORKLOAD = "diskwrite:iops=300,size=4096"
# --postcopy: a guest dirtying four times what the link carries, which pre-copy
# cannot move; the source switches to post-copy after two passes by itself.
POSTCOPY_WORKLOAD = "memtouch:rate=64M,wss=192M"
POSTCOPY_LINK = 16 << 20  # bytes/s: max-bandwidth and max-postcopy-bandwidth
POSTCOPY_AFTER_PASSES = 2
DISK_SIZE = 64 << 20


def compare_disks(image: str, replay_path: str) -> dict:
    equal = True
    with open_image(image, "qcow2", read_only=True) as a, open_image(replay_path, "qcow2", read_only=True) as b:
        for offset in range(0, DISK_SIZE, 4 << 20):
            if a.read(offset, 4 << 20) != b.read(offset, 4 << 20):
                equal = False
                break
    out = {"disk-equal": equal, "disk-image": image, "replay-image": replay_path}
    if shutil.which("qemu-img"):
        check = subprocess.run(["qemu-img", "check", image], capture_output=True, timeout=120)
        out["disk-check-clean"] = check.returncode == 0
    return out


def verify(dst: HostProcess, src_regs: list[dict], ram_size: int, fill: str, seed: int,
           workload: str, vcpus: int, image: str | None = None, workdir: str = "") -> dict:
    """Stop the destination guest and compare it with a replay of the same
    steps on a fresh guest (and a fresh disk image) that never migrated."""
    dst.cmd("stop")
    regs = dst.cmd("x-query-vcpus")
    with tempfile.TemporaryDirectory(prefix="livemig-verify-") as tmp:
        dump = os.path.join(tmp, "ram.bin")
        dst.cmd("pmemsave", val=0, size=ram_size, filename=dump)
        migrated = np.fromfile(dump, np.uint8)
    disks = []
    if image is not None:
        dst.close()  # closes the image: everything it wrote is on disk now
        replay_path = os.path.join(workdir, "replay.qcow2")
        if os.path.exists(replay_path):
            os.unlink(replay_path)
        disks.append(Disk(DriveSpec(file=replay_path, id="disk0", format="qcow2", size=DISK_SIZE)))
    fresh = np.zeros(ram_size, np.uint8)
    fill_ram(fresh, fill, seed)
    steps = [r["step"] for r in regs]
    replayed = replay(fresh.reshape(-1, 4096), WorkloadSpec.parse(workload), seed, vcpus, steps, disks)
    out = {"ram-equal": bool(np.array_equal(migrated, fresh)), "vcpu-equal": replayed == regs,
           "steps-source": sum(r["step"] for r in src_regs),
           "steps-destination": sum(steps) - sum(r["step"] for r in src_regs),
           "steps-total": sum(steps)}
    for d in disks:
        d.close()
        out.update(compare_disks(image, d.spec.file))
    return out


def run_demo(ram: int = 256 << 20, workload: str | None = None, uri: str | None = None, seed: int = 42,
             vcpus: int = 1, quiet: bool = False, disk: bool = False, keep: str | None = None,
             postcopy: bool = False) -> dict:
    """With `disk`, the guest writes to a qcow2 image that both hosts share
    (in `keep`, or a temporary directory), and the image is verified too."""
    with tempfile.TemporaryDirectory(prefix="livemig-demo-") as tmp:
        workdir = keep or tmp
        os.makedirs(workdir, exist_ok=True)
        default = DISK_WORKLOAD if disk else POSTCOPY_WORKLOAD if postcopy else DEFAULT_WORKLOAD
        return _run_demo(ram, workload or default, uri, seed, vcpus,
                         quiet, os.path.join(workdir, "disk.qcow2") if disk else None, workdir, postcopy)


def _run_demo(ram, workload, uri, seed, vcpus, quiet, image, workdir, postcopy=False) -> dict:
    uri = uri or f"tcp:127.0.0.1:{free_port()}"
    tag = f"demo{os.getpid()}"
    guest = ["--ram", str(ram), "--fill", "random", "--seed", str(seed), "--vcpus", str(vcpus),
             "--workload", workload]
    if image is not None:
        if os.path.exists(image):
            os.unlink(image)
        guest += ["--drive", f"file={image},format=qcow2,id=disk0,size={DISK_SIZE}"]
    src = dst = None
    try:
        src = HostProcess(f"{tag}-src", *guest)
        dst = HostProcess(f"{tag}-dst", *guest, "--incoming", uri)
        if postcopy:
            for h in (src, dst):
                h.cmd("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": True}])
            src.cmd("migrate-set-parameters", **{"max-bandwidth": POSTCOPY_LINK,
                                                 "max-postcopy-bandwidth": POSTCOPY_LINK,
                                                 "x-postcopy-after-passes": POSTCOPY_AFTER_PASSES})
        time.sleep(0.5)  # let the guest dirty some memory first
        mon = Qmp(src.qmp_addr)
        try:
            mon("migrate", uri=uri)
            info = follow(mon, 600, quiet=quiet)
        finally:
            mon.close()
        if not quiet:
            print_summary(info)
        # The source's final query-migrate, as `migrate --json` prints it, and the verdict.
        result = dict(info)
        if info.get("status") != "completed":
            result["verify"] = {"ram-equal": False, "vcpu-equal": False}
            return result
        src_regs = src.cmd("x-query-vcpus")
        dst.wait_status("running", 30)
        time.sleep(1.0)  # the guest runs on at the destination
        result["verify"] = verify(dst, src_regs, ram, "random", seed, workload, vcpus, image, workdir)
        if not quiet:
            v = result["verify"]
            ok = v["ram-equal"] and v["vcpu-equal"] and v.get("disk-equal", True)
            if "disk-equal" in v:
                print(f"disk: {'equal' if v['disk-equal'] else 'DIFFERENT'} to the replay image "
                      f"({v['disk-image']} vs {v['replay-image']})")
            print(f"verify by replay: RAM {'equal' if v['ram-equal'] else 'DIFFERENT'}, vCPU state "
                  f"{'equal' if v['vcpu-equal'] else 'DIFFERENT'} after {v['steps-total']} steps "
                  f"({v['steps-source']} on the source, {v['steps-destination']} on the destination)"
                  f" -> {'VERIFIED' if ok else 'NOT VERIFIED'}")
        return result
    finally:
        for h in (src, dst):
            if h is not None:
                h.close()
