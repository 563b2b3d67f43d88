"""What every actor process shares: start-up from the host's config, dying with
its parent, heartbeats; request/reply (protocol.rpc) is re-exported for them."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq
import zmq.asyncio

from livemig.protocol.rpc import ActorError, AsyncPeer, Client, Notices, Server, log

__all__ = ["ActorError", "AsyncPeer", "Client", "HostConfig", "Notices", "Server", "actor_main",
           "log", "start_actor"]

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to kill us if the host process dies, so that no actor is
    ever left behind, even when the host is killed with SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:
        os._exit(1)


@dataclass
class HostConfig:
    """The host's config.json, written by the supervisor for its actors."""

    raw: dict

    @classmethod
    def load(cls, path: str) -> HostConfig:
        with open(path) as f:
            return cls(json.load(f))

    def __getitem__(self, key: str):
        return self.raw[key]

    def endpoint(self, name: str) -> str:
        return f"ipc://{self.raw['rundir']}/{name}.sock"


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


def start_actor(name: str) -> HostConfig:
    """What every actor process does first: die with the host, read the
    host's config, log with its name, leave a pid file, start heartbeats."""
    die_with_parent()
    cfg = HostConfig.load(sys.argv[1])
    logging.basicConfig(
        level=os.environ.get("LIVEMIG_LOG", "WARNING").upper(),
        format=f"%(asctime)s {cfg['name']}/{name} %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # nothing to flush: die quietly
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the host decides when we stop
    with open(os.path.join(cfg["rundir"], f"{name}.pid"), "w") as f:
        f.write(str(os.getpid()))
    threading.Thread(target=heartbeat, args=(cfg.endpoint("heartbeat"), name), daemon=True).start()
    return cfg


def actor_main(name: str, run: Callable[[HostConfig, zmq.Context], None]) -> None:
    """Entry point of an actor process: `python -m actors.X CONFIG [extra]`."""
    cfg = start_actor(name if len(sys.argv) < 3 else f"{name}{sys.argv[2]}")
    ctx = zmq.Context()
    try:
        run(cfg, ctx)
    except KeyboardInterrupt:
        pass
    finally:
        ctx.destroy(linger=0)


