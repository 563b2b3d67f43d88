"""The host supervisor: takes the host's run directory, creates the guest's
RAM, starts one process per actor, watches them, and stops every one of them
when it stops (actors also die with it if it is killed: see
base.die_with_parent).

A host owns what it creates and nothing else. Its run directory is private
(0700, ours, reached without following a symbolic link) and locked for as long
as it lives, so a second host of the same name is refused before it writes
anything; the guest's RAM is a memfd, which no file names; and a small reaper
process removes the run directory if the host is killed."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

from livemig.actors.base import GuestConfig, HostConfig
from livemig.actors.forked import ForkedActor, preload
from livemig.machine.ram import GuestRam, fill_ram, layout
from livemig.machine.workload import WorkloadSpec
from livemig.protocol.uri import UriError, parse_qmp_address, parse_uri

# Started in this order; the monitor only once the coordinator answers: a
# client that meets QMP finds the guest ready (and its incoming socket
# listening), as QEMU listens before it serves its monitor.
ACTORS = ("receiver", "writer", "ram_sender", "block_sender", "coordinator")
# Actors that hold no guest state: they can be started afresh after a failure;
# a new coordinator takes over from the state its predecessor left (takeover.py).
RESTARTABLE = ("receiver", "writer", "ram_sender", "block_sender", "monitor", "coordinator")
MAX_RESTARTS = 5  # of one actor within RESTART_WINDOW s: beyond, it keeps dying and the host stops
RESTART_WINDOW = 60.0
# Seconds without a heartbeat before an actor counts as stuck: long enough
# that a loaded machine (two cores, a dozen busy processes) is not mistaken
# for a hung actor; a dead one is seen at once by its exit, not by silence.
SILENCE = 5.0
READY_TIMEOUT = 60.0  # s for the whole start-up: every actor, the incoming socket, QMP
LOCK_WAIT = 2.0  # s a host waits for another of its name before it is refused ...
STOP_WAIT = 10.0  # ... or this long if that one is stopping (a restart)
STOPPING = "stopping"  # marks a run directory whose host is on its way out
SOCKET_PATH_MAX = 107  # bytes in a UNIX socket address, its NUL aside


class HostError(RuntimeError):
    """Why a host cannot start: one line for the user."""


def describe_exit(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


def runtime_root() -> str:
    """Where hosts keep their run directories (one per host name)."""
    if os.environ.get("LIVEMIG_RUNDIR"):
        return os.environ["LIVEMIG_RUNDIR"]
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "livemig")
    if os.geteuid() == 0 and os.path.isdir("/run"):
        return "/run/livemig"
    return f"/tmp/livemig-{os.getuid()}"


def host_dir(name: str) -> str:
    return os.path.join(runtime_root(), name)


def default_qmp(name: str) -> str:
    return os.path.join(host_dir(name), "qmp.sock")


# run directories ------------------------------------------------------------------
def check_ancestors(path: str) -> None:
    """Refuse a run directory whose parents someone else could rename it out
    of: each must belong to root or to us, and be writable by nobody else
    unless it is sticky (as /tmp is)."""
    me = os.geteuid()
    parent = os.path.dirname(os.path.abspath(path))
    while True:
        st = os.stat(parent)
        if st.st_uid not in (0, me):
            raise HostError(f"run directory {path}: {parent} belongs to uid {st.st_uid}: refusing it")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise HostError(f"run directory {path}: {parent} is writable by others: refusing it")
        if parent == "/":
            return
        parent = os.path.dirname(parent)


def open_private_dir(path: str, shown: str, dir_fd: int | None = None) -> int:
    """Create (0700) or open the directory `path` without following a
    symbolic link, and check that it is ours and private."""
    try:
        os.mkdir(path, 0o700, dir_fd=dir_fd)
    except FileExistsError:
        pass
    except OSError as exc:
        raise HostError(f"cannot create run directory {shown}: {exc.strerror}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            st = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
            kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
            raise HostError(f"run directory {shown} is {kind}: refusing it") from None
        raise HostError(f"cannot open run directory {shown}: {exc.strerror}") from None
    st = os.fstat(fd)
    problem = None
    if st.st_uid != os.geteuid():
        problem = f"belongs to uid {st.st_uid}, not to uid {os.geteuid()}"
    elif st.st_mode & 0o077:
        problem = f"has mode {stat.S_IMODE(st.st_mode):04o}, not 0700"
    if problem:
        os.close(fd)
        raise HostError(f"run directory {shown} {problem}: refusing it")
    return fd


def holder(dir_fd: int) -> str:
    """' (pid N)' of the host that holds a run directory, if it says."""
    try:
        fd = os.open("host.pid", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        with os.fdopen(fd) as f:
            return f" (pid {int(f.read(16))})"
    except (OSError, ValueError):
        return ""


def take_dir(root_fd: int, name: str, shown: str) -> int:
    """Open the host's run directory and lock it (flock, held while the host
    and its reaper live). Another host of the name is refused, after waiting
    a moment for one that is stopping."""
    t0 = time.monotonic()
    while True:
        fd = open_private_dir(name, shown, root_fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                stopping = bool(os.stat(STOPPING, dir_fd=fd, follow_symlinks=False))
            except OSError:
                stopping = False
            pid = holder(fd)
            os.close(fd)
            if time.monotonic() - t0 > (STOP_WAIT if stopping else LOCK_WAIT):
                raise HostError(f"a host named {name!r} is already running{pid}") from None
            time.sleep(0.05)
            continue
        # The host before us may have removed the directory while we waited.
        try:
            here = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
        except FileNotFoundError:
            here = None
        mine = os.fstat(fd)
        if here is not None and (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino):
            return fd
        os.close(fd)


def clear_dir(dir_fd: int) -> None:
    """Remove what a host of this name left in its (locked) run directory."""
    for entry in os.listdir(dir_fd):
        try:
            os.unlink(entry, dir_fd=dir_fd)
        except OSError:
            pass


def remove_dir(root_fd: int, dir_fd: int, name: str) -> None:
    clear_dir(dir_fd)
    try:
        here = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
        mine = os.fstat(dir_fd)
        if (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino):
            os.rmdir(name, dir_fd=root_fd)
    except OSError:
        pass


def start_reaper(root_fd: int, dir_fd: int, name: str) -> int:
    """Fork a process of its own session that waits for the host to end and,
    if the host did not say it cleaned up (it was killed), removes the run
    directory; it holds the directory's lock until then. Returns the pipe
    to it: the host writes b"d" there once it cleaned up itself."""
    r, w = os.pipe()
    if os.fork() == 0:
        try:
            os.setsid()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
            null = os.open(os.devnull, os.O_RDWR)
            for std in (0, 1, 2):
                os.dup2(null, std)  # let go of the host's stdout: its reader waits for EOF
            for fd in os.listdir("/proc/self/fd"):
                if int(fd) not in (0, 1, 2, r, root_fd, dir_fd):
                    try:
                        os.close(int(fd))
                    except OSError:
                        pass
            if os.read(r, 1) != b"d":
                remove_dir(root_fd, dir_fd, name)
        finally:
            os._exit(0)
    os.close(r)
    return w


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
    objects: list[dict] = field(default_factory=list)  # --object: object-add's arguments


def check_incoming(uri: str, fds: list[int]) -> None:
    """Refuse a malformed --incoming before anything starts (the receiver
    checks it again; binding is its to try)."""
    try:
        parsed = parse_uri(uri)
    except UriError as exc:
        raise HostError(str(exc)) from None
    if parsed.scheme == "fd" and int(parsed.target) not in fds:
        raise HostError(f"descriptor {parsed.target} was not passed to this host (--fd)")


class Host:
    def __init__(self, spec: HostSpec) -> None:
        workload = WorkloadSpec.parse(spec.workload)  # refuse a bad spec before creating anything
        if workload.uses_disk and not spec.drives:
            raise ValueError(f"workload {workload.kind} writes to a disk: give --drive")
        if workload.uses_disk and spec.vcpus != 1:
            raise ValueError(f"workload {workload.kind} runs on one vCPU (vCPU 0 owns the drives)")
        if spec.name in ("", ".", "..") or "/" in spec.name or "\0" in spec.name:
            raise HostError(f"host name {spec.name!r} cannot name a directory")
        if spec.incoming and spec.incoming != "defer":
            check_incoming(spec.incoming, spec.fds)
        self.spec = spec
        self.rundir = host_dir(spec.name)
        if len(os.path.join(self.rundir, "block_sender.sock").encode()) > SOCKET_PATH_MAX:
            raise HostError(f"run directory {self.rundir} is too long for a UNIX socket address: "
                            "a shorter --name or LIVEMIG_RUNDIR")
        self.procs: dict[str, ForkedActor] = {}
        self.ram: GuestRam | None = None
        self.ram_fd: int | None = None
        self.root_fd: int | None = None
        self.dir_fd: int | None = None  # held (and locked) only once the directory is ours
        self.reaper: int | None = None
        self.fatal: dict[str, str] = {}  # actor -> the one line it said when it died
        self.last_beat: dict[str, float] = {}
        self.restarts: dict[str, list[float]] = {}  # actor -> when it was restarted lately
        self.stopping = False

    def take_rundir(self) -> None:
        root = os.path.dirname(self.rundir)
        check_ancestors(root)
        self.root_fd = open_private_dir(root, root)
        self.dir_fd = take_dir(self.root_fd, self.spec.name, self.rundir)
        self.reaper = start_reaper(self.root_fd, self.dir_fd, self.spec.name)
        clear_dir(self.dir_fd)  # what a killed host of this name (and its reaper) left
        fd = os.open("host.pid", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=self.dir_fd)
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))

    def create_ram(self) -> str:
        """The guest's RAM: a memfd, so no file outlives the host. Actors
        (also ones restarted later) open it through our descriptor."""
        size = sum(b.size for b in layout(self.spec.blocks))
        self.ram_fd = os.memfd_create(f"livemig-{self.spec.name}.ram", os.MFD_CLOEXEC)
        os.ftruncate(self.ram_fd, size)
        ram_path = f"/proc/{os.getpid()}/fd/{self.ram_fd}"
        self.ram = GuestRam(ram_path, self.spec.blocks)
        # The receiver prefaults the RAM of an incoming host itself (it is the
        # process that writes it); the source's actors map what they read.
        fill_ram(self.ram.bytes, self.spec.fill, self.spec.seed)
        return ram_path

    def prepare(self) -> HostConfig:
        self.take_rundir()
        ram_path = self.create_ram()
        qmp = self.spec.qmp or [f"unix:{os.path.join(self.rundir, 'qmp.sock')}"]
        cfg = HostConfig(
            name=self.spec.name, rundir=self.rundir, ram_path=ram_path, host_pid=os.getpid(),
            guest=GuestConfig(machine=self.spec.machine, blocks=tuple(map(tuple, self.spec.blocks)),
                              fill=self.spec.fill, seed=self.spec.seed, vcpus=self.spec.vcpus,
                              workload=self.spec.workload),
            incoming=self.spec.incoming, autostart=self.spec.autostart, qmp=tuple(qmp),
            events=self.spec.events or f"ipc://{self.rundir}/events.sock",
            fds=tuple(self.spec.fds), drives=tuple(self.spec.drives), devices=tuple(self.spec.devices),
            objects=tuple(self.spec.objects))
        self.cfg_bytes = cfg.to_json()
        return cfg

    def spawn(self, name: str, restart: bool = False) -> ForkedActor:
        """Start one actor, forked from this process (forked.py)."""
        module, extra = ("vcpu", [name[4:]]) if name.startswith("vcpu") else (name, [])
        if restart and name == "coordinator":
            extra = ["takeover"]
        keep = tuple(self.spec.fds) if name in ("writer", "receiver") else ()
        return ForkedActor(name, module, extra, self.cfg_bytes, keep)

    def start(self) -> dict:
        """Start every actor; returns what the host announces (its configuration
        and the address it really listens on)."""
        import zmq

        cfg = self.prepare()
        preload()  # once: each fork then finds every module loaded
        self.zmq = zmq.Context()
        self.beats = self.zmq.socket(zmq.PULL)
        self.beats.setsockopt(zmq.LINGER, 0)
        self.beats.bind(f"ipc://{self.rundir}/heartbeat.sock")
        self.control = self.zmq.socket(zmq.DEALER)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.connect(f"ipc://{self.rundir}/coordinator.sock")
        self.started = time.monotonic() + 10  # grace while everything starts
        deadline = time.monotonic() + READY_TIMEOUT
        for name in [f"vcpu{i}" for i in range(self.spec.vcpus)] + list(ACTORS):
            self.procs[name] = self.spawn(name)
        incoming_uri = self.wait_coordinator(deadline).get("incoming")
        self.procs["monitor"] = self.spawn("monitor")
        for addr in cfg.qmp:
            while not qmp_greets(qmp_address(addr)):
                self.check_children()
                if time.monotonic() > deadline:
                    raise HostError(f"its monitor did not come up on {addr} within {READY_TIMEOUT:.0f} s")
                time.sleep(0.05)
        return {**asdict(cfg), "incoming_uri": incoming_uri}

    def wait_coordinator(self, deadline: float) -> dict:
        """Ask the coordinator for x-query-host: it answers once every actor
        answered it and the incoming socket, if any, listens."""
        from livemig.protocol.messages import ERROR, Message

        self.control.send_multipart(Message("qmp", {"execute": "x-query-host", "rid": 0}, "host").serialize())
        while not self.control.poll(50):
            self.drain_beats()
            self.check_children()
            if time.monotonic() > deadline:
                raise HostError(f"its actors did not come up within {READY_TIMEOUT:.0f} s")
        reply = Message.unserialize(self.control.recv_multipart())
        if reply.type == ERROR:
            raise HostError(reply.data.get("desc", "the coordinator refused to start"))
        return reply.data.get("result") or {}

    def drain_beats(self) -> None:
        """Heartbeats ("NAME PID"), and the one line an actor sends as it dies
        ("NAME PID fatal DESC")."""
        now = time.monotonic()
        while self.beats.poll(0):
            words = self.beats.recv().decode(errors="replace").split(" ", 3)
            self.last_beat[words[0]] = now
            if len(words) == 4 and words[2] == "fatal":
                self.fatal[words[0]] = words[3]

    def cause(self, name: str, code: int) -> str:
        """Why an actor that exited did so: its last words, if they come."""
        deadline = time.monotonic() + 0.5
        while name not in self.fatal and code > 0 and time.monotonic() < deadline:
            self.beats.poll(50)
            self.drain_beats()
        return self.fatal.pop(name, None) or describe_exit(code)

    def check_children(self) -> None:
        for name, proc in self.procs.items():
            code = proc.poll()
            if code is not None and not self.stopping:
                raise ChildExit(name, code, self.cause(name, code))

    def supervise(self) -> int:
        """Watch every actor until the host is told to quit. A migration actor
        that dies or falls silent (no heartbeat for SILENCE seconds, e.g. a
        stopped process) is killed and started afresh, and the coordinator is
        told so that it fails the migration with the cause; a new coordinator
        takes over the guest. A dead vCPU is the guest's crash: the host stops."""
        from livemig.protocol.messages import Message

        while not self.stopping:
            now = time.monotonic()
            self.drain_beats()
            for name, proc in list(self.procs.items()):
                code = proc.poll()
                if code is None and now - self.last_beat.get(name, self.started) > SILENCE:
                    proc.kill()
                    proc.wait(5)
                    cause = f"stopped responding for more than {SILENCE:.0f} s"
                elif code is not None:
                    if name == "coordinator" and code == 0:
                        return 0  # quit
                    cause = f"died ({self.cause(name, code)})"
                else:
                    continue
                recent = [t for t in self.restarts.get(name, []) if now - t < RESTART_WINDOW]
                if name not in RESTARTABLE or len(recent) >= MAX_RESTARTS:
                    why = ("the guest crashed (as when QEMU's vCPU thread dies)" if name.startswith("vcpu")
                           else "the guest is lost" if name not in RESTARTABLE
                           else f"it died {len(recent)} times within {RESTART_WINDOW:.0f} s")
                    print(f"livemig host {self.spec.name}: actor {name} {cause}; {why}, stopping the host",
                          file=sys.stderr)
                    return 1
                self.restarts[name] = [*recent, now]
                print(f"livemig host {self.spec.name}: actor {name} {cause}; restarting it", file=sys.stderr)
                self.procs[name] = self.spawn(name, restart=True)
                self.last_beat[name] = time.monotonic() + 5  # grace while it starts
                if name != "coordinator":
                    self.control.send_multipart(Message("actor_failed", {"actor": name, "cause": cause},
                                                        "host").serialize())
            self.beats.poll(50)
        return 0

    def stop(self) -> None:
        """Stop every actor, then remove what this host created, and only that."""
        self.stopping = True
        if self.dir_fd is not None:
            try:  # a host restarted now waits for us rather than being refused
                os.close(os.open(STOPPING, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                                 dir_fd=self.dir_fd))
            except OSError:
                pass
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
        if self.ram_fd is not None:
            os.close(self.ram_fd)
        if self.dir_fd is not None and self.root_fd is not None:
            remove_dir(self.root_fd, self.dir_fd, self.spec.name)
            if self.reaper is not None:
                os.write(self.reaper, b"d")
                os.close(self.reaper)
            fcntl.flock(self.dir_fd, fcntl.LOCK_UN)
            os.close(self.dir_fd)
            self.dir_fd = None
        if self.root_fd is not None:
            os.close(self.root_fd)
            self.root_fd = None


class ChildExit(Exception):
    def __init__(self, name: str, code: int, cause: str) -> None:
        super().__init__(f"actor {name} failed to start: {cause}")
        self.name = name
        self.code = code


def qmp_greets(address: str | tuple[str, int], timeout: float = 1.0) -> bool:
    """Whether a QMP server at address sends its greeting."""
    if isinstance(address, str):
        family = socket.AF_UNIX
    else:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        data = b""
        try:
            s.connect(address)
            while b"\n" not in data and len(data) < 65536:
                chunk = s.recv(4096)
                if not chunk:
                    return False
                data += chunk
        except OSError:
            return False
    return b'"QMP"' in data


def qmp_address(addr: str) -> str | tuple[str, int]:
    """'unix:PATH', 'tcp:HOST:PORT', or a bare path -> a qemu.qmp address."""
    if not addr.startswith(("unix:", "tcp:")):
        return addr
    uri = parse_qmp_address(addr)
    return (uri.host or "127.0.0.1", uri.port) if uri.scheme == "tcp" else uri.target


def run_host(spec: HostSpec, announce) -> int:
    """Run a host until it is told to quit. A host that cannot start says why
    in one line on stderr and returns 1, having removed what it created."""
    try:
        host = Host(spec)
    except HostError as exc:
        print(f"livemig host {spec.name}: {exc}", file=sys.stderr)
        return 1

    def on_signal(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        cfg = host.start()
        announce(cfg)
        return host.supervise()
    except KeyboardInterrupt:
        return 0
    except (HostError, ChildExit) as exc:
        print(f"livemig host {spec.name}: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        host.stop()
