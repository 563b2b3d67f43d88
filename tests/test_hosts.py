"""Hosts own their files: the start and stop of one host cannot hurt another,
a host that cannot start says why in one line and leaves nothing behind, a
destination answers QMP only once it listens, and a run directory someone
else planted is refused."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from livemig.actors.host import qmp_greets
from livemig.tools.launch import HostProcess, free_port
from tests.conftest import LONG, guest_args, replay_matches, tagged_pids

ARGS = guest_args(ram="16M", workload="memtouch:rate=1M,wss=2M")
# Errors come within 10 s; on a machine loaded far past its cores (a start-up
# is a dozen Python processes) the same CPU time takes longer.
LOADED = os.getloadavg()[0] > 4 * (os.cpu_count() or 1)
WITHIN = 30 if LOADED else 10


@pytest.fixture
def run(tmp_path, hosts):
    """A run directory of the test's own, and the environment that points hosts at it."""
    root = tmp_path / "run"
    env = {"LIVEMIG_RUNDIR": str(root), "LIVEMIG_TEST_TAG": hosts.tag}

    class Run:
        def __init__(self) -> None:
            self.root = root
            self.env = env

        def start(self, name: str, *args: str, wait: bool = True, return_path: bool = True) -> HostProcess:
            h = HostProcess(name, *args, env=env, wait=wait, return_path=return_path)
            hosts.started.append(h)
            return h

        def host_cmd(self, name: str, *args: str) -> list[str]:
            return [sys.executable, "-P", "-m", "livemig.cli.main", "host", "--name", name, *args]

        def refused(self, name: str, *args: str, timeout: float = 60) -> tuple[str, float]:
            """Run a host that must fail: its one line on stderr, and how long it took."""
            t0 = time.monotonic()
            done = subprocess.run(self.host_cmd(name, *args), env={**os.environ, **env}, capture_output=True,
                                  stdin=subprocess.DEVNULL, timeout=timeout)
            took = time.monotonic() - t0
            lines = done.stderr.decode().strip().splitlines()
            assert done.returncode == 1, (done.returncode, lines)
            assert len(lines) == 1, lines
            assert not done.stdout, done.stdout
            return lines[0], took

        def left(self) -> list[str]:
            """What is in the run directory (each host's directory, and what is in it)."""
            if not root.exists():
                return []
            return sorted(str(p.relative_to(root)) for p in root.rglob("*"))

    return Run()


def shm(name: str) -> list[str]:
    """Files in /dev/shm that name the host (other sessions' files aside)."""
    return [e for e in os.listdir("/dev/shm") if f"-{name}-" in e] if os.path.isdir("/dev/shm") else []


def wait_gone(pids: list[int], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while left := [p for p in pids if alive(p)]:
        assert time.monotonic() < deadline, f"still running: {left}"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def works(h: HostProcess) -> None:
    """The host answers and its guest runs on."""
    step = h.cmd("x-query-vcpus")[0]["step"]
    deadline = time.monotonic() + 10
    while h.cmd("x-query-vcpus")[0]["step"] == step:
        assert time.monotonic() < deadline, "the guest stopped"
        time.sleep(0.05)
    assert h.cmd("query-status")["status"] == "running"


# one name, one host ----------------------------------------------------------------
def test_second_host_of_a_name_is_refused_and_touches_nothing(run):
    a = run.start("a", *ARGS, return_path=False)  # nothing set: its state file is not rewritten meanwhile
    before = {p: (run.root / p).stat().st_ino for p in run.left()}
    line, took = run.refused("a", *ARGS)
    assert "a host named 'a' is already running" in line and f"pid {a.info['pid']}" in line, line
    assert took < WITHIN, took
    after = {p: (run.root / p).stat().st_ino for p in run.left()}
    assert after == before  # not one file of the running host's touched
    works(a)
    a.close()
    assert run.left() == []


@pytest.mark.parametrize("delay", [0.0, 0.2, 0.5])
def test_restart_during_shutdown(run, delay):
    """A host started while the old one of its name is stopping waits for it,
    then runs with files of its own that the old one does not remove."""
    old = run.start("r", *ARGS)
    mon = old.qmp()
    mon.cmd_raw("quit")
    mon.close()
    time.sleep(delay)
    new = run.start("r", *ARGS)
    assert old.proc.wait(10) == 0
    time.sleep(0.5)  # whatever the old one still did on its way out
    assert new.info["pid"] != old.info["pid"]
    works(new)
    assert (run.root / "r" / "host.pid").read_text() == str(new.info["pid"])
    assert {"r/qmp.sock", "r/coordinator.sock", "r/heartbeat.sock"} <= set(run.left())
    new.close()
    assert run.left() == []


# start-up errors: one line, exit 1, within seconds, nothing left ---------------------
@pytest.fixture
def busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    yield s.getsockname()[1]
    s.close()


@pytest.mark.parametrize("uri,cause", [
    ("tcp:127.0.0.1:99999", "must be tcp:HOST:PORT"),
    ("tpc:127.0.0.1:4444", "unsupported migration URI"),
    ("tcp:127.0.0.1:{busy}", "Address already in use"),
    ("tcp:192.0.2.1:{free}", "Cannot assign requested address"),
    ("unix:/nonexistent/dir/mig.sock", "No such file or directory"),
    ("fd:7", "was not passed to this host"),
])
def test_bad_incoming_is_one_line_and_exit_1(run, busy_port, uri, cause):
    other = run.start("other", *ARGS)
    uri = uri.format(busy=busy_port, free=free_port())
    line, took = run.refused("bad", *ARGS, "--incoming", uri)
    assert cause in line and line.startswith("livemig host bad: "), line
    assert took < WITHIN, took
    assert not [p for p in run.left() if p.startswith("bad")], run.left()
    assert shm("bad") == []
    works(other)


def test_unusable_qmp_and_events_are_one_line(run, busy_port):
    line, took = run.refused("q", *ARGS, "--qmp", f"tcp:127.0.0.1:{busy_port}")
    assert "address already in use" in line.lower() and took < WITHIN, line
    line, took = run.refused("e", *ARGS, "--events", f"tcp://127.0.0.1:{busy_port}")
    assert "address already in use" in line.lower() and took < WITHIN, line
    assert run.left() == []


@pytest.mark.parametrize("after", [0.3, 0.8, 1.5, 3.0])
def test_supervisor_killed_at_start_up_leaves_nothing(run, hosts, after):
    """SIGKILL of a host while it fills its RAM or starts its actors: its
    actors go, its run directory goes (the reaper), no RAM file stays."""
    other = run.start("other", *ARGS)
    keep = {other.proc.pid, *actor_pids(other.proc.pid)}
    proc = subprocess.Popen(run.host_cmd("k", "--ram", "256M", "--fill", "random"), env={**os.environ, **run.env},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    time.sleep(after)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    t0 = time.monotonic()
    while set(tagged_pids(hosts.tag)) - keep:
        assert time.monotonic() - t0 < WITHIN, set(tagged_pids(hosts.tag)) - keep
        time.sleep(0.05)
    deadline = time.monotonic() + 5
    while "k" in run.left() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [p for p in run.left() if p.startswith("k")] == [], run.left()
    assert time.monotonic() - t0 < WITHIN
    assert shm("k") == []
    works(other)
    # and the name is free again
    again = run.start("k", *ARGS)
    works(again)


def actor_pids(host_pid: int) -> list[int]:
    with open(f"/proc/{host_pid}/task/{host_pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_killed_host_leaves_nothing(run):
    h = run.start("h", *ARGS)
    actors = actor_pids(h.proc.pid)
    h.kill()
    wait_gone(actors)
    deadline = time.monotonic() + 5
    while run.left() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run.left() == []


# ready means ready ---------------------------------------------------------------------
def test_migrate_the_moment_qmp_greets(run, tmp_path):
    """20 hops (6 without LIVEMIG_LONG=1), each to a fresh destination and
    issued as soon as its QMP greets; half on a port named in advance, half on
    port 0 (the real one from x-query-host). None refused; the last guest
    equals its replay."""
    src = run.start("hop0", *ARGS)
    for i in range(1, (20 if LONG else 6) + 1):
        qmp = f"unix:{tmp_path}/hop{i}.sock"
        port = free_port() if i % 2 else 0
        dst = run.start(f"hop{i}", *ARGS, "--qmp", qmp, "--incoming", f"tcp:127.0.0.1:{port}", wait=False)
        deadline = time.monotonic() + 60
        while not qmp_greets(qmp.removeprefix("unix:"), 0.5):
            assert dst.proc.poll() is None and time.monotonic() < deadline, f"hop {i} did not start"
            time.sleep(0.002)
        dst.qmp_addr = qmp
        if port == 0:
            uri = dst.cmd("x-query-host")["incoming"]  # asked before anything else: it is known
            assert uri.startswith("tcp:127.0.0.1:") and not uri.endswith(":0"), uri
        else:
            uri = f"tcp:127.0.0.1:{port}"
        src.cmd("migrate", uri=uri)
        info = src.wait_migration(60)
        assert info["status"] == "completed", (i, info)
        dst.wait_started()
        dst.wait_status("running", 30)
        src.close()
        src = dst
    result = replay_matches(src, tmp_path)
    assert result["ram_equal"] and result["vcpu_equal"], result


# local safety ----------------------------------------------------------------------------
def planted_host(run, tmp_path, plant) -> str:
    """Plant something at the run directory, start a host: its one-line refusal."""
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o700)
    (outside / "victim").write_text("keep me")
    plant(run.root, outside)
    before = sorted(os.listdir(outside))
    line, took = run.refused("p", *ARGS)
    assert took < WITHIN
    assert sorted(os.listdir(outside)) == before and (outside / "victim").read_text() == "keep me"
    return line


def test_root_symlink_refused(run, tmp_path):
    line = planted_host(run, tmp_path, lambda root, outside: root.symlink_to(outside))
    assert "is a symbolic link: refusing it" in line, line


def test_host_dir_symlink_refused(run, tmp_path):
    def plant(root, outside):
        root.mkdir(mode=0o700)
        (root / "p").symlink_to(outside)
    line = planted_host(run, tmp_path, plant)
    assert "is a symbolic link: refusing it" in line, line


@pytest.mark.parametrize("mode", [0o755, 0o777, 0o1777, 0o750])
def test_root_with_open_mode_refused(run, tmp_path, mode):
    def plant(root, outside):
        root.mkdir()
        os.chmod(root, mode)
    line = planted_host(run, tmp_path, plant)
    assert f"has mode {mode:04o}, not 0700" in line, line
    assert os.listdir(run.root) == []


@pytest.mark.parametrize("where", ["root", "host"])
def test_dir_of_another_user_refused(run, tmp_path, where):
    nobody = 65534

    def plant(root, outside):
        root.mkdir(mode=0o700)
        target = root if where == "root" else root / "p"
        if where == "host":
            target.mkdir(mode=0o700)
        os.chown(target, nobody, nobody)
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user")
    line = planted_host(run, tmp_path, plant)
    assert f"belongs to uid {nobody}, not to uid 0" in line, line


def test_parent_writable_by_others_refused(run, tmp_path):
    def plant(root, outside):
        os.chmod(root.parent, 0o777)  # no sticky bit: anyone could rename our directory away
    try:
        line = planted_host(run, tmp_path, plant)
    finally:
        os.chmod(run.root.parent, 0o700)
    assert "is writable by others: refusing it" in line, line


def test_configuration_never_touches_a_file(run):
    """Actors get their configuration down a pipe: nothing in the run
    directory says what an actor runs, so nothing there can be swapped."""
    h = run.start("c", *ARGS)
    # coordinator-state.json is what a successor coordinator takes over (run
    # state, parameters), not what any actor runs.
    assert not [p for p in run.left() if p.endswith(".json") and "coordinator-state" not in p], run.left()
    names = set()
    for pid in actor_pids(h.proc.pid):  # forks of the host, each named after its actor
        with open(f"/proc/{pid}/comm") as f:
            names.add(f.read().strip())
    assert {"receiver", "writer", "ram_sender", "block_sender", "coordinator", "monitor", "vcpu0"} <= names, names
    mode = os.stat(run.root / "c").st_mode & 0o777
    assert mode == 0o700
    for name in os.listdir(run.root / "c"):
        st = os.lstat(run.root / "c" / name)
        assert st.st_uid == os.geteuid() and not st.st_mode & 0o022, (name, oct(st.st_mode))


def test_default_run_directory(monkeypatch):
    from livemig.actors import host

    monkeypatch.delenv("LIVEMIG_RUNDIR", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    assert host.runtime_root() == "/run/user/1234/livemig"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    expected = "/run/livemig" if os.geteuid() == 0 else f"/tmp/livemig-{os.getuid()}"
    assert host.runtime_root() == expected


def test_bad_names_refused(run):
    for name in ("..", "a/b", "x" * 120):
        line, _ = run.refused(name, *ARGS)
        assert "cannot name a directory" in line or "too long for a UNIX socket" in line, line
    assert run.left() == []



def test_tcp_listeners_bind_what_was_named(run, tmp_path):
    """tcp::PORT is every address (as in QEMU); tcp:HOST:PORT only HOST."""
    port, qany, qone = free_port(), free_port(), free_port()
    dst = run.start("any", *ARGS, "--incoming", f"tcp::{port}", "--qmp", f"tcp::{qany}",
                    "--qmp", f"tcp:127.0.0.1:{qone}")
    assert dst.cmd("x-query-host")["incoming"] in (f"tcp:[::]:{port}", f"tcp:0.0.0.0:{port}")
    assert qmp_greets(("127.0.0.2", qany), 10) and qmp_greets(("127.0.0.1", qone), 10)
    assert not qmp_greets(("127.0.0.2", qone))  # bound to 127.0.0.1 alone
    src = run.start("from", *ARGS)
    src.cmd("migrate", uri=f"tcp::{port}")
    info = src.wait_migration(30)
    assert info["status"] == "failed" and "names no host to connect to" in info["error-desc"], info
    src.wait_status("running", 10)
    src.cmd("migrate", uri=f"tcp:127.0.0.2:{port}")
    assert src.wait_migration(60)["status"] == "completed"
    dst.wait_status("running", 30)
    result = replay_matches(dst, tmp_path)
    assert result["ram_equal"] and result["vcpu_equal"], result


def test_a_stopped_actor_is_replaced(hosts):
    """An actor that falls silent (SIGSTOP) is killed and started afresh;
    the guest runs on and the host answers."""
    from livemig.actors.host import SILENCE
    from livemig.tools.bench.accounting import actor_pids

    h = hosts.start("stopped", *ARGS)
    old = actor_pids(h.proc.pid)["block_sender"]
    os.kill(old, signal.SIGSTOP)
    deadline = time.monotonic() + SILENCE + 20
    while actor_pids(h.proc.pid).get("block_sender") in (old, None):
        assert time.monotonic() < deadline, "the stopped block sender was not replaced"
        time.sleep(0.2)
    step = h.cmd("x-query-vcpus")[0]["step"]
    time.sleep(0.5)
    assert h.cmd("x-query-vcpus")[0]["step"] > step
    assert h.cmd("query-status")["status"] == "running"
