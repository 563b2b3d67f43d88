"""Scenario 9, postcopy: the same guest migrated with pre-copy and with
post-copy (switched after the first pass, x-postcopy-after-passes 1), on
loopback under max-bandwidth and over a rig link of 1 Gbit/s (network
namespaces, tc; root only), there also paced: max-bandwidth and
max-postcopy-bandwidth at 80 % of the link. Per run: outcome, total time, downtime (for
post-copy the stop until RUN is on the wire: the destination runs the guest
from RUN on), pre-copy's expected downtime when it never converges, fault
latency p50/p99 (from a fault read to its page placed), QEMU's
postcopy-blocktime and postcopy-vcpu-blocktime, and the replay check.
Every run is one `livemig rig` scenario (tools/rig.py)."""

from __future__ import annotations

import os
import tempfile

from livemig.tools.rig import GuestSpec, Link, Rig, Scenario

from .targets import MiB

LOOPBACK_BANDWIDTH = 16 * MiB  # bytes/s: max-bandwidth and max-postcopy-bandwidth
LOOPBACK_SHARES = (0.5, 4.0)  # dirty rate / bandwidth
RIG_RATE = "1gbit"
RIG_BANDWIDTH = 125_000_000  # bytes/s the 1 Gbit/s link carries
RIG_SHARES = (0.5, 2.0)  # the rig link: under and over what it carries
VCPUS = 2
PRECOPY_TIMEOUT = 20.0  # s: a pre-copy still running is cancelled, not converged
PACED = 0.8  # share of the rig link for max-bandwidth and max-postcopy-bandwidth, mode postcopy-paced
POSTCOPY_CAPS = {"postcopy-ram": True, "postcopy-blocktime": True}


def scenario(link: str, share: float, bandwidth: int, mode: str) -> Scenario:
    """One guest dirtying `share` x `bandwidth` over its working set, one migration."""
    loopback = link == "loopback"
    ram = "32M" if loopback else "128M"
    wss = "16M" if loopback else "64M"
    rate = int(share * bandwidth / VCPUS)  # memtouch's rate is per vCPU
    guest = GuestSpec(name="g", host="A", ram=ram, workload=f"memtouch:rate={rate},wss={wss}", vcpus=VCPUS)
    migration: dict = {"guest": "g", "to": "B"}
    params = {"downtime-limit": 300, "max-bandwidth": bandwidth if loopback else 0}
    if mode == "postcopy-paced":  # both phases held under the link: no queue for requested pages
        params["max-bandwidth"] = int(PACED * bandwidth)
    if mode.startswith("postcopy"):
        migration["capabilities"] = POSTCOPY_CAPS
        params.update({"x-postcopy-after-passes": 1, "max-postcopy-bandwidth": params["max-bandwidth"]})
    else:
        migration["timeout"] = PRECOPY_TIMEOUT
    links = [] if loopback else [Link("A", "B", rate=RIG_RATE, index=1)]
    return Scenario(name=f"postcopy-{link}-{share}-{mode}", hosts=["A", "B"], links=links, guests={"g": guest},
                    migrations=[migration], parameters=params, timeout=120)


def one(link: str, share: float, bandwidth: int, mode: str, env: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="livemig-bench-postcopy-") as out:
        rig = Rig(scenario(link, share, bandwidth, mode), os.path.join(out, "rig"), loopback=link == "loopback")
        rig.env = env
        (r,) = rig.execute()
    return {"link": link, "share": share, "mode": mode, "bandwidth": bandwidth, "status": r["status"],
            "timeout_s": PRECOPY_TIMEOUT if mode == "precopy" else None,
            "completed": r["status"] == "completed", "total_ms": r.get("total-time"),
            "downtime_ms": r.get("downtime") if r["status"] == "completed" else None,
            "expected_downtime_ms": r.get("expected-downtime"), "passes": r.get("dirty-sync-count"),
            "verified": r.get("verified"), "faults": r.get("x-faults"), "fault_p50_ms": r.get("x-fault-p50"),
            "fault_p99_ms": r.get("x-fault-p99"), "blocktime_ms": r.get("postcopy-blocktime"),
            "vcpu_blocktime_ms": r.get("postcopy-vcpu-blocktime"), "placed_twice": r.get("x-placed-twice"),
            "missing": r.get("x-missing"), "postcopy_requests": r.get("postcopy-requests")}


def postcopy(log, env: dict | None = None) -> list[dict]:
    plan = [("loopback", s, LOOPBACK_BANDWIDTH) for s in LOOPBACK_SHARES]
    if os.geteuid() == 0:
        plan += [(RIG_RATE, s, RIG_BANDWIDTH) for s in RIG_SHARES]
    else:
        log("  postcopy: not root, so no rig link (loopback only)")
    rows = []
    for link, share, bandwidth in plan:
        for mode in ("precopy", "postcopy") + (() if link == "loopback" else ("postcopy-paced",)):
            row = one(link, share, bandwidth, mode, env or {})
            rows.append(row)
            log(f"  postcopy {link} {share}x {mode:<8}: {row['status']}, {row['total_ms']} ms, downtime "
                f"{row['downtime_ms']} ms (expected {row['expected_downtime_ms']}), fault p50/p99 "
                f"{row['fault_p50_ms']}/{row['fault_p99_ms']} ms, blocktime {row['vcpu_blocktime_ms']}")
    return rows
