"""Scenario 7, converge: guests dirtying 0.5x, 1x, 2x and 4x the bandwidth,
each migrated with no brake, with auto-converge (QEMU's default parameters)
and with dirty-limit (vcpu-dirty-limit three quarters of the bandwidth). Per run: completed or not (cancelled at the
timeout), total time, downtime against the limit, and the guest's lost work:
1 - the vCPU steps it ran during the migration over what an unthrottled
vCPU runs in the same time. The bandwidth is max-bandwidth on loopback, so
that the figures do not need root; docs/rig.md has the shaped links."""

from __future__ import annotations

import time

from livemig.machine.runstate import MIGRATION_END
from livemig.machine.workload import PAGE_SIZE
from livemig.tools.launch import free_port

from .migrate import Guest, Hosts, qmp_call
from .targets import MiB, mbps

CONVERGE_BANDWIDTH = 8 * MiB  # bytes/s
CONVERGE_RAM = 32 * MiB
CONVERGE_WSS = 16 * MiB
CONVERGE_SHARES = (0.5, 1.0, 2.0, 4.0)
CONVERGE_MODES = ("none", "auto-converge", "dirty-limit")
CONVERGE_LIMIT_MS = 300
CONVERGE_TIMEOUT = 40.0  # s: a migration still running is cancelled, not converged
# dirty-limit's quota: QEMU's default (1 MB/s) would stop a guest dead; what a
# user would pick is a share of the link, here three quarters of it (MiB/s).
CONVERGE_DIRTY_LIMIT = CONVERGE_BANDWIDTH * 3 // 4 // MiB


def steps(mon) -> int:
    return sum(v["step"] for v in qmp_call(mon, "x-query-vcpus"))


def one(share: float, mode: str, tag: str) -> dict:
    rate = int(CONVERGE_BANDWIDTH * share)
    guest = Guest(CONVERGE_RAM, "random", f"memtouch:rate={rate},wss={CONVERGE_WSS}", stopped=False)
    uri = f"tcp:127.0.0.1:{free_port()}"
    with Hosts(guest, uri, tag) as hosts:
        mon = hosts.src.qmp()
        try:
            qmp_call(mon, "migrate-set-parameters", **{"max-bandwidth": CONVERGE_BANDWIDTH,
                                                       "downtime-limit": CONVERGE_LIMIT_MS})
            if mode != "none":
                qmp_call(mon, "migrate-set-capabilities", capabilities=[{"capability": mode, "state": True}])
            if mode == "dirty-limit":
                qmp_call(mon, "migrate-set-parameters", **{"vcpu-dirty-limit": CONVERGE_DIRTY_LIMIT})
            time.sleep(0.5)  # let the guest dirty its working set
            start_steps, t0 = steps(mon), time.monotonic()
            qmp_call(mon, "migrate", uri=uri)
            peak = 0
            while (info := qmp_call(mon, "query-migrate"))["status"] not in MIGRATION_END:
                peak = max(peak, info.get("cpu-throttle-percentage", 0))
                if time.monotonic() - t0 > CONVERGE_TIMEOUT:
                    end_steps, ran = steps(mon), time.monotonic() - t0
                    qmp_call(mon, "migrate_cancel")
                    info = hosts.src.wait_migration(60)
                    break
                time.sleep(0.1)
            else:
                # Completed or failed: the source stopped at the switchover.
                end_steps = steps(mon)
                ran = (info.get("total-time", 0) - info.get("downtime", 0)) / 1000
        finally:
            mon.close()
    free = rate / PAGE_SIZE * ran  # steps an unthrottled vCPU runs meanwhile
    return {"dirty-share": share, "mode": mode, "dirty-mbps": mbps(rate), "max-bandwidth": CONVERGE_BANDWIDTH,
            "status": info["status"], "completed": info["status"] == "completed",
            "total-time": info.get("total-time"), "downtime": info.get("downtime"),
            "downtime-limit": CONVERGE_LIMIT_MS, "dirty-sync-count": info.get("ram", {}).get("dirty-sync-count"),
            "peak-cpu-throttle-percentage": peak,
            "lost-work": max(0.0, 1 - (end_steps - start_steps) / free) if free else 0.0}


def converge(log, tag) -> list[dict]:
    out = []
    for share in CONVERGE_SHARES:
        for mode in CONVERGE_MODES:
            row = one(share, mode, tag())
            out.append(row)
            log(f"  converge {share:>3}x {mode:<13}: {row['status']}, {row['total-time']} ms, downtime "
                f"{row['downtime']} ms, lost work {row['lost-work'] * 100:.0f} %, peak throttle "
                f"{row['peak-cpu-throttle-percentage']} %")
    return out
