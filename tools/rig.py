"""`livemig rig`: migration scenarios across hosts in network namespaces
joined by shaped links, with events and statistics collected per run and a
report with plots.

A rig *host* is a network namespace; a *guest* is a `livemig host` process
running inside the namespace of the host it currently lives on. Links are veth
pairs with addresses from 198.18.0.0/15 (set aside for benchmark networks,
never routed off the machine), shaped with tc `tbf` (rate) and `netem` (delay,
loss) where the kernel has it. Everything the rig creates is removed when it
ends, also on failure or Ctrl-C.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import shutil
import subprocess
import threading
import time
import tomllib
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import msgpack
import zmq

from livemig.machine.runstate import MIGRATION_END
from livemig.protocol.units import parse_size
from livemig.tools import rig_postcopy
from livemig.tools.demo import verify
from livemig.tools.launch import HostProcess, free_port
from livemig.tools.rig_report import report  # noqa: F401 - `livemig rig report`, the tests

ADDRESS_BASE = (198, 18)
POLL = 0.05  # query-migrate period while a migration runs


class RigError(RuntimeError):
    pass


def run(cmd: list[str]) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if out.returncode:
        raise RigError(f"{' '.join(cmd)}: {out.stderr.strip() or out.stdout.strip()}")


@dataclass
class Link:
    a: str
    b: str
    rate: str | None = None
    delay: str | None = None
    loss: str | None = None
    index: int = 0

    def address(self, host: str) -> str:
        """The address `host` has on this link."""
        third, fourth = divmod(self.index * 4, 256)
        return f"{ADDRESS_BASE[0]}.{ADDRESS_BASE[1]}.{third}.{fourth + (1 if host == self.a else 2)}"

    def device(self, host: str) -> str:
        return f"lm{self.index}{'a' if host == self.a else 'b'}"


@dataclass
class GuestSpec:
    name: str
    host: str
    ram: str = "64M"
    fill: str = "random"
    workload: str = "idle"
    seed: int = 1
    vcpus: int = 1

    def args(self) -> list[str]:
        return ["--ram", self.ram, "--fill", self.fill, "--workload", self.workload, "--seed", str(self.seed),
                "--vcpus", str(self.vcpus)]


@dataclass
class Scenario:
    name: str
    hosts: list[str]
    links: list[Link]
    guests: dict[str, GuestSpec]
    migrations: list[dict] = field(default_factory=list)
    evacuation: dict | None = None
    matrix: dict[str, list] = field(default_factory=dict)
    repeat: int = 1
    parameters: dict = field(default_factory=dict)
    timeout: float = 60.0  # a migration still running after this long is cancelled: not converged
    verify: bool = True

    @classmethod
    def load(cls, path: str) -> Scenario:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
        hosts = list(raw.get("hosts", {}))
        links = [Link(**lk, index=i + 1) for i, lk in enumerate(raw.get("links", []))]
        for lk in links:
            for h in (lk.a, lk.b):
                if h not in hosts:
                    raise RigError(f"link {lk.a}-{lk.b} names unknown host {h!r}")
        guests = {name: GuestSpec(name=name, **g) for name, g in raw.get("guests", {}).items()}
        for g in guests.values():
            if g.host not in hosts:
                raise RigError(f"guest {g.name} is on unknown host {g.host!r}")
        for m in raw.get("migrations", []):
            if m.get("guest") not in guests or m.get("to") not in hosts:
                raise RigError(f"migration {m} names an unknown guest or host")
        return cls(name=raw.get("name", os.path.splitext(os.path.basename(path))[0]), hosts=hosts, links=links,
                   guests=guests, migrations=raw.get("migrations", []), evacuation=raw.get("evacuation"),
                   matrix=raw.get("matrix", {}), repeat=int(raw.get("repeat", 1)),
                   parameters=raw.get("parameters", {}), timeout=float(raw.get("timeout", 60)),
                   verify=bool(raw.get("verify", True)))

    def link(self, a: str, b: str) -> Link:
        for lk in self.links:
            if {lk.a, lk.b} == {a, b}:
                return lk
        raise RigError(f"no link between {a} and {b}")


class Network:
    """The namespaces and links of one rig run (or plain loopback)."""

    def __init__(self, scenario: Scenario, loopback: bool) -> None:
        self.scenario = scenario
        self.loopback = loopback
        self.tag = uuid.uuid4().hex[:6]
        self.namespaces: list[str] = []

    def ns(self, host: str) -> str:
        return f"lm{self.tag}{host}"

    def prefix(self, host: str) -> tuple[str, ...]:
        return () if self.loopback else ("ip", "netns", "exec", self.ns(host))

    def address(self, source: str, target: str) -> str:
        if self.loopback:
            return "127.0.0.1"
        return self.scenario.link(source, target).address(target)

    def up(self) -> None:
        if self.loopback:
            return
        for host in self.scenario.hosts:
            run(["ip", "netns", "add", self.ns(host)])
            self.namespaces.append(self.ns(host))
            run(["ip", "-n", self.ns(host), "link", "set", "lo", "up"])
        for lk in self.scenario.links:
            da, db = lk.device(lk.a), lk.device(lk.b)
            run(["ip", "link", "add", da, "netns", self.ns(lk.a), "type", "veth", "peer", "name", db,
                 "netns", self.ns(lk.b)])
            for host, dev in ((lk.a, da), (lk.b, db)):
                run(["ip", "-n", self.ns(host), "addr", "add", f"{lk.address(host)}/30", "dev", dev])
                run(["ip", "-n", self.ns(host), "link", "set", dev, "up"])
                self.shape(host, dev, lk)

    def shape(self, host: str, dev: str, lk: Link) -> None:
        tc = ["ip", "netns", "exec", self.ns(host), "tc", "qdisc", "add", "dev", dev]
        if lk.delay or lk.loss:
            netem = [*tc, "root", "handle", "1:", "netem"]
            netem += ["delay", lk.delay] if lk.delay else []
            netem += ["loss", lk.loss] if lk.loss else []
            try:
                run(netem)
            except RigError as exc:
                raise RigError(f"link {lk.a}-{lk.b} asks for delay/loss, but this kernel has no netem "
                               f"qdisc ({exc}); remove delay/loss or use a kernel with sch_netem") from None
            if lk.rate:
                run([*tc, "parent", "1:1", "handle", "10:", "tbf", "rate", lk.rate, "burst", "256kb",
                     "latency", "100ms"])
        elif lk.rate:
            run([*tc, "root", "tbf", "rate", lk.rate, "burst", "256kb", "latency", "100ms"])

    def set_link(self, a: str, b: str, up: bool) -> None:
        lk = self.scenario.link(a, b)
        run(["ip", "-n", self.ns(lk.a), "link", "set", lk.device(lk.a), "up" if up else "down"])

    def down(self) -> None:
        """Deleting a namespace deletes its veth ends and their qdiscs. A busy
        namespace (a process still leaving it) is tried again."""
        deadline = time.monotonic() + 20
        while self.namespaces:
            for ns in list(self.namespaces):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
                if ns not in leftovers():
                    self.namespaces.remove(ns)
            if self.namespaces:
                if time.monotonic() > deadline:
                    raise RigError(f"could not delete network namespaces {self.namespaces}")
                time.sleep(0.2)


class Collector:
    """Records every event of the watched hosts and polls query-migrate."""

    def __init__(self, out_path: str) -> None:
        self.out = open(out_path, "a")  # noqa: SIM115 - closed in close()
        self.lock = threading.Lock()
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.setsockopt(zmq.LINGER, 0)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.listen, daemon=True)
        self.pending: list[str] = []
        self.thread.start()

    def watch(self, host: HostProcess) -> None:
        with self.lock:
            self.pending.append(host.events)

    def record(self, entry: dict) -> None:
        with self.lock:
            self.out.write(json.dumps(entry) + "\n")

    def listen(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                for ep in self.pending:
                    self.sub.connect(ep)
                self.pending = []
            if self.sub.poll(100):
                frames = self.sub.recv_multipart()
                body = msgpack.unpackb(frames[-1], raw=False)
                body.pop("qmp", None)
                self.record({"t": time.time(), "kind": "event", "topic": frames[0].decode(), **body})

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.ctx.destroy(linger=0)
        self.out.close()


class Rig:
    def __init__(self, scenario: Scenario, out_dir: str, loopback: bool = False) -> None:
        self.scenario = scenario
        self.out_dir = out_dir
        if not loopback and os.geteuid() != 0:
            print("livemig rig: not root, so hosts share loopback and links are not shaped")
            loopback = True
        self.net = Network(scenario, loopback)
        self.guests: dict[str, tuple[str, HostProcess]] = {}  # guest -> (rig host, its process)
        self.results: list[dict] = []
        self.env = {}

    def start_guest(self, spec: GuestSpec, host: str, *extra: str) -> HostProcess:
        name = f"{spec.name}-{host}-{uuid.uuid4().hex[:4]}"
        return HostProcess(name, *spec.args(), *extra, prefix=self.net.prefix(host), env=self.env)

    def port(self, *key) -> int:
        # Each namespace has its own ports; on shared loopback ask the kernel for a free one.
        return free_port() if self.net.loopback else 20000 + (abs(hash(key)) % 20000)

    def migrate(self, guest: str, target: str, params: dict, caps: dict, run_id: str,
                collector: Collector, during=None, timeout: float | None = None,
                migration: dict | None = None) -> dict:
        spec = self.scenario.guests[guest]
        source_host, src = self.guests[guest]
        address = self.net.address(source_host, target)
        uri = f"tcp:{address}:{self.port(run_id, guest, target)}"
        postcopy = rig_postcopy.wanted(caps)
        # A post-copy destination learns its capabilities and parameters before it listens.
        dst = self.start_guest(spec, target, "--incoming", "defer" if postcopy else uri)
        collector.watch(src)
        collector.watch(dst)
        time.sleep(0.2)
        switch = None
        if postcopy:
            rig_postcopy.prepare(dst, caps, params, uri)
            switch = rig_postcopy.Switch(src, dst, migration or {},
                                         lambda up: self.net.set_link(source_host, target, up),
                                         lambda: f"tcp:{address}:{self.port(run_id, guest, target, time.time())}")
            during = None  # a post-copy migration's link cut counts from postcopy-active
        if caps:
            src.cmd("migrate-set-capabilities", capabilities=[{"capability": k, "state": v} for k, v in caps.items()])
        src.cmd("migrate-set-parameters", **params)
        src.cmd("migrate", uri=uri)
        start = time.monotonic()
        timeout = float(timeout or self.scenario.timeout)
        info: dict = {}
        converged = True
        stalled: dict | None = None
        throttle = 0
        cancel_ms = None
        while True:
            info = src.cmd("query-migrate")
            collector.record({"t": time.time(), "kind": "query", "run": run_id, "guest": guest, "to": target,
                              "info": info})
            stalled = info.get("x-stalled") or stalled
            throttle = max(throttle, info.get("cpu-throttle-percentage", 0))
            if info.get("status") in MIGRATION_END:
                break
            if switch is not None:
                switch.poll(info["status"])
            if during is not None and time.monotonic() - start > during[0]:
                during[1]()
                during = None
            if time.monotonic() - start > timeout:
                if info["status"].startswith("postcopy"):  # past RUN nothing can be cancelled
                    raise RigError(f"post-copy of {guest} to {target} still {info['status']} after {timeout:g} s")
                # Not converged in time: cancelled, and the guest runs on at the source.
                converged = False
                expected = info.get("expected-downtime")
                cancel_at = time.monotonic()
                src.cmd("migrate_cancel")
                info = src.wait_migration(60)
                cancel_ms = int((time.monotonic() - cancel_at) * 1000)
                info["expected-downtime"] = expected
                break
            time.sleep(POLL)
        # QEMU's query-migrate names where QEMU has the figure (one convention with
        # `migrate --json` and `demo --json`); absent figures are absent, not None.
        ram = info.get("ram", {})
        figures = {"total-time": info.get("total-time"), "setup-time": info.get("setup-time"),
                   "downtime": info.get("downtime"), "x-guest-downtime": info.get("x-guest-downtime"),
                   "expected-downtime": info.get("expected-downtime"),
                   "dirty-sync-count": ram.get("dirty-sync-count"), "transferred": ram.get("transferred"),
                   "error-desc": info.get("error-desc")}
        result = {"run": run_id, "guest": guest, "from": source_host, "to": target, "status": info.get("status"),
                  "converged": converged and info.get("status") == "completed", **params,
                  "workload": spec.workload, **{k: v for k, v in figures.items() if v is not None}}
        # The brakes and the verdict: the last stall verdict seen, the highest throttle, the cancel's time.
        if stalled is not None:
            result["x-stalled"] = stalled
        if throttle:
            result["peak-cpu-throttle-percentage"] = throttle
        if cancel_ms is not None:
            result["cancel-time"] = cancel_ms
        if switch is not None:
            result.update(switch.figures(info))
        moving_ms = (info.get("total-time") or 0) - (info.get("setup-time") or 0)
        if moving_ms > 0 and ram.get("transferred"):
            # Everything on the wire from the end of setup to the end: what the link carried,
            # in QEMU's mbps unit (megabits per second).
            result["mbps"] = ram["transferred"] * 8 / (moving_ms / 1000) / 1e6
        if result["status"] == "completed":
            dst.wait_status("running", 30)
            if self.scenario.verify:
                src_regs = src.cmd("x-query-vcpus")
                time.sleep(0.2)
                v = verify(dst, src_regs, int(parse_size(spec.ram)), spec.fill, spec.seed, spec.workload, spec.vcpus)
                dst.cmd("cont")
                result["verified"] = v["ram-equal"] and v["vcpu-equal"]
            src.close()
            self.guests[guest] = (target, dst)
        else:
            result["source-running"] = src.cmd("query-status")["status"] == "running"
            dst.close()
        collector.record({"t": time.time(), "kind": "result", **result})
        return result

    def plan(self) -> list[tuple[str, dict, dict]]:
        """One run per matrix combination and repetition: (id, parameters, capabilities)."""
        keys = sorted(self.scenario.matrix)
        combos = list(itertools.product(*(self.scenario.matrix[k] for k in keys))) or [()]
        runs = []
        for n, (combo, _rep) in enumerate(itertools.product(combos, range(self.scenario.repeat))):
            values = dict(zip(keys, combo, strict=True))
            caps = {k.removeprefix("capability:"): v for k, v in values.items() if k.startswith("capability:")}
            params = {**self.scenario.parameters, **{k: v for k, v in values.items() if not k.startswith("capability:")}}
            runs.append((f"run{n:03d}", params, caps))
        return runs

    def execute(self) -> list[dict]:
        os.makedirs(os.path.join(self.out_dir, "runs"), exist_ok=True)
        try:
            self.net.up()
            for run_id, params, caps in self.plan():
                self.run_once(run_id, params, caps)
        finally:
            for _, proc in self.guests.values():
                proc.close()
            self.guests = {}
            self.net.down()
        write_summary(self.out_dir, self.results)
        return self.results

    def run_once(self, run_id: str, params: dict, caps: dict) -> None:
        collector = Collector(os.path.join(self.out_dir, "runs", f"{run_id}.jsonl"))
        try:
            for spec in self.scenario.guests.values():
                self.guests[spec.name] = (spec.host, self.start_guest(spec, spec.host))
            time.sleep(0.3)
            for m in self.scenario.migrations:
                during = None
                src_host = self.guests[m["guest"]][0]
                if m.get("link_down_after"):
                    during = (float(m["link_down_after"]),
                              lambda s=src_host, t=m["to"]: self.net.set_link(s, t, False))
                self.results.append(self.migrate(m["guest"], m["to"], {**params, **m.get("parameters", {})},
                                                 {**caps, **m.get("capabilities", {})}, run_id, collector, during,
                                                 m.get("timeout"), m))
                if m.get("link_down_after"):
                    self.net.set_link(src_host, m["to"], True)
            if self.scenario.evacuation:
                self.evacuate(run_id, params, caps, collector)
        finally:
            for _, proc in self.guests.values():
                proc.close()
            self.guests = {}
            collector.close()

    def evacuate(self, run_id: str, params: dict, caps: dict, collector: Collector) -> None:
        ev = self.scenario.evacuation
        assert ev is not None
        moving = [g for g, (h, _) in self.guests.items() if h == ev["from"]]
        targets = itertools.cycle(ev["to"])
        plan = [(g, next(targets)) for g in moving]
        with ThreadPoolExecutor(max_workers=int(ev.get("concurrency", 1))) as pool:
            for result in pool.map(lambda gt: self.migrate(gt[0], gt[1], params, caps, run_id, collector), plan):
                self.results.append(result)


def write_summary(out_dir: str, results: list[dict]) -> None:
    keys = sorted({k for r in results for k in r})
    with open(os.path.join(out_dir, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in results:
            w.writerow(r)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(results, f, indent=1)


def leftovers() -> list[str]:
    """Namespaces a rig left behind (there should be none)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith("lm") and shutil.which("ip")]
