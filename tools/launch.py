"""Starting and stopping `livemig host` processes from Python: what the demo,
the benchmarks and the tests use to run real hosts side by side."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

from livemig.actors.host import qmp_address
from livemig.machine.runstate import MIGRATION_END


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HostProcess:
    """One `livemig host` process tree, stopped for sure when closed."""

    def __init__(self, name: str, *args: str, pass_fds: tuple[int, ...] = (), timeout: float = 60,
                 env: dict | None = None, prefix: tuple[str, ...] = (), wait: bool = True,
                 return_path: bool = True) -> None:
        """`prefix` runs the host under another command, e.g. `ip netns exec NS`;
        `wait=False` returns at once (call wait_started before using it). As
        libvirt does for every migration it runs (not tunnelled), the host gets
        capability return-path on, unless `return_path` is False: QEMU's default
        (off) leaves a source unable to learn that the destination failed."""
        self.name = name
        self.return_path = return_path
        cmd = [*prefix, sys.executable, "-P", "-m", "livemig.cli.main", "host", "--name", name, "--json", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     pass_fds=pass_fds, start_new_session=True,
                                     env={**os.environ, **(env or {})})
        if wait:
            self.wait_started(timeout)

    def wait_started(self, timeout: float = 60) -> None:
        """Wait for the host's announcement (it comes once QMP answers)."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            self.close()
            raise RuntimeError(f"host {self.name} did not start (exit status {self.proc.poll()})")
        self.info = json.loads(line)
        self.qmp_addr = self.info["qmp"]
        self.events = self.info["events"]
        if self.return_path:
            self.cmd("migrate-set-capabilities", capabilities=[{"capability": "return-path", "state": True}])

    def qmp(self):
        from qemu.qmp.legacy import QEMUMonitorProtocol

        mon = QEMUMonitorProtocol(qmp_address(self.qmp_addr))
        mon.connect()
        return mon

    def cmd(self, name: str, **args):
        """Run one QMP command; raise RuntimeError on a QMP error."""
        mon = self.qmp()
        try:
            reply = mon.cmd_raw(name, args)
        finally:
            mon.close()
        if "error" in reply:
            raise RuntimeError(reply["error"]["desc"])
        return reply["return"]

    def wait_migration(self, timeout: float = 120, states=MIGRATION_END) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.cmd("query-migrate")
            if info.get("status") in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: migration still {info.get('status')} after {timeout} s")
            time.sleep(0.05)

    def wait_status(self, status: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while (now := self.cmd("query-status")["status"]) != status:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: guest still {now}, not {status}, after {timeout} s")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the host process (its actors die with it)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.cmd("quit")
                self.proc.wait(10)
            except Exception:
                pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self) -> HostProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
