"""Shared fixtures: real hosts started as separate process trees, and a check
after every test that none of their processes is left behind."""

from __future__ import annotations

import os
import time
import uuid

import numpy as np
import pytest

from livemig.machine.ram import fill_ram
from livemig.machine.workload import WorkloadSpec, replay
from livemig.tools.launch import HostProcess, free_port

LONG = os.environ.get("LIVEMIG_LONG") == "1"


def pytest_collection_modifyitems(config, items):
    """Tests marked `long` run only with LIVEMIG_LONG=1: the default suite
    keeps a sample of each matrix and stays under 15 minutes on two cores."""
    if LONG:
        return
    skip = pytest.mark.skip(reason="long: runs with LIVEMIG_LONG=1")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


TAG = f"livemig-test-{uuid.uuid4().hex[:8]}"


def tagged_pids(tag: str, prefix: bool = False) -> list[int]:
    """Processes whose environment carries the tag (or, with prefix, any tag
    starting with it)."""
    found = []
    needle = f"LIVEMIG_TEST_TAG={tag}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
            if any(v == needle or (prefix and v.startswith(needle)) for v in env):
                found.append(int(entry))
        except OSError:
            continue
    return found


class Hosts:
    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.started: list[HostProcess] = []

    def start(self, name: str, *args: str, pass_fds: tuple[int, ...] = (), return_path: bool = True) -> HostProcess:
        h = HostProcess(f"{name}-{uuid.uuid4().hex[:6]}", *args, pass_fds=pass_fds,
                        env={"LIVEMIG_TEST_TAG": self.tag}, return_path=return_path)
        self.started.append(h)
        return h

    def close(self) -> None:
        for h in self.started:
            h.close()


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind():
    """Whatever a test started (hosts, demos, QEMU), nothing outlives the session."""
    yield
    deadline = time.monotonic() + 10
    while (left := tagged_pids(TAG, prefix=True)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes left behind by the test session: {left}"


@pytest.fixture
def hosts():
    tag = f"{TAG}-{uuid.uuid4().hex[:6]}"
    h = Hosts(tag)
    yield h
    h.close()
    deadline = time.monotonic() + 10
    while (left := tagged_pids(tag)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes left behind: {left}"


@pytest.fixture
def port() -> int:
    return free_port()


def guest_args(ram: str = "64M", fill: str = "random", seed: int = 7, workload: str = "idle",
               vcpus: int = 1) -> list[str]:
    return ["--ram", ram, "--fill", fill, "--seed", str(seed), "--workload", workload,
            "--vcpus", str(vcpus)]


def replay_matches(host: HostProcess, tmp_path, fill: str = "random", seed: int = 7) -> dict:
    """Stop the host's guest and compare its RAM and vCPUs with a replay of its steps."""
    host.cmd("stop")
    regs = host.cmd("x-query-vcpus")
    guest = host.cmd("x-query-host")["guest"]
    size = sum(b[1] for b in guest["blocks"])
    dump = tmp_path / f"{host.name}.ram"
    host.cmd("pmemsave", val=0, size=size, filename=str(dump))
    actual = np.fromfile(dump, np.uint8)
    fresh = np.zeros(size, np.uint8)
    fill_ram(fresh, guest["fill"], guest["seed"])
    expected = replay(fresh.reshape(-1, 4096), WorkloadSpec.parse(guest["workload"]), guest["seed"],
                      guest["vcpus"], [r["step"] for r in regs])
    dump.unlink()
    return {"ram_equal": bool(np.array_equal(actual, fresh)), "vcpu_equal": expected == regs,
            "steps": [r["step"] for r in regs]}
