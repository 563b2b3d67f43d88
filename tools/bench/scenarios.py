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
    gb_per_s,
    mbps,
    targets,
)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def cpu_ms(runs: list[Run], prefix: str, per: float = 1.0) -> float:
    """The median over runs of one side's CPU time (ms), divided by `per`."""
    return round(median([sum(v for k, v in r.cpu.items() if k.startswith(prefix)) for r in runs]) * 1000 / per, 1)


def cpu_per_actor(runs: list[Run]) -> dict[str, float]:
    return {k: round(median([r.cpu.get(k, 0) for r in runs]) * 1000, 1) for k in runs[0].cpu}


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
            t: {"bytes": ram, "runs-time": [round(s * 1000, 1) for s in base[t]], "mbps": mbps(ram / median(base[t]))}
            for t in transports}
        out = self.results.setdefault("stopped", [])
        for (fill, t), rs in runs.items():
            total = median([r.info["total-time"] for r in rs])
            rate = mbps(ram / total * 1000)
            out.append({
                "fill": fill, "transport": t, "ram": ram,
                "total-time": total, "runs-total-time": [r.info["total-time"] for r in rs],
                "mbps": rate, "ratio": rate / self.results["baseline"][t]["mbps"],
                "downtime": median([r.info.get("downtime", 0) for r in rs]),
                "transferred": rs[0].info["ram"].get("transferred", 0),
                "cpu-src": cpu_ms(rs, "src/"), "cpu-dst": cpu_ms(rs, "dst/"), "cpu-per-actor": cpu_per_actor(rs),
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
        rate = {tls: mbps(ram / median([r.info["total-time"] for r in rs]) * 1000) for tls, rs in runs.items()}
        self.results["tls"] = {
            "ram": ram, "transport": "tcp", "session": runs[True][0].info.get("x-tls"),
            "plaintext-mbps": rate[False], "tls-mbps": rate[True], "ratio": rate[True] / rate[False],
            "cpu-src-per-gib": {"plaintext": cpu_ms(runs[False], "src/", gib), "tls": cpu_ms(runs[True], "src/", gib)},
            "cpu-dst-per-gib": {"plaintext": cpu_ms(runs[False], "dst/", gib), "tls": cpu_ms(runs[True], "dst/", gib)},
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
                row = {"dirty-share": share, "workload": workload, "downtime-limit": limit,
                       "max-bandwidth": RUNNING_BANDWIDTH, "ram": RUNNING_RAM,
                       "total-time": info["total-time"], "dirty-sync-count": info["ram"].get("dirty-sync-count"),
                       "downtime": info.get("downtime"), "x-guest-downtime": info.get("x-guest-downtime"),
                       "x-expected-downtime": expected, "transferred": info["ram"].get("transferred"),
                       "x-switchover": info.get("x-switchover", {}),
                       # (ms since migrate, remaining bytes, expected downtime ms)
                       "samples": [(round(t * 1000, 1), left, exp) for t, left, exp in run.samples]}
                row["within-limit"] = row["downtime"] <= limit + DOWNTIME_SLACK_MS
                out.append(row)
                self.log(f"  running {int(share * 100):>2} % dirty, limit {limit:>3} ms: "
                         f"{row['dirty-sync-count']} passes, {row['total-time']} ms, downtime {row['downtime']} ms "
                         f"(guest {row['x-guest-downtime']} ms, expected {expected} ms)")

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
            total = median([r.info["total-time"] for r in runs])
            private: dict[str, int] = {}
            for r in runs:
                for k, v in r.private.items():
                    private[k] = max(private.get(k, 0), v)
            row = {"ram": size, "total-time": total, "time-per-gib": round(total / gib, 1),
                   "mbps": mbps(size / total * 1000),
                   "cpu-src-per-gib": cpu_ms(runs, "src/", gib), "cpu-dst-per-gib": cpu_ms(runs, "dst/", gib),
                   "cpu-per-actor": cpu_per_actor(runs), "private": private}
            out.append(row)
            self.log(f"  scaling {size // MiB:>5} MiB: {row['time-per-gib']:.0f} ms/GiB, CPU "
                     f"{row['cpu-src-per-gib']:.0f} + {row['cpu-dst-per-gib']:.0f} ms/GiB, largest private "
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
            self.log(f"  qcow2 {r['workload']:<9}: {gb_per_s(r['ours-mbps']):.2f} GB/s vs qemu-img "
                     f"{gb_per_s(r['qemu-mbps']):.2f} GB/s ({r['ratio']}x)")

    def save(self) -> str:
        self.results["targets"] = targets(self.results)
        os.makedirs(self.out, exist_ok=True)
        path = os.path.join(self.out, "results.json")
        with open(path, "w") as f:
            json.dump(self.results, f, indent=1)
        return path
