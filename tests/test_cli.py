"""The command line as a person meets it: every command run for real (a
subprocess, piped, and on an 80-column pseudo-terminal), its exit status and
its one line of error; behaviour against real hosts."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time

import pytest

from livemig.tools.launch import free_port
from tests.conftest import TAG, guest_args

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def livemig(*args: str, tty: bool = False, timeout: float = 120) -> tuple[int, str, str]:
    """Run `livemig ARGS` as a user would, with COLUMNS=80: piped, or with stdout on
    an 80x24 pseudo-terminal. Returns (exit status, stdout, stderr)."""
    env = {**os.environ, "COLUMNS": "80", "LINES": "24", "LIVEMIG_TEST_TAG": TAG}
    cmd = [sys.executable, "-P", "-m", "livemig.cli.main", *args]
    if not tty:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                           stdin=subprocess.DEVNULL)
        return p.returncode, p.stdout, p.stderr
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env["TERM"] = "xterm"
    p = subprocess.Popen(cmd, stdout=slave, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the other side is closed
                    break
                if not chunk:
                    break
                out += chunk
            elif p.poll() is not None:
                break
        p.wait(max(1, deadline - time.monotonic()))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
        os.close(master)
    err = p.stderr.read().decode() if p.stderr else ""
    if p.stderr:
        p.stderr.close()
    return p.returncode, out.decode(errors="replace"), err


def screen_lines(text: str) -> list[str]:
    """What a terminal shows, line by line: escapes dropped, each carriage return
    starting the line over."""
    lines = []
    for line in ANSI.sub("", text).replace("\r\n", "\n").split("\n"):
        lines += line.split("\r")
    return lines


def one_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, err
    return lines[0]


def fits(text: str, width: int = 80) -> None:
    wide = [ln for ln in screen_lines(text) if len(ln) > width]
    assert not wide, wide


# argument errors: no host needed ------------------------------------------------------------------
@pytest.mark.parametrize("args, error", [
    (["set-speed", "0.5"], "'0.5' is less than one byte/s"),
    (["set-speed", "-5"], "size must not be negative: '-5'"),
    (["set-speed", "fast"], "not a size: 'fast'"),
    (["set-downtime", "-5"], "downtime must not be negative"),
    (["set-downtime", "0.3ms"], "not a whole number of milliseconds"),
    (["set-downtime", "soon"], "not a duration: 'soon'"),
    (["migrate", "--downtime", "1h", "tcp:127.0.0.1:1"], "not a duration: '1h'"),
    (["migrate", "--bandwidth", "0.5", "tcp:127.0.0.1:1"], "less than one byte/s"),
    (["migrate", "--timeout", "0", "tcp:127.0.0.1:1"], "--timeout"),
    (["migrate", "--postcopy-after-precopy", "tcp:127.0.0.1:1"], "--postcopy-after-precopy needs --postcopy"),
    (["migrate", "--parallel-connections", "4", "tcp:127.0.0.1:1"], "--parallel-connections needs --parallel"),
    (["migrate", "--tls-destination", "x", "tcp:127.0.0.1:1"], "--tls-destination needs --tls"),
    (["migrate", "--auto-converge", "--auto-converge-initial", "100", "tcp:127.0.0.1:1"], "1<=x<=99"),
])
@pytest.mark.parametrize("tty", [False, True])
def test_bad_values_are_refused_in_one_line(args, error, tty):
    code, out, err = livemig(*args, "-H", "nosuch", tty=tty)
    assert code == 2, (out, err)
    assert error in one_error(err)


@pytest.mark.parametrize("tty", [False, True])
def test_no_such_host(tty):
    for cmd in (["info"], ["set-speed", "1M"], ["set-downtime", "300ms"], ["cancel"], ["quit"],
                ["hmp", "info status"], ["migrate", "tcp:127.0.0.1:1"]):
        code, out, err = livemig(*cmd, "-H", "nosuch", tty=tty)
        assert code == 1, (cmd, out, err)
        assert err.strip().splitlines() == ["Error: no host named nosuch (`livemig list` shows the running "
                                            "ones)"], (cmd, err)


def test_version_and_log_level():
    code, out, _ = livemig("--version")
    assert code == 0 and re.fullmatch(r"livemig \d+\.\d+\.\d+ \(QEMU savevm stream v3\)\n", out), out
    code, _, err = livemig("--log-level", "loud", "list")
    assert code == 2 and "'loud' is not one of" in one_error(err)


@pytest.mark.parametrize("args, words", [
    (["host", "--help"], ["--vcpus INTEGER RANGE", "Number of vCPU", "diskwrite:iops=N,size=S", "kv:rate=N"]),
    (["info", "--help"], ["--json", "query-migrate"]),
    (["demo", "--help"], ["--seed", "Seed of the guest's fill and workload"]),
    (["migrate", "--help"], ["--timeout SECONDS", "--blk", "--inc", "--bandwidth SPEED", "--downtime",
                             "virsh"]),
    (["set-downtime", "--help"], ["bare number", "milliseconds", "300ms", "0.3s"]),
    (["--help"], ["--version", "--verbose", "--log-level", "LIVEMIG_RUNDIR", "LIVEMIG_LOG", "list", "quit"]),
])
def test_help(args, words):
    code, out, _ = livemig(*args)
    assert code == 0
    flat = " ".join(out.split())
    for w in words:
        assert w in flat, (w, out)
    fits(out)


def test_every_option_has_help():
    import click

    from livemig.cli.main import main

    def walk(cmd: click.Command, path: str):
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, f"{path} {name}")

    bare = [f"{path} {p.opts[0]}" for path, cmd in walk(main, "livemig") for p in cmd.params
            if isinstance(p, click.Option) and not p.help and "--help" not in p.opts]
    assert not bare, bare


# against real hosts --------------------------------------------------------------------------------
@pytest.fixture
def rundir(tmp_path, monkeypatch):
    """A private run directory: `livemig list` sees only this test's hosts."""
    path = tmp_path / "run"
    path.mkdir(mode=0o700)  # hosts refuse a run directory others could enter
    monkeypatch.setenv("LIVEMIG_RUNDIR", str(path))
    return path


def test_list_settings_hmp_and_quit(hosts, rundir):
    src = hosts.start("src", *guest_args(ram="32M", workload="memtouch:rate=2M,wss=4M"))
    code, out, err = livemig("list", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["name"] for r in rows] == [src.name]
    assert rows[0]["state"] == "running" and rows[0]["migration"] == "none"
    assert rows[0]["guest"] == "32 MiB, 1 vCPU, memtouch:rate=2M,wss=4M"
    code, out, _ = livemig("list")
    assert code == 0 and out.splitlines()[1].split()[:3] == [src.name, "running", "none"]
    fits(out)

    for args, line, value in ((["set-speed", "32M"], "max-bandwidth: 33554432 bytes/s", 32 << 20),
                              (["set-speed", "0"], "max-bandwidth: 0 bytes/s (unlimited)", 0)):
        code, out, err = livemig(*args, "-H", src.name)
        assert (code, out.strip()) == (0, line), err
        assert src.cmd("query-migrate-parameters")["max-bandwidth"] == value
    for text, ms in (("250", 250), ("300ms", 300), ("0.3s", 300), ("1.5s", 1500)):
        code, out, err = livemig("set-downtime", text, "-H", src.name)
        assert (code, out.strip()) == (0, f"downtime-limit: {ms} ms"), err
        assert src.cmd("query-migrate-parameters")["downtime-limit"] == ms
    code, _, err = livemig("set-downtime", "3000s", "-H", src.name)
    assert code == 1 and "downtime_limit" in one_error(err)

    code, out, err = livemig("cancel", "-H", src.name)
    assert (code, out.strip()) == (0, "no migration in progress: nothing to cancel"), err

    code, out, err = livemig("hmp", "-H", src.name, "info status")
    assert (code, out, err) == (0, "VM status: running\n", "")
    code, out, err = livemig("hmp", "-H", src.name, "bogus")
    assert code == 1 and err.strip() == "unknown command: 'bogus'", (out, err)
    code, out, err = livemig("hmp", "-H", src.name, "migrate_set_capability nosuch on")
    assert code == 1 and err.startswith("Error:"), (out, err)
    code, out, err = livemig("hmp", "-H", src.name, "stop extra")
    assert code == 1 and 'Try "help stop"' in err, (out, err)

    code, out, err = livemig("quit", "-H", src.name)
    assert (code, out.strip()) == (0, f"host {src.name} quits"), err
    src.proc.wait(20)
    code, out, _ = livemig("list")
    assert code == 0 and src.name not in out


@pytest.mark.parametrize("tty", [False, True])
def test_migrate_progress_fits_80_columns(hosts, rundir, port, tty):
    args = guest_args(ram="128M", workload="memtouch:rate=4M,wss=8M")
    src = hosts.start("src", *args)
    dst = hosts.start("dst", *args, "--incoming", f"tcp:127.0.0.1:{port}")
    code, out, err = livemig("migrate", "-H", src.name, "--bandwidth", "96M", "--downtime", "400ms",
                             f"tcp:127.0.0.1:{port}", tty=tty)
    assert code == 0, (out, err)
    assert src.cmd("query-migrate-parameters")["max-bandwidth"] == 96 << 20
    assert src.cmd("query-migrate-parameters")["downtime-limit"] == 400
    fits(out)
    lines = [ln for ln in screen_lines(out) if ln.strip()]
    progress = [ln for ln in lines if "MiB" in ln and "/" in ln]
    assert progress, out
    done = [ln for ln in progress if ln.startswith("completed")]
    assert done and all("exp" not in ln for ln in done), done
    if not tty:  # plain lines, no bar characters
        assert all(re.match(r"(setup|active|device|completed)(, |$)", ln) for ln in progress), progress
        assert "━" not in out
    assert "Mbit/s" in out and "Mbps" not in out

    # The destination shows what QEMU's shows after a migration: its status.
    code, out, err = livemig("info", "-H", dst.name, tty=tty)
    assert code == 0, err
    fits(out)
    assert "guest: running" in out and "migration completed" in out
    for stale in ("downtime:", "passes", "Mbit/s", "None", "transferred"):
        assert stale not in out, out


def test_cancel_says_so(hosts, rundir, port):
    args = guest_args(ram="64M", workload="memtouch:rate=64M,wss=48M")
    src = hosts.start("src", *args)
    dst = hosts.start("dst", *args, "--incoming", f"tcp:127.0.0.1:{port}")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 20})
    code, out, err = livemig("migrate", "-d", "-H", src.name, f"tcp:127.0.0.1:{port}")
    assert code == 0 and out.startswith("migration to tcp:"), err
    src.wait_migration(30, states=("active",))
    code, out, err = livemig("cancel", "-H", src.name)
    assert (code, out.strip()) == (0, "migration cancel requested (it was active)"), err
    assert src.wait_migration(30)["status"] == "cancelled"
    src.wait_status("running", 30)
    code, out, err = livemig("info", "-H", dst.name)
    assert code == 0, err
    assert "transferred 0.0 MiB" not in out and "RAM: 0 MiB" not in out and "None" not in out, out


@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="qemu-system-x86_64 is not installed")
@pytest.mark.parametrize("tty", [False, True])
def test_stream_inspect_of_a_qemu_pc_stream_fits(tmp_path, tty):
    """QEMU's own full-PC stream (30-odd sections): whole words, no None, 80 columns."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    sock, stream = tmp_path / "qmp.sock", tmp_path / "pc.stream"
    qemu = subprocess.Popen(["qemu-system-x86_64", "-M", "pc", "-m", "64M", "-S", "-nodefaults", "-display", "none",
                             "-qmp", f"unix:{sock},server=on,wait=off"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "LIVEMIG_TEST_TAG": TAG})
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        mon = QEMUMonitorProtocol(str(sock))
        mon.connect()
        mon.cmd("migrate", uri=f"exec:cat > {stream}")
        while mon.cmd("query-migrate").get("status") not in ("completed", "failed"):
            assert time.monotonic() < deadline + 30
            time.sleep(0.05)
        mon.close()
    finally:
        qemu.kill()
        qemu.wait(10)
    code, out, err = livemig("stream", "inspect", str(stream), tty=tty)
    assert code == 0, err
    fits(out)
    assert "None" not in out
    text = " ".join(screen_lines(out))
    for name in ("globalstate", "cpu_common", "timer", "/rom@etc/acpi/tables", "apic"):
        assert re.search(rf"(^|\s){re.escape(name)}\s", text), name


def test_migrate_takes_virsh_flags(hosts, rundir, port, tmp_path):
    """--auto-converge and --postcopy --postcopy-after-precopy set what virsh's set, and the
    migration uses them; --tls without a client credential and --parallel without multifd are
    refused in one line before anything starts."""
    uri = f"tcp:127.0.0.1:{port}"
    guest = guest_args(ram="32M", workload="memtouch:rate=16M,wss=24M")
    src = hosts.start("src", *guest, return_path=False)  # QEMU's default, which livemig migrate turns on
    dst = hosts.start("dst", *guest, "--incoming", uri)
    code, out, err = livemig("migrate", "-H", src.name, "--tls", uri)
    assert code == 1 and "--tls needs exactly one tls-creds-x509 object with endpoint=client" in one_error(err)
    if not any(c["capability"] == "multifd" for c in src.cmd("query-migrate-capabilities")):
        code, out, err = livemig("migrate", "-H", src.name, "--parallel", uri)
        assert code == 1 and one_error(err) == \
            "Error: --parallel needs capability multifd, which this livemig host lacks", err
    else:  # --parallel is multifd, --parallel-connections its channels (the destination sets its own first)
        other = f"tcp:127.0.0.1:{free_port()}"
        pdst = hosts.start("pdst", *guest, "--incoming", "defer")
        pdst.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
        pdst.cmd("migrate-set-parameters", **{"multifd-channels": 3})
        pdst.cmd("migrate-incoming", uri=other)
        psrc = hosts.start("psrc", *guest)
        code, out, err = livemig("migrate", "-H", psrc.name, "--json", "--parallel", "--parallel-connections", "3",
                                 other)
        assert code == 0 and json.loads(out)["ram"]["multifd-bytes"] > 0, (out, err)
        assert psrc.cmd("query-migrate-parameters")["multifd-channels"] == 3
        assert pdst.wait_migration(30)["status"] == "completed"
    assert src.cmd("query-migrate") == {}  # nothing started

    dst.cmd("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": True}])
    code, out, err = livemig("migrate", "-H", src.name, "--json", "--bandwidth", "16M", "--auto-converge",
                             "--auto-converge-initial", "30", "--postcopy", "--postcopy-after-precopy", uri)
    assert code == 0, (out, err)
    final = json.loads(out)
    assert final["status"] == "completed" and final["ram"]["postcopy-bytes"] > 0, final
    caps = {c["capability"]: c["state"] for c in src.cmd("query-migrate-capabilities")}
    assert caps["auto-converge"] and caps["postcopy-ram"] and caps["return-path"]
    params = src.cmd("query-migrate-parameters")
    assert params["cpu-throttle-initial"] == 30 and params["x-postcopy-after-passes"] == 1
    assert dst.wait_migration(30)["status"] == "completed"


def test_stall_verdict_in_the_one_rate_unit():
    """x-stalled gives bytes/s; the progress line shows Mbit/s, as every rate of the CLI."""
    from livemig.cli.progress import convergence_notes

    stalled = {"dirty-rate": 16 << 20, "bandwidth": 4 << 20, "expected-downtime": 900, "downtime-limit": 300}
    assert convergence_notes({"x-stalled": stalled}) == ["NOT CONVERGING (dirtying 134 Mbit/s, link 34 Mbit/s)"]
