"""What every actor process shares: start-up from the host's config, dying with
its parent, heartbeats; request/reply (protocol.rpc) is re-exported for them."""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import zmq
import zmq.asyncio

from livemig.machine.ram import GuestRam
from livemig.protocol.rpc import ActorError, AsyncPeer, Client, Notices, Server, log

__all__ = ["ActorError", "AsyncPeer", "Client", "GuestConfig", "HostConfig", "Notices", "Server", "actor_main",
           "log", "start_actor"]

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None) -> None:
    """Ask the kernel to kill us if the host process dies, so that no actor is
    ever left behind, even when the host is killed with SIGKILL. If it died
    before we asked, our parent is no longer the host: go at once."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1 or (parent is not None and os.getppid() != parent):
        os._exit(1)


def release_memory() -> None:
    """Give back what a finished job freed: collect its reference cycles (a
    loader and its reader hold each other and megabytes of buffers), then
    let glibc return the free memory of every thread's arena, which it keeps
    otherwise (each migration's threads may take a new arena)."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


@dataclass(frozen=True)
class GuestConfig:
    """What the guest is made of: the same on both hosts of a migration."""

    machine: str
    blocks: tuple[tuple[str, int], ...]
    fill: str
    seed: int
    vcpus: int
    workload: str


@dataclass(frozen=True)
class HostConfig:
    """The host's configuration. The supervisor hands it to each actor on its
    standard input (a pipe only the two of them hold), so nobody can swap it
    between the host writing and the actor reading it; a path is read too
    (for running an actor by hand)."""

    name: str
    rundir: str
    ram_path: str
    host_pid: int
    guest: GuestConfig
    incoming: str | None = None
    autostart: bool = True
    qmp: tuple[str, ...] = ()
    events: str = ""
    fds: tuple[int, ...] = ()
    drives: tuple[dict, ...] = ()  # machine.disk.DriveSpec fields
    devices: tuple[dict, ...] = ()  # --device: {"driver", "id"}
    objects: tuple[dict, ...] = ()  # --object: QOM-style properties (tls-creds-x509, authz-*)

    @classmethod
    def from_dict(cls, d: dict) -> HostConfig:
        guest = GuestConfig(**{**d["guest"], "blocks": tuple((n, int(s)) for n, s in d["guest"]["blocks"])})
        return cls(**{**d, "guest": guest, "qmp": tuple(d["qmp"]), "fds": tuple(d["fds"]),
                      "drives": tuple(d["drives"]), "devices": tuple(d["devices"]),
                      "objects": tuple(d.get("objects", ()))})

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def load(cls, path: str) -> HostConfig:
        if path == "-":
            return cls.from_dict(json.load(sys.stdin))
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd) as f:
            return cls.from_dict(json.load(f))

    def endpoint(self, name: str) -> str:
        return f"ipc://{self.rundir}/{name}.sock"

    def map_ram(self) -> GuestRam:
        """This host's guest RAM, mapped into the calling process."""
        return GuestRam(self.ram_path, list(self.guest.blocks))


HEARTBEAT_INTERVAL = 0.1


def heartbeat(endpoint: str, name: str) -> None:
    """Tell the supervisor every 100 ms that this process is alive and not
    stopped; a thread of its own, with a context of its own."""
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 4)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(endpoint)
    beat = f"{name} {os.getpid()}".encode()
    while True:
        try:
            push.send(beat, zmq.NOBLOCK)
        except zmq.Again:
            pass  # the supervisor is busy; the next beat will do
        time.sleep(HEARTBEAT_INTERVAL)


# Errors an actor meets at start-up that are the user's (a port in use, a bad
# URI): one line to the host, no traceback. Anything else is a bug: traceback too.
EXPECTED_ERRORS = (ActorError, OSError, zmq.ZMQError)


def report_fatal(name: str, endpoint: str):
    """An excepthook that tells the supervisor in one line why this actor
    dies (it prints it: one line on the host's stderr, not a traceback per
    actor), then exits."""
    def hook(etype, exc, tb) -> None:
        if not isinstance(exc, EXPECTED_ERRORS) or log.isEnabledFor(logging.DEBUG):
            sys.__excepthook__(etype, exc, tb)
        if isinstance(exc, ActorError):
            desc = exc.desc
        elif isinstance(exc, OSError) and exc.strerror:  # without the "[Errno N]"
            desc = exc.strerror + (f": {exc.filename}" if exc.filename else "")
        else:
            desc = str(exc) or etype.__name__
        try:
            ctx = zmq.Context()
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 1000)
            push.connect(endpoint)
            push.send(f"{name} {os.getpid()} fatal {desc}".encode())
            push.close()
            ctx.term()
        finally:
            os._exit(1)  # not a normal exit: it could wait on sockets still open
    return hook


def write_pid(rundir: str, name: str) -> None:
    fd = os.open(os.path.join(rundir, f"{name}.pid"),
                 os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))


def start_actor(name: str) -> HostConfig:
    """What every actor process does first: die with the host, read the
    host's config, log with its name, leave a pid file, start heartbeats."""
    die_with_parent()
    cfg = HostConfig.load(sys.argv[1])
    die_with_parent(cfg.host_pid)
    logging.basicConfig(
        level=os.environ.get("LIVEMIG_LOG", "WARNING").upper(),
        format=f"%(asctime)s {cfg.name}/{name} %(levelname)s %(message)s", force=True)  # not the host's
    sys.excepthook = report_fatal(name, cfg.endpoint("heartbeat"))
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # nothing to flush: die quietly
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the host decides when we stop
    write_pid(cfg.rundir, name)
    threading.Thread(target=heartbeat, args=(cfg.endpoint("heartbeat"), name), daemon=True).start()
    return cfg


def actor_main(name: str, run: Callable[[HostConfig, zmq.Context], None]) -> None:
    """Entry point of an actor process: `python -m livemig.actors.X -|CONFIG [extra]`."""
    cfg = start_actor(name if len(sys.argv) < 3 else f"{name}{sys.argv[2]}")
    ctx = zmq.Context()
    try:
        run(cfg, ctx)
    except KeyboardInterrupt:
        pass
    finally:
        ctx.destroy(linger=0)


