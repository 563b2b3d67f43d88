"""Scenarios 2 to 6 (stopped, zero, running, scaling, qcow2): the Bench that
runs them and collects their results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from livemig.tools.tls_certs import make_pki

from .baseline import baseline
from .migrate import Guest, Run, migrate
from .targets import (
    DIRTY_SHARES,
    DOWNTIME_LIMITS,
    DOWNTIME_SLACK_MS,
    RUNNING_BANDWIDTH,
    RUNNING_RAM,
    SCALING_SIZES,
    GiB,
    MiB,
    targets,
)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


class Bench:
    def __init__(self, out: str, repeat: int, log: Callable[[str], None]) -> None:
        self.out = out
        self.repeat = repeat
        self.log = log
        self.workdir = tempfile.mkdtemp(prefix="livemig-bench-")
        self.n = 0
        self.results: dict = {
            "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")},
            "repeat": repeat,
        }

    def tag(self) -> str:
        self.n += 1
        return f"bench{os.getpid()}-{self.n}"

    def close(self) -> None:
        import shutil
        shutil.rmtree(self.workdir, ignore_errors=True)

    # 1 + 2 + 3 -------------------------------------------------------------------------
    def stopped(self, ram: int, transports: tuple[str, ...], fills: tuple[str, ...]) -> None:
        """Baselines and stopped-guest migrations, interleaved run by run so
        that machine noise hits both sides of every ratio alike."""
        base = {t: [] for t in transports}
        runs: dict[tuple[str, str], list[Run]] = {(f, t): [] for f in fills for t in transports}
        for i in range(self.repeat):
            for t in transports:
                secs = baseline(t, ram, self.workdir)
                base[t].append(secs)
                self.log(f"  baseline {t} run {i + 1}: {ram / secs / 1e9:.2f} GB/s")
                for fill in fills:
                    run = migrate(Guest(ram, fill), t, self.workdir, {"max-bandwidth": 0}, self.tag())
                    runs[(fill, t)].append(run)
                    self.log(f"  stopped {fill:<6} {t} run {i + 1}: {ram / run.info['total-time'] * 1e3 / 1e9:.2f}"
                             f" GB/s ({run.info['total-time']} ms)")
        self.results["baseline"] = {
            t: {"bytes": ram, "seconds": base[t], "bytes_per_s": ram / median(base[t])} for t in transports}
        out = self.results.setdefault("stopped", [])
        for (fill, t), rs in runs.items():
            total = median([r.info["total-time"] / 1000 for r in rs])
            rate = ram / total
            out.append({
                "fill": fill, "transport": t, "ram": ram,
                "total_seconds": total, "runs_seconds": [r.info["total-time"] / 1000 for r in rs],
                "throughput": rate, "ratio": rate / self.results["baseline"][t]["bytes_per_s"],
                "downtime_ms": median([r.info.get("downtime", 0) for r in rs]),
                "transferred": rs[0].info["ram"].get("transferred", 0),
                "cpu_src": median([sum(v for k, v in r.cpu.items() if k.startswith("src/")) for r in rs]),
                "cpu_dst": median([sum(v for k, v in r.cpu.items() if k.startswith("dst/")) for r in rs]),
                "cpu_per_actor": {k: median([r.cpu.get(k, 0) for r in rs]) for k in rs[0].cpu},
            })

    # 7 ---------------------------------------------------------------------------------
    def tls(self, ram: int) -> None:
        """A stopped incompressible guest over tcp, plaintext and TLS run by
        run: TLS throughput as a ratio to the same run's plaintext, and what
        it costs each side in CPU per GiB."""
        pki = make_pki(Path(self.workdir) / "pki")
        runs: dict[bool, list[Run]] = {False: [], True: []}
        for i in range(self.repeat):
            for tls in (False, True):
                run = migrate(Guest(ram, "random"), "tcp", self.workdir, {"max-bandwidth": 0}, self.tag(),
                              tls=pki if tls else None)
                runs[tls].append(run)
                self.log(f"  {'tls' if tls else 'plaintext':<9} tcp run {i + 1}: "
                         f"{ram / run.info['total-time'] * 1e3 / 1e9:.2f} GB/s ({run.info['total-time']} ms)")
        gib = ram / GiB

        def side(rs: list[Run], prefix: str) -> float:
            return median([sum(v for k, v in r.cpu.items() if k.startswith(prefix)) for r in rs]) / gib

        rate = {tls: ram / median([r.info["total-time"] / 1000 for r in rs]) for tls, rs in runs.items()}
        self.results["tls"] = {
            "ram": ram, "transport": "tcp", "session": runs[True][0].info.get("x-tls"),
            "plaintext_throughput": rate[False], "tls_throughput": rate[True], "ratio": rate[True] / rate[False],
            "cpu_src_per_gib": {"plaintext": side(runs[False], "src/"), "tls": side(runs[True], "src/")},
            "cpu_dst_per_gib": {"plaintext": side(runs[False], "dst/"), "tls": side(runs[True], "dst/")},
        }

    # 4 ---------------------------------------------------------------------------------
    def running(self) -> None:
        out = self.results.setdefault("running", [])
        for share in DIRTY_SHARES:
            rate = int(RUNNING_BANDWIDTH * share)
            workload = f"memtouch:rate={rate},wss={RUNNING_RAM}" if rate else "idle"
            for limit in DOWNTIME_LIMITS:
                guest = Guest(RUNNING_RAM, "random", workload, stopped=False)
                params = {"max-bandwidth": RUNNING_BANDWIDTH, "downtime-limit": limit}
                run = migrate(guest, "tcp", self.workdir, params, self.tag(), settle=0.5, poll=0.02)
                info = run.info
                expected = info.get("x-expected-downtime", 0)  # the estimate at switchover
                row = {"dirty_share": share, "workload": workload, "downtime_limit_ms": limit,
                       "bandwidth": RUNNING_BANDWIDTH, "ram": RUNNING_RAM,
                       "total_ms": info["total-time"], "passes": info["ram"].get("dirty-sync-count"),
                       "downtime_ms": info.get("downtime"), "guest_downtime_ms": info.get("x-guest-downtime"),
                       "expected_downtime_ms": expected, "transferred": info["ram"].get("transferred"),
                       "switchover_ms": info.get("x-switchover", {}),
                       "samples": run.samples}
                row["within_limit"] = row["downtime_ms"] <= limit + DOWNTIME_SLACK_MS
                out.append(row)
                self.log(f"  running {int(share * 100):>2} % dirty, limit {limit:>3} ms: "
                         f"{row['passes']} passes, {row['total_ms']} ms, downtime {row['downtime_ms']} ms "
                         f"(guest {row['guest_downtime_ms']} ms, expected {expected} ms)")

    # 5 ---------------------------------------------------------------------------------
    def scaling(self) -> None:
        out = self.results.setdefault("scaling", [])
        # Sizes interleaved run by run, so that a noisy minute hits every size alike.
        by_size: dict[int, list[Run]] = {size: [] for size in SCALING_SIZES}
        for _ in range(self.repeat):
            for size in SCALING_SIZES:
                by_size[size].append(
                    migrate(Guest(size, "random"), "tcp", self.workdir, {"max-bandwidth": 0}, self.tag()))
        for size, runs in by_size.items():
            gib = size / GiB
            secs = median([r.info["total-time"] / 1000 for r in runs])
            private: dict[str, int] = {}
            for r in runs:
                for k, v in r.private.items():
                    private[k] = max(private.get(k, 0), v)
            row = {"ram": size, "seconds": secs, "seconds_per_gib": secs / gib, "throughput": size / secs,
                   "cpu_src_per_gib": median([sum(v for k, v in r.cpu.items() if k.startswith("src/"))
                                              for r in runs]) / gib,
                   "cpu_dst_per_gib": median([sum(v for k, v in r.cpu.items() if k.startswith("dst/"))
                                              for r in runs]) / gib,
                   "cpu_per_actor": {k: median([r.cpu.get(k, 0) for r in runs]) for k in runs[0].cpu},
                   "private": private}
            out.append(row)
            self.log(f"  scaling {size // MiB:>5} MiB: {row['seconds_per_gib']:.2f} s/GiB, CPU "
                     f"{row['cpu_src_per_gib']:.2f} + {row['cpu_dst_per_gib']:.2f} s/GiB, largest private "
                     f"{max(private.values()) / MiB:.0f} MiB ({max(private, key=private.get)})")

    # 6 ---------------------------------------------------------------------------------
    def qcow2(self) -> None:
        import shutil

        from . import qcow2 as block_bench
        if shutil.which("qemu-img") is None:
            self.results["qcow2"] = {"skipped": "qemu-img not found (Debian package qemu-utils)"}
            self.log("  qcow2: skipped, qemu-img not found")
            return
        self.results["qcow2"] = block_bench.run(4096, 3, None)
        for r in self.results["qcow2"]["results"]:
            self.log(f"  qcow2 {r['workload']:<9}: {r['ours_mib_per_s']} MiB/s vs qemu-img "
                     f"{r['qemu_mib_per_s']} MiB/s ({r['ratio']}x)")

    def save(self) -> str:
        self.results["targets"] = targets(self.results)
        os.makedirs(self.out, exist_ok=True)
        path = os.path.join(self.out, "results.json")
        with open(path, "w") as f:
            json.dump(self.results, f, indent=1)
        return path
