"""Actor processes forked from the host supervisor.

A fresh interpreter that imports numpy, zmq and our modules costs a quarter
of a second of CPU, and a host starts ten of them: on two shared cores that
was most of the time a host took to start. The host imports every actor
module once and forks; the child runs the module as `python -P -m
livemig.actors.X -` would (the same entry point, which still works by hand),
with its configuration handed over in memory rather than through a pipe or
a file, so nothing another user can reach says what an actor runs."""

from __future__ import annotations

import ctypes
import importlib
import io
import os
import signal
import subprocess
import sys
import time

from livemig.actors.base import actor_main

PR_SET_NAME = 15
# The module whose main() or run() an actor runs (`-m livemig.actors.coordinator` runs control's main).
MODULES = {"receiver": "receiver", "writer": "writer", "ram_sender": "ram_sender", "block_sender": "block_sender",
           "coordinator": "coordinator.control", "monitor": "monitor", "vcpu": "vcpu"}


def preload() -> None:
    """Import what the actors import, so that each fork finds it loaded."""
    for module in MODULES.values():
        importlib.import_module(f"livemig.actors.{module}")


def run_actor(module: str) -> None:
    """What `python -m livemig.actors.MODULE` runs under its __main__ guard."""
    code = importlib.import_module(f"livemig.actors.{MODULES[module]}")
    if hasattr(code, "main"):
        code.main()
    else:
        actor_main(module, code.run)


def become(name: str, keep: tuple[int, ...]) -> None:
    """In the child: nothing of the host but the standard streams and the
    descriptors this actor was given; the default signal handlers; its name."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd in os.listdir("/proc/self/fd"):
        if int(fd) > 2 and int(fd) not in keep:
            try:
                os.close(int(fd))
            except OSError:
                pass  # the directory's own descriptor, already gone
    try:
        ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode()[:15])  # what ps and /proc/PID/comm show
    except (OSError, AttributeError):
        pass


class ForkedActor:
    """A child actor with the part of subprocess.Popen's interface the host uses."""

    def __init__(self, name: str, module: str, extra: list[str], config: bytes, keep: tuple[int, ...]) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self._run(name, module, extra, config, keep)
        self.pid, self.returncode = pid, None

    @staticmethod
    def _run(name: str, module: str, extra: list[str], config: bytes, keep: tuple[int, ...]) -> None:
        code = 1
        try:
            become(name, keep)
            sys.argv = [f"livemig.actors.{module}", "-", *extra]
            sys.stdin = io.TextIOWrapper(io.BytesIO(config))
            run_actor(module)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        except BaseException:  # noqa: BLE001 - whatever ends an actor ends it here, not in the host's code
            sys.excepthook(*sys.exc_info())  # the actor's own (base.report_fatal), as when run by hand
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)  # never the host's atexit handlers

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"actor {self.pid}", timeout)
            time.sleep(0.01)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
