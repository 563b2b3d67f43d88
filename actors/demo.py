"""`livemig demo`: two hosts on loopback, a running guest migrated between
them with a progress bar, then verified by replay without migration."""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from actors.launch import HostProcess, free_port
from machine.ram import fill_ram
from machine.workload import WorkloadSpec, replay

DEFAULT_WORKLOAD = "memtouch:rate=16M,wss=32M"


def verify(dst: HostProcess, src_regs: list[dict], ram_size: int, fill: str, seed: int,
           workload: str, vcpus: int) -> dict:
    """Stop the destination guest and compare it with a replay of the same steps."""
    dst.cmd("stop")
    regs = dst.cmd("x-query-vcpus")
    with tempfile.TemporaryDirectory(prefix="livemig-verify-") as tmp:
        dump = os.path.join(tmp, "ram.bin")
        dst.cmd("pmemsave", val=0, size=ram_size, filename=dump)
        migrated = np.fromfile(dump, np.uint8)
    fresh = np.zeros(ram_size, np.uint8)
    fill_ram(fresh, fill, seed)
    steps = [r["step"] for r in regs]
    replayed = replay(fresh.reshape(-1, 4096), WorkloadSpec.parse(workload), seed, vcpus, steps)
    return {"ram_equal": bool(np.array_equal(migrated, fresh)), "vcpu_equal": replayed == regs,
            "steps_source": sum(r["step"] for r in src_regs),
            "steps_destination": sum(steps) - sum(r["step"] for r in src_regs),
            "steps_total": sum(steps)}


def run_demo(ram: int = 256 << 20, workload: str | None = None, uri: str | None = None, seed: int = 42,
             vcpus: int = 1, quiet: bool = False) -> dict:
    from actors.cli import Qmp, follow, print_summary

    workload = workload or DEFAULT_WORKLOAD
    uri = uri or f"tcp:127.0.0.1:{free_port()}"
    tag = f"demo{os.getpid()}"
    guest = ["--ram", str(ram), "--fill", "random", "--seed", str(seed), "--vcpus", str(vcpus),
             "--workload", workload]
    src = dst = None
    try:
        src = HostProcess(f"{tag}-src", *guest)
        dst = HostProcess(f"{tag}-dst", *guest, "--incoming", uri)
        time.sleep(0.5)  # let the guest dirty some memory first
        mon = Qmp(src.qmp_addr)
        try:
            mon("migrate", uri=uri)
            info = follow(mon, 600, quiet=quiet)
        finally:
            mon.close()
        if not quiet:
            print_summary(info)
        result = {"status": info.get("status"), "total_time_ms": info.get("total-time"),
                  "setup_time_ms": info.get("setup-time"), "downtime_ms": info.get("downtime"),
                  "guest_downtime_ms": info.get("x-guest-downtime"),
                  "passes": info.get("ram", {}).get("dirty-sync-count"), "ram": info.get("ram", {})}
        if info.get("status") != "completed":
            result["error"] = info.get("error-desc")
            result["verify"] = {"ram_equal": False, "vcpu_equal": False}
            return result
        src_regs = src.cmd("x-query-vcpus")
        dst.wait_status("running", 30)
        time.sleep(1.0)  # the guest runs on at the destination
        result["verify"] = verify(dst, src_regs, ram, "random", seed, workload, vcpus)
        if not quiet:
            v = result["verify"]
            ok = v["ram_equal"] and v["vcpu_equal"]
            print(f"verify by replay: RAM {'equal' if v['ram_equal'] else 'DIFFERENT'}, vCPU state "
                  f"{'equal' if v['vcpu_equal'] else 'DIFFERENT'} after {v['steps_total']} steps "
                  f"({v['steps_source']} on the source, {v['steps_destination']} on the destination)"
                  f" -> {'VERIFIED' if ok else 'NOT VERIFIED'}")
        return result
    finally:
        for h in (src, dst):
            if h is not None:
                h.close()
