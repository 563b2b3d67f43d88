"""Helpers for the monitor tests: a raw QMP socket (to send what no polite
client would), a `livemig events` subprocess, and the replayed RAM a guest
must have."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time

import numpy as np

from livemig.actors.host import qmp_address
from livemig.machine.ram import fill_ram
from livemig.machine.runstate import MIGRATION_END
from livemig.machine.workload import WorkloadSpec, replay

END = MIGRATION_END


def migration_events(mon, timeout: float = 30) -> list[dict]:
    """Events pulled until a MIGRATION event with an end status."""
    out: list[dict] = []
    deadline = time.monotonic() + timeout
    while not (out and out[-1]["event"] == "MIGRATION" and out[-1]["data"]["status"] in END):
        out.append(mon.pull_event(wait=max(0.1, deadline - time.monotonic())))
    return out


def tokens(events: list[dict]) -> str:
    """MIGRATION:status / MIGRATION_PASS / STOP / RESUME, space separated."""
    return " ".join(f"MIGRATION:{e['data']['status']}" if e["event"] == "MIGRATION" else e["event"]
                    for e in events)


class RawQmp:
    """A QMP connection over a bare socket: bytes in, CRLF lines out."""

    def __init__(self, addr: str, negotiate: bool = True, timeout: float = 30) -> None:
        where = qmp_address(addr)
        family = socket.AF_UNIX if isinstance(where, str) else socket.AF_INET
        self.sock = socket.socket(family)
        self.sock.settimeout(timeout)
        self.sock.connect(where)
        self.file = self.sock.makefile("rb")
        self.events: list[dict] = []
        self.greeting = self.recv()
        if negotiate:
            assert self.cmd({"execute": "qmp_capabilities"}) == {"return": {}}

    def send(self, data: bytes | dict) -> None:
        self.sock.sendall(data if isinstance(data, bytes) else json.dumps(data).encode())

    def recv(self) -> dict:
        line = self.file.readline()
        if not line:
            raise EOFError("monitor closed the connection")
        assert line.endswith(b"\r\n"), line
        return json.loads(line)

    def reply(self) -> dict:
        """The next message that is not an event (events are kept in self.events)."""
        while "event" in (msg := self.recv()):
            self.events.append(msg)
        return msg

    def cmd(self, obj: dict | bytes) -> dict:
        self.send(obj)
        return self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class EventPrinter:
    """`livemig events ENDPOINT` in a subprocess, made sure to be subscribed (the
    slow-joiner problem) by toggling the guest until it prints something."""

    def __init__(self, host) -> None:
        self.proc = subprocess.Popen([sys.executable, "-P", "-m", "livemig.cli.main", "events", host.events,
                                      "--timeout", "120"], stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        self.lines: list[dict] = []
        self.partial = b""
        deadline = time.monotonic() + 30
        while not self.read(0.3):
            assert time.monotonic() < deadline, "livemig events printed nothing"
            host.cmd("stop")
            host.cmd("cont")
        self.lines.clear()

    def read(self, wait: float) -> list[dict]:
        """Collect the lines printed so far (waiting up to `wait` for the first)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()  # raw reads: a buffered readline would hide lines from select
        while select.select([fd], [], [], wait)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            *lines, self.partial = (self.partial + chunk).split(b"\n")
            self.lines += [json.loads(line) for line in lines]
            wait = 0.05
        return self.lines

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()


def replayed_ram(host, steps: list[int]) -> np.ndarray:
    """The RAM a fresh guest like `host`'s has after each vCPU ran steps[i] steps."""
    guest = host.cmd("x-query-host")["guest"]
    fresh = np.zeros(sum(b[1] for b in guest["blocks"]), np.uint8)
    fill_ram(fresh, guest["fill"], guest["seed"])
    replay(fresh.reshape(-1, 4096), WorkloadSpec.parse(guest["workload"]), guest["seed"], guest["vcpus"],
           steps)
    return fresh


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)
    return value
