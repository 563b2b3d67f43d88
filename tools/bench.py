"""`livemig bench` (= `scripts/bench`): how fast livemig moves memory and how
short the pause is, measured against the physical limits of this machine in
the same run. Every target is a ratio of two figures taken side by side,
because absolute numbers drift on shared machines.

Scenarios (see docs/performance.md):
  1 baseline   plain socket sender and receiver processes over tcp and unix
  2 stopped    1 GiB incompressible RAM, bandwidth unlimited, tcp and unix
  3 zero       the same with all-zero and half-zero RAM
  4 running    memtouch dirtying at 0/25/50 % of the bandwidth limit, downtime
               limits 300 ms and 30 ms
  5 scaling    stopped guests of 256 MiB .. 2 GiB: time, CPU, private memory
  6 qcow2      the block layer's qcow2 driver against qemu-img bench
`--quick` runs scenarios 1 and 2 over tcp only and prints the throughput
ratio as its last line.

Every host is a real `livemig host` process tree (actors.launch.HostProcess)
on loopback, stopped for sure afterwards; every wait has a timeout.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from livemig.tools.launch import HostProcess, free_port

MiB = 1 << 20
GiB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")
END_STATES = ("completed", "failed", "cancelled")

# Targets from issue 8; each compares two figures of the same run.
TARGET_TCP_RATIO = 0.6
STRETCH_TCP_RATIO = 0.8
TARGET_ZERO_RATIO = 3.0
DOWNTIME_SLACK_MS = 20
SCALING_SPREAD = 0.20
PRIVATE_LIMIT = 150 * MiB

RUNNING_RAM = 256 * MiB
RUNNING_BANDWIDTH = 128 * MiB  # bytes/s, QEMU's default max-bandwidth
DIRTY_SHARES = (0.0, 0.25, 0.5)
DOWNTIME_LIMITS = (300, 30)
SCALING_SIZES = (256 * MiB, 512 * MiB, GiB, 2 * GiB)


# --------------------------------------------------------------------------- baseline
# Both ends run in spawned processes (no inherited buffers: a receive buffer
# shared copy-on-write with a forked child costs most of the receive rate).

SEND_BUFFER = 64 * MiB
SEND_SLICE = 8 * MiB
RECV_BUFFER = 8 * MiB


def _baseline_receiver(family: int, address, nbytes: int, conn) -> None:
    srv = socket.socket(family, socket.SOCK_STREAM)
    try:
        srv.bind(address)
        srv.listen(1)
        srv.settimeout(30)
        conn.send(srv.getsockname())
        peer, _ = srv.accept()
        buf = bytearray(RECV_BUFFER)  # allocated here, in the receiving process
        view = memoryview(buf)
        peer.settimeout(60)
        got = 0
        t0 = time.perf_counter()
        while got < nbytes:
            n = peer.recv_into(view[:min(RECV_BUFFER, nbytes - got)])
            if not n:
                break
            got += n
        elapsed = time.perf_counter() - t0
        peer.close()
        conn.send({"bytes": got, "seconds": elapsed})
    except OSError as exc:
        conn.send({"error": str(exc)})
    finally:
        srv.close()


def _baseline_sender(family: int, address, nbytes: int) -> None:
    buf = os.urandom(SEND_BUFFER)  # incompressible, like the guest RAM it stands for
    view = memoryview(buf)
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(address)
        sent = 0
        while sent < nbytes:
            start = sent % SEND_BUFFER
            n = min(SEND_SLICE, SEND_BUFFER - start, nbytes - sent)
            s.sendall(view[start:start + n])
            sent += n
        s.shutdown(socket.SHUT_WR)


def baseline(transport: str, nbytes: int, workdir: str) -> float:
    """Seconds a plain socket sender and receiver (separate processes) take to
    move `nbytes` over loopback tcp or a unix socket."""
    ctx = multiprocessing.get_context("spawn")
    if transport == "tcp":
        family, address = socket.AF_INET, ("127.0.0.1", 0)
    else:
        family, address = socket.AF_UNIX, os.path.join(workdir, f"baseline-{time.monotonic_ns()}.sock")
    parent, child = ctx.Pipe()
    recv = ctx.Process(target=_baseline_receiver, args=(family, address, nbytes, child), daemon=True)
    recv.start()
    send = None
    try:
        if not parent.poll(30):
            raise RuntimeError("baseline receiver did not start")
        bound = parent.recv()
        send = ctx.Process(target=_baseline_sender, args=(family, bound, nbytes), daemon=True)
        send.start()
        if not parent.poll(120):
            raise RuntimeError("baseline transfer did not finish in 120 s")
        out = parent.recv()
        if "error" in out or out["bytes"] != nbytes:
            raise RuntimeError(f"baseline transfer failed: {out}")
        return out["seconds"]
    finally:
        for p in (send, recv):
            if p is not None:
                p.join(10)
                if p.is_alive():
                    p.kill()
                    p.join(5)
        if family == socket.AF_UNIX and os.path.exists(address):
            os.unlink(address)


# --------------------------------------------------------------------------- process accounting


def actor_pids(host_pid: int) -> dict[str, int]:
    """The actor processes of a host: its children, named by their module."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != host_pid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        try:
            module = argv[argv.index(b"-m") + 1].decode().removeprefix("livemig.actors.")
        except (ValueError, IndexError):
            continue
        name = module + (argv[argv.index(b"-m") + 3].decode() if module == "vcpu" else "")
        out[name] = int(entry)
    return out


def cpu_seconds(pid: int) -> float:
    """CPU time of one process, all its threads, ended ones too. Its CPU clock
    counts nanoseconds; utime + stime in /proc count 10 ms ticks, too coarse
    for the tenths of a second a small guest takes, so they are the fallback."""
    try:
        return time.clock_gettime(((~pid) << 3) | 2)  # the kernel's process-wide CPUCLOCK_SCHED id
    except OSError:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK


def is_guest_ram(path: str) -> bool:
    return path.startswith("/dev/shm/livemig-") and ".ram" in path


def private_memory(pid: int) -> dict[str, int]:
    """Private bytes of a process outside the guest RAM mapping, from
    /proc/PID/smaps: `private` (clean + dirty), of which `anon` anonymous."""
    private = anon = 0
    skip = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if not line.split(None, 1)[0].endswith(":"):
                # a mapping header: "start-end perms offset dev inode [path]"
                parts = line.split(None, 5)
                skip = len(parts) == 6 and is_guest_ram(parts[5].strip())
                continue
            head, _, rest = line.partition(":")
            if skip:
                continue
            if head in ("Private_Clean", "Private_Dirty"):
                private += int(rest.split()[0]) * 1024
            elif head == "Anonymous":
                anon += int(rest.split()[0]) * 1024
    return {"private": private, "anon": anon}


def rss_anon(pid: int) -> int:
    """Anonymous resident bytes (cheap: no page-table walk). The guest RAM is
    a shared file mapping, so it is never counted here."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class Watch:
    """CPU seconds and peak private memory of every actor of some hosts,
    between start() and stop(); memory is sampled by a thread at 10 Hz."""

    def __init__(self, hosts: dict[str, HostProcess]) -> None:
        self.pids = {f"{side}/{name}": pid for side, h in hosts.items()
                     for name, pid in actor_pids(h.proc.pid).items()}
        self.cpu0: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.peak_anon: dict[str, int] = dict.fromkeys(self.pids, 0)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            for key, pid in self.pids.items():
                try:
                    self.peak_anon[key] = max(self.peak_anon[key], rss_anon(pid))
                except OSError:
                    pass
            if self.done.wait(0.1):
                return

    def start(self) -> None:
        self.cpu0 = {k: cpu_seconds(p) for k, p in self.pids.items()}
        self.thread.start()

    def lap(self, side: str) -> None:
        """Take the CPU figures of one side now (when its part is done)."""
        for key, pid in self.pids.items():
            if key.startswith(side + "/"):
                self.cpu[key] = cpu_seconds(pid) - self.cpu0[key]

    def stop(self) -> dict:
        self.done.set()
        self.thread.join(5)
        memory = {}
        for key, pid in self.pids.items():
            self.cpu.setdefault(key, cpu_seconds(pid) - self.cpu0[key])
            mem = private_memory(pid)
            anon_now = rss_anon(pid)
            # Peak anonymous memory, plus the private file-backed pages (constant).
            memory[key] = max(self.peak_anon[key], anon_now) + max(0, mem["private"] - mem["anon"])
        return {"cpu": self.cpu, "private": memory}


# --------------------------------------------------------------------------- migrations


@dataclass
class Guest:
    ram: int
    fill: str = "random"
    workload: str = "idle"
    seed: int = 8
    stopped: bool = True

    def args(self) -> list[str]:
        return ["--ram", str(self.ram), "--seed", str(self.seed), "--workload", self.workload]


@dataclass
class Run:
    """One migration between two fresh hosts, as query-migrate reported it."""

    info: dict
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (s, remaining, expected ms)
    cpu: dict[str, float] = field(default_factory=dict)
    private: dict[str, int] = field(default_factory=dict)


class Hosts:
    """A source and a destination host, started in parallel and always stopped."""

    def __init__(self, guest: Guest, uri: str, tag: str) -> None:
        self.guest = guest
        src_args = [*guest.args(), "--fill", guest.fill]
        # A real destination starts from zeroed RAM; its receiver prefaults it.
        dst_args = [*guest.args(), "--fill", "zero", "--incoming", uri]
        with ThreadPoolExecutor(2) as pool:
            futs = [pool.submit(HostProcess, f"{tag}-src", *src_args, timeout=120),
                    pool.submit(HostProcess, f"{tag}-dst", *dst_args, timeout=120)]
            errors = [f.exception() for f in futs]
            started = [f.result() for f in futs if f.exception() is None]
        if any(errors):
            for h in started:
                h.close()
            raise RuntimeError(f"hosts did not start: {[e for e in errors if e]}")
        self.src, self.dst = started

    def close(self) -> None:
        for h in (self.src, self.dst):
            h.close()

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def qmp_call(mon, name: str, **args):
    reply = mon.cmd_raw(name, args)
    if "error" in reply:
        raise RuntimeError(f"{name}: {reply['error']['desc']}")
    return reply["return"]


def migrate(guest: Guest, transport: str, workdir: str, params: dict, tag: str,
            settle: float = 0.0, poll: float = 0.0, timeout: float = 300) -> Run:
    """Start two hosts, migrate the source's guest to the destination, and
    return query-migrate's figures, CPU and memory; with `poll` (seconds),
    also progress samples taken by querying that often."""
    if transport == "tcp":
        uri = f"tcp:127.0.0.1:{free_port()}"
    else:
        uri = f"unix:{os.path.join(workdir, tag + '.sock')}"
    with Hosts(guest, uri, tag) as hosts:
        if guest.stopped:
            hosts.src.cmd("stop")
        elif settle:
            time.sleep(settle)  # let the guest dirty memory before the first pass
        mon = hosts.src.qmp()
        try:
            qmp_call(mon, "migrate-set-parameters", **params)
            if not poll:
                # No progress samples wanted: wait for the MIGRATION event rather
                # than load two shared cores with queries while they are measured.
                qmp_call(mon, "migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
            watch = Watch({"src": hosts.src, "dst": hosts.dst})
            watch.start()
            t0 = time.monotonic()
            qmp_call(mon, "migrate", uri=uri)
            samples = []
            while True:
                if not poll:
                    event = mon.pull_event(wait=max(0.1, timeout - (time.monotonic() - t0)))
                    if not (event and event["event"] == "MIGRATION" and event["data"]["status"] in END_STATES):
                        if time.monotonic() - t0 <= timeout:
                            continue
                info = qmp_call(mon, "query-migrate")
                now = time.monotonic() - t0
                ram = info.get("ram", {})
                if info.get("status") == "active":
                    samples.append((now, ram.get("remaining", 0), info.get("expected-downtime", 0)))
                if info.get("status") in END_STATES:
                    break
                if now > timeout:
                    qmp_call(mon, "migrate_cancel")
                    raise TimeoutError(f"{tag}: migration not done after {timeout:.0f} s")
                time.sleep(poll)
            watch.lap("src")
        finally:
            mon.close()
        if info["status"] != "completed":
            watch.stop()
            raise RuntimeError(f"{tag}: migration {info['status']}: {info.get('error-desc')}")
        hosts.dst.wait_migration(60)
        watch.lap("dst")
        figures = watch.stop()
        samples.append((info["total-time"] / 1000, 0, samples[-1][2] if samples else 0))
        return Run(info, samples, figures["cpu"], figures["private"])


# --------------------------------------------------------------------------- scenarios


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

        from livemig.tools import qcow2_bench as block_bench
        if shutil.which("qemu-img") is None:
            self.results["qcow2"] = {"skipped": "qemu-img not found (Debian package qemu-utils)"}
            self.log("  qcow2: skipped, qemu-img not found")
            return
        self.results["qcow2"] = block_bench.run(4096, 3, None)
        for r in self.results["qcow2"]["results"]:
            self.log(f"  qcow2 {r['workload']:<9}: {r['ours_mib_per_s']} MiB/s vs qemu-img "
                     f"{r['qemu_mib_per_s']} MiB/s ({r['ratio']}x)")

    # targets ---------------------------------------------------------------------------
    def targets(self) -> list[dict]:
        res = self.results
        out = []

        def add(name: str, value: float, target: str, met: bool) -> None:
            out.append({"target": name, "value": value, "wanted": target, "met": bool(met)})

        for row in res.get("stopped", []):
            if row["fill"] == "random" and row["transport"] == "tcp":
                add("incompressible tcp / baseline", round(row["ratio"], 2), f">= {TARGET_TCP_RATIO}"
                    f" (stretch {STRETCH_TCP_RATIO})", row["ratio"] >= TARGET_TCP_RATIO)
            if row["fill"] == "zero":
                add(f"all-zero {row['transport']} / baseline", round(row["ratio"], 2),
                    f">= {TARGET_ZERO_RATIO}", row["ratio"] >= TARGET_ZERO_RATIO)
        for row in res.get("running", []):
            add(f"downtime, {int(row['dirty_share'] * 100)} % dirty, limit {row['downtime_limit_ms']} ms",
                row["downtime_ms"], f"<= {row['downtime_limit_ms'] + DOWNTIME_SLACK_MS} ms",
                row["within_limit"])
        scaling = res.get("scaling", [])
        if scaling:
            for key, label in (("seconds_per_gib", "time per GiB"), ("cpu_src_per_gib", "source CPU per GiB"),
                               ("cpu_dst_per_gib", "destination CPU per GiB")):
                vals = [r[key] for r in scaling]
                # The "flat within +-20 %": every size within 20 % of the
                # median size's figure (max/min - 1 is shown too, for the record).
                mid = statistics.median(vals)
                deviation = max(abs(v / mid - 1) for v in vals) if mid else float("inf")
                add(f"{label} flat 256 MiB..2 GiB (max/min {max(vals) / min(vals):.2f})", round(deviation, 2),
                    f"within +-{SCALING_SPREAD:.0%} of the median", deviation <= SCALING_SPREAD)
            worst = max((v, f"{r['ram'] // MiB} MiB {k}") for r in scaling for k, v in r["private"].items())
            add(f"largest actor private memory ({worst[1]})", round(worst[0] / MiB, 1),
                f"< {PRIVATE_LIMIT // MiB} MiB", worst[0] < PRIVATE_LIMIT)
        return out

    def save(self) -> str:
        self.results["targets"] = self.targets()
        os.makedirs(self.out, exist_ok=True)
        path = os.path.join(self.out, "results.json")
        with open(path, "w") as f:
            json.dump(self.results, f, indent=1)
        return path


# --------------------------------------------------------------------------- report


def summary(results: dict) -> str:
    """The figures as Markdown tables (printed, and saved as summary.md)."""
    lines = []
    base = results.get("baseline", {})
    if base:
        lines += ["| transport | raw socket baseline |", "|---|---|"]
        lines += [f"| {t} | {b['bytes_per_s'] / 1e9:.2f} GB/s |" for t, b in base.items()]
        lines.append("")
    if results.get("stopped"):
        lines += ["| stopped guest | transport | total time | throughput | ratio to baseline | CPU src / dst |",
                  "|---|---|---|---|---|---|"]
        for r in results["stopped"]:
            lines.append(f"| {r['ram'] // MiB} MiB {r['fill']} | {r['transport']} | {r['total_seconds'] * 1000:.0f} ms"
                         f" | {r['throughput'] / 1e9:.2f} GB/s | {r['ratio']:.2f}x"
                         f" | {r['cpu_src']:.2f} s / {r['cpu_dst']:.2f} s |")
        lines.append("")
    if results.get("running"):
        lines += ["| dirty rate | downtime limit | passes | total time | downtime | guest downtime "
                  "| expected downtime |", "|---|---|---|---|---|---|---|"]
        for r in results["running"]:
            lines.append(f"| {int(r['dirty_share'] * 100)} % of {r['bandwidth'] // MiB} MiB/s "
                         f"| {r['downtime_limit_ms']} ms | {r['passes']} | {r['total_ms']} ms "
                         f"| {r['downtime_ms']} ms | {r['guest_downtime_ms']} ms | {r['expected_downtime_ms']} ms |")
        lines.append("")
    if results.get("scaling"):
        lines += ["| RAM | time per GiB | throughput | CPU src per GiB | CPU dst per GiB "
                  "| largest private (actor) |", "|---|---|---|---|---|---|"]
        for r in results["scaling"]:
            worst = max(r["private"], key=r["private"].get)
            lines.append(f"| {r['ram'] // MiB} MiB | {r['seconds_per_gib']:.2f} s | {r['throughput'] / 1e9:.2f} GB/s"
                         f" | {r['cpu_src_per_gib']:.2f} s | {r['cpu_dst_per_gib']:.2f} s"
                         f" | {r['private'][worst] / MiB:.0f} MiB ({worst}) |")
        lines.append("")
        actors = sorted({k for r in results["scaling"] for k in r["private"]})
        lines += ["| private memory | " + " | ".join(f"{r['ram'] // MiB} MiB" for r in results["scaling"]) + " |",
                  "|---|" + "---|" * len(results["scaling"])]
        for a in actors:
            lines.append(f"| {a} | " + " | ".join(f"{r['private'].get(a, 0) / MiB:.0f} MiB"
                                                  for r in results["scaling"]) + " |")
        lines.append("")
    q = results.get("qcow2")
    if q and "results" in q:
        lines += ["| qcow2 (64 KiB requests) | livemig | qemu-img bench | ratio |", "|---|---|---|---|"]
        for r in q["results"]:
            lines.append(f"| {r['workload']} | {r['ours_mib_per_s']} MiB/s | {r['qemu_mib_per_s']} MiB/s "
                         f"| {r['ratio']}x |")
        lines.append("")
    if results.get("targets"):
        lines += ["| target | value | wanted | met |", "|---|---|---|---|"]
        for t in results["targets"]:
            lines.append(f"| {t['target']} | {t['value']} | {t['wanted']} | {'yes' if t['met'] else 'NO'} |")
        lines.append("")
    return "\n".join(lines)


def plots(results: dict, out: str) -> list[str]:
    """PNG plots: remaining bytes over time per running-guest scenario, and
    throughput and CPU per GiB against RAM size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if results.get("running"):
        fig, axes = plt.subplots(1, len(DOWNTIME_LIMITS), figsize=(11, 4), sharey=True)
        for ax, limit in zip(axes, DOWNTIME_LIMITS, strict=True):
            for r in results["running"]:
                if r["downtime_limit_ms"] != limit:
                    continue
                t = [s[0] for s in r["samples"]]
                rem = [s[1] / MiB for s in r["samples"]]
                ax.plot(t, rem, drawstyle="steps-post",
                        label=f"{int(r['dirty_share'] * 100)} % dirty: {r['passes']} passes, "
                              f"downtime {r['downtime_ms']} ms")
            ax.set_title(f"downtime limit {limit} ms, {RUNNING_BANDWIDTH // MiB} MiB/s")
            ax.set_xlabel("seconds since migrate")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0].set_ylabel("remaining dirty MiB")
        fig.tight_layout()
        path = os.path.join(out, "remaining.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    if results.get("scaling"):
        rows = results["scaling"]
        sizes = [r["ram"] / MiB for r in rows]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        a1.plot(sizes, [r["throughput"] / 1e9 for r in rows], "o-", label="livemig (tcp)")
        if "tcp" in results.get("baseline", {}):
            a1.axhline(results["baseline"]["tcp"]["bytes_per_s"] / 1e9, ls="--", color="gray",
                       label="raw tcp baseline")
        a1.set_xscale("log", base=2)
        a1.set_xlabel("guest RAM (MiB)")
        a1.set_ylabel("GB/s")
        a1.set_ylim(bottom=0)
        a1.set_title("throughput, stopped incompressible guest")
        a1.legend()
        a2.plot(sizes, [r["cpu_src_per_gib"] for r in rows], "o-", label="source")
        a2.plot(sizes, [r["cpu_dst_per_gib"] for r in rows], "o-", label="destination")
        a2.plot(sizes, [r["seconds_per_gib"] for r in rows], "o--", label="wall time")
        a2.set_xscale("log", base=2)
        a2.set_xlabel("guest RAM (MiB)")
        a2.set_ylabel("seconds per GiB")
        a2.set_ylim(bottom=0)
        a2.set_title("CPU and time per GiB")
        a2.legend()
        for ax in (a1, a2):
            ax.set_xticks(sizes, [f"{int(s)}" for s in sizes])
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out, "scaling.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def run_bench(out: str = "bench", quick: bool = False, repeat: int | None = None,
              ram: int = GiB, sections: tuple[str, ...] = ()) -> dict:
    """Run the benchmark; returns the results written to OUT/results.json."""
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    bench = Bench(out, repeat or 3, log)
    bench.results["quick"] = quick
    wanted = set(sections) or {"stopped", "zero", "running", "scaling", "qcow2"}
    try:
        if quick:
            log("1+2: baseline and stopped 1 GiB incompressible guest, tcp")
            bench.stopped(ram, ("tcp",), ("random",))
        else:
            if "stopped" in wanted or "zero" in wanted:
                fills = tuple(f for f, s in (("random", "stopped"), ("zero", "zero"), ("half", "zero"))
                              if s in wanted)
                log("1+2+3: baselines and stopped guests (random, zero, half), tcp and unix")
                bench.stopped(ram, ("tcp", "unix"), fills)
            if "running" in wanted:
                log("4: running guests")
                bench.running()
            if "scaling" in wanted:
                log("5: scaling")
                bench.scaling()
            if "qcow2" in wanted:
                log("6: qcow2 against qemu-img")
                bench.qcow2()
    finally:
        bench.close()
    path = bench.save()
    table = summary(bench.results)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(table + "\n")
    pngs = [] if quick else plots(bench.results, out)
    print(table)
    print(f"results: {path}" + (f"; plots: {', '.join(pngs)}" if pngs else ""))
    for row in bench.results.get("stopped", []):
        if row["fill"] == "random" and row["transport"] == "tcp":
            print(f"throughput ratio (incompressible tcp / raw tcp baseline): {row['ratio']:.2f}")
    return bench.results
