"""The host supervisor: creates the guest's RAM, starts one process per actor,
watches them, and stops every one of them when it stops (actors also die
with it if it is killed: see base.die_with_parent)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from livemig.machine.ram import GuestRam, fill_ram
from livemig.machine.workload import WorkloadSpec

ACTORS = ("receiver", "writer", "ram_sender", "block_sender", "coordinator", "monitor")
# Actors that hold no guest state: they can be started afresh after a failure.
RESTARTABLE = ("receiver", "writer", "ram_sender", "block_sender", "monitor")
SILENCE = 1.0  # seconds without a heartbeat before an actor counts as stuck


def describe_exit(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


def runtime_root() -> str:
    base = os.environ.get("LIVEMIG_RUNDIR") or os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return os.path.join(base, f"livemig-{os.getuid()}")


def host_dir(name: str) -> str:
    return os.path.join(runtime_root(), name)


def default_qmp(name: str) -> str:
    return os.path.join(host_dir(name), "qmp.sock")


@dataclass
class HostSpec:
    name: str
    machine: str = "pc"
    blocks: list[tuple[str, int]] = field(default_factory=lambda: [("pc.ram", 256 << 20)])
    fill: str = "zero"
    seed: int = 0
    vcpus: int = 1
    workload: str = "idle"
    incoming: str | None = None
    autostart: bool = True
    qmp: list[str] = field(default_factory=list)
    events: str | None = None
    fds: list[int] = field(default_factory=list)
    drives: list[dict] = field(default_factory=list)  # machine.disk.DriveSpec fields
    devices: list[dict] = field(default_factory=list)  # --device: {"driver", "id"}


class Host:
    def __init__(self, spec: HostSpec) -> None:
        workload = WorkloadSpec.parse(spec.workload)  # refuse a bad spec before creating anything
        if workload.uses_disk and not spec.drives:
            raise ValueError(f"workload {workload.kind} writes to a disk: give --drive")
        if workload.uses_disk and spec.vcpus != 1:
            raise ValueError(f"workload {workload.kind} runs on one vCPU (vCPU 0 owns the drives)")
        self.spec = spec
        self.rundir = host_dir(spec.name)
        self.procs: dict[str, subprocess.Popen] = {}
        self.ram: GuestRam | None = None
        self.stopping = False

    def check_free(self) -> None:
        qmp = os.path.join(self.rundir, "qmp.sock")
        if os.path.exists(qmp):
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(qmp)
            except OSError:
                shutil.rmtree(self.rundir, ignore_errors=True)  # left by a host that died
            else:
                raise SystemExit(f"livemig: a host named {self.spec.name!r} is already running ({qmp})")
            finally:
                s.close()

    def prepare(self) -> dict:
        self.check_free()
        os.makedirs(self.rundir, mode=0o700, exist_ok=True)
        shm_path = f"/dev/shm/livemig-{os.getuid()}-{self.spec.name}-{os.getpid()}.ram"
        self.ram = GuestRam(shm_path, self.spec.blocks, create=True)
        fill_ram(self.ram.bytes, self.spec.fill, self.spec.seed)
        # The receiver prefaults the RAM of an incoming host itself (it is the
        # process that writes it); the source's actors map what they read.
        # Actors (also ones restarted later) open the RAM through our descriptor,
        # so the file can go now: it disappears with the host, even a killed one.
        self.ram_fd = os.open(shm_path, os.O_RDWR)
        os.unlink(shm_path)
        ram_path = f"/proc/{os.getpid()}/fd/{self.ram_fd}"
        qmp = self.spec.qmp or [f"unix:{os.path.join(self.rundir, 'qmp.sock')}"]
        cfg = {
            "name": self.spec.name, "rundir": self.rundir, "ram_path": ram_path,
            "guest": {"machine": self.spec.machine, "blocks": self.spec.blocks, "fill": self.spec.fill,
                      "seed": self.spec.seed, "vcpus": self.spec.vcpus, "workload": self.spec.workload},
            "incoming": self.spec.incoming, "autostart": self.spec.autostart, "qmp": qmp,
            "events": self.spec.events or f"ipc://{self.rundir}/events.sock",
            "fds": self.spec.fds, "drives": self.spec.drives, "devices": self.spec.devices,
        }
        self.config_path = os.path.join(self.rundir, "config.json")
        with open(self.config_path, "w") as f:
            json.dump(cfg, f, indent=1)
        return cfg

    def spawn(self, module: str, *extra: str, fds: tuple[int, ...] = ()) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-P", "-m", f"livemig.actors.{module}", self.config_path, *extra],
                                pass_fds=fds, stdin=subprocess.DEVNULL)

    def start(self) -> dict:
        import zmq

        cfg = self.prepare()
        self.zmq = zmq.Context()
        self.beats = self.zmq.socket(zmq.PULL)
        self.beats.setsockopt(zmq.LINGER, 0)
        self.beats.bind(f"ipc://{self.rundir}/heartbeat.sock")
        self.last_beat: dict[str, float] = {}
        self.started = time.monotonic() + 10  # grace while everything starts
        fds = tuple(self.spec.fds)
        for i in range(self.spec.vcpus):
            self.procs[f"vcpu{i}"] = self.spawn("vcpu", str(i))
        for name in ACTORS:
            self.procs[name] = self.spawn(name, fds=fds if name in ("writer", "receiver") else ())
        self.wait_ready(cfg["qmp"][0], 60)
        # goes away with the last process even if the host is killed.
        return cfg

    def wait_ready(self, qmp: str, timeout: float) -> None:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        address = qmp_address(qmp)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_children()
            try:
                mon = QEMUMonitorProtocol(address)
                mon.connect()
                try:
                    mon.cmd_raw("query-status")
                    return
                finally:
                    mon.close()
            except Exception:  # not up yet
                time.sleep(0.1)
        raise RuntimeError(f"host {self.spec.name} did not come up within {timeout:.0f} s")

    def check_children(self) -> None:
        for name, proc in self.procs.items():
            code = proc.poll()
            if code is not None and not self.stopping:
                raise ChildExit(name, code)

    def supervise(self) -> int:
        """Watch every actor until the host is told to quit. A migration actor
        that dies or falls silent (no heartbeat for SILENCE seconds, e.g. a
        stopped process) is killed and started afresh, and the coordinator is
        told so that it fails the migration with the cause; without its vCPUs
        or its coordinator the guest is lost, and the host stops."""
        import zmq

        from livemig.protocol.messages import Message

        ctx = zmq.Context()
        coordinator = ctx.socket(zmq.DEALER)
        coordinator.setsockopt(zmq.LINGER, 0)
        coordinator.connect(f"ipc://{self.rundir}/coordinator.sock")
        try:
            while not self.stopping:
                now = time.monotonic()
                while self.beats.poll(0):
                    name = self.beats.recv().split()[0].decode()
                    self.last_beat[name] = now
                for name, proc in list(self.procs.items()):
                    code = proc.poll()
                    if code is None and now - self.last_beat.get(name, self.started) > SILENCE:
                        proc.kill()
                        proc.wait(5)
                        cause = f"stopped responding for more than {SILENCE:.0f} s"
                    elif code is not None:
                        if name == "coordinator" and code == 0:
                            return 0  # quit
                        cause = f"died ({describe_exit(code)})"
                    else:
                        continue
                    if name not in RESTARTABLE:
                        print(f"livemig host {self.spec.name}: actor {name} {cause}; the guest is lost, "
                              "stopping the host", file=sys.stderr)
                        return 1
                    print(f"livemig host {self.spec.name}: actor {name} {cause}; restarting it",
                          file=sys.stderr)
                    self.procs[name] = self.spawn(name, fds=tuple(self.spec.fds)
                                                  if name in ("writer", "receiver") else ())
                    self.last_beat[name] = time.monotonic() + 5  # grace while it starts
                    coordinator.send_multipart(Message("actor_failed", {"actor": name, "cause": cause},
                                                       "host").serialize())
                self.beats.poll(50)
        finally:
            ctx.destroy(linger=0)
        return 0

    def stop(self) -> None:
        self.stopping = True
        if hasattr(self, "zmq"):
            self.zmq.destroy(linger=0)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self.ram is not None:
            self.ram.close()
            os.close(self.ram_fd)
        shutil.rmtree(self.rundir, ignore_errors=True)


class ChildExit(Exception):
    def __init__(self, name: str, code: int) -> None:
        super().__init__(f"{name} exited with {code}")
        self.name = name
        self.code = code


def qmp_address(addr: str) -> str | tuple[str, int]:
    """'unix:PATH', 'tcp:HOST:PORT', or a bare path -> a qemu.qmp address."""
    if addr.startswith("tcp:"):
        host, _, port = addr[4:].rpartition(":")
        return (host.strip("[]") or "127.0.0.1", int(port))
    return addr.removeprefix("unix:")


def run_host(spec: HostSpec, announce) -> int:
    host = Host(spec)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        cfg = host.start()
        announce(cfg)
        return host.supervise()
    except KeyboardInterrupt:
        return 0
    except ChildExit as exc:
        print(f"livemig host {spec.name}: actor {exc.name} failed to start (status {exc.code})",
              file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        host.stop()
