"""What the monitor says, compared with a real QEMU 7.2: `query-migrate` on the
source (active, completed, failed at connect, cancelled) and on the destination
(listening, completed), field by field, top level and `ram`; the greeting; the
capabilities; and the refusal of what livemig lacks. Every difference allowed
here is listed in docs/monitor.md."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from livemig.actors.host import qmp_address
from livemig.tools.launch import free_port
from tests.conftest import TAG

QEMU = shutil.which("qemu-system-x86_64")
DOC = Path(__file__).resolve().parent.parent / "docs" / "monitor.md"
# QEMU 7.2 fields livemig does not report, per state and part; livemig's extras
# are x- names, except where listed here.
MISSING_RAM = {"skipped", "dirty-sync-missed-zero-copy", "multifd-bytes"}
EXTRA = {("destination", "listening"): {"status"}}
MISSING = {("destination", "listening"): set()}


class Qemu:
    def __init__(self, tmp: Path, name: str, *args: str) -> None:
        sock = tmp / f"{name}.sock"
        self.proc = subprocess.Popen([QEMU, "-M", "none", "-m", "256", "-nodefaults", "-display", "none",
                                      "-qmp", f"unix:{sock},server=on,wait=off", *args],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env={**os.environ, "LIVEMIG_TEST_TAG": TAG})
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert time.monotonic() < deadline and self.proc.poll() is None, "QEMU did not start"
            time.sleep(0.05)
        self.mon = QEMUMonitorProtocol(str(sock))
        self.greeting = self.mon.connect()

    def cmd(self, name: str, **args):
        return self.mon.cmd(name, **args)

    def close(self) -> None:
        if self.proc.returncode is not None:
            return
        try:
            self.mon.close()
        except (EOFError, OSError):
            pass  # it quit by itself (after a failed incoming migration)
        self.proc.kill()
        self.proc.wait(10)


def wait(cmd, states: tuple[str, ...], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while (info := cmd("query-migrate")).get("status") not in states:
        assert time.monotonic() < deadline, info
        time.sleep(0.02)
    return info


def shapes(src_cmd, dst_cmd, set_bandwidth, port: int, restart_dst) -> dict:
    """query-migrate in each state, from one implementation (QEMU or livemig)."""
    out = {("destination", "listening"): dst_cmd("query-migrate")}
    set_bandwidth(True)  # slow enough to be seen active and cancelled
    src_cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    out[("source", "active")] = wait(src_cmd, ("active",))
    time.sleep(0.3)
    src_cmd("migrate_cancel")
    out[("source", "cancelled")] = wait(src_cmd, ("cancelled",))
    dst_cmd = restart_dst()
    set_bandwidth(False)
    src_cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    out[("source", "completed")] = wait(src_cmd, ("completed",))
    out[("destination", "completed")] = wait(dst_cmd, ("completed",))
    return out


def fail_at_connect(cmd) -> dict:
    cmd("migrate", uri=f"tcp:127.0.0.1:{free_port()}")
    return wait(cmd, ("failed",))


def compare(ours: dict, theirs: dict, where: tuple[str, str]) -> list[str]:
    problems = []
    extra = set(ours) - set(theirs) - EXTRA.get(where, set())
    if bad := {k for k in extra if not k.startswith("x-")}:
        problems.append(f"{where}: livemig has {sorted(bad)}, QEMU does not")
    if missing := set(theirs) - set(ours) - MISSING.get(where, set()):
        problems.append(f"{where}: QEMU has {sorted(missing)}, livemig does not")
    if "ram" in theirs or "ram" in ours:
        r_ours, r_theirs = set(ours.get("ram", {})), set(theirs.get("ram", {}))
        if r_ours - r_theirs:
            problems.append(f"{where}: ram: livemig has {sorted(r_ours - r_theirs)}")
        if r_theirs - r_ours - MISSING_RAM:
            problems.append(f"{where}: ram: QEMU has {sorted(r_theirs - r_ours - MISSING_RAM)}")
    for key in set(ours) & set(theirs) - {"ram"}:
        if type(ours[key]) is not type(theirs[key]) and not {type(ours[key]), type(theirs[key])} <= {int, float}:
            problems.append(f"{where}: {key} is {type(ours[key]).__name__}, QEMU's "
                            f"{type(theirs[key]).__name__}")
    return problems


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed (scripts/test installs it)")
def test_query_migrate_field_by_field(hosts, tmp_path):
    # QEMU 7.2, both sides.
    port = free_port()
    qsrc, qdst = Qemu(tmp_path, "qsrc"), Qemu(tmp_path, "qdst", "-incoming", f"tcp:127.0.0.1:{port}")
    started = [qsrc, qdst]
    try:
        def qemu_dst():
            qdst.close()  # QEMU quits after a failed incoming migration: a fresh one
            started.append(fresh := Qemu(tmp_path, "qdst2", "-incoming", f"tcp:127.0.0.1:{port}"))
            return fresh.cmd
        started.append(qfail := Qemu(tmp_path, "qfail"))
        qemu_failed = fail_at_connect(qfail.cmd)
        # QEMU's guest RAM is all zero pages, a few bytes each on the wire: 64 KiB/s is slow.
        theirs = shapes(qsrc.cmd, qdst.cmd, lambda slow: qsrc.cmd("migrate-set-parameters", **{
            "max-bandwidth": 64 << 10 if slow else 0}), port, qemu_dst)
    finally:
        for q in started:
            q.close()

    # livemig, both sides, the same steps.
    port = free_port()
    args = ("--machine", "none", "--ram", "32M", "--fill", "random")
    src = hosts.start("src", *args)
    dst = hosts.start("dst", *args, "--incoming", f"tcp:127.0.0.1:{port}")

    def livemig_dst():
        dst.wait_migration(30, states=("failed",))
        dst.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        return dst.cmd
    ours_failed = fail_at_connect(hosts.start("fail", *args).cmd)
    ours = shapes(src.cmd, dst.cmd, lambda slow: src.cmd("migrate-set-parameters", **{
        "max-bandwidth": 4 << 20 if slow else 0}), port, livemig_dst)

    problems = compare(ours_failed, qemu_failed, ("source", "failed"))
    for where in theirs:
        problems += compare(ours[where], theirs[where], where)
    assert not problems, "\n".join(problems) + f"\nlivemig: {ours}\nQEMU: {theirs}"
    assert ours_failed.keys() == {"status", "error-desc"}, ours_failed
    assert ours[("source", "cancelled")] == {"status": "cancelled"} == theirs[("source", "cancelled")]
    qemu_named = {k: v for k, v in ours[("destination", "completed")].items() if not k.startswith("x-")}
    assert qemu_named == {"status": "completed"} == theirs[("destination", "completed")]
    address = [{"type": "inet", "host": "127.0.0.1", "port": str(port), "ipv4": True}]
    assert ours[("destination", "listening")]["socket-address"] == address
    assert theirs[("destination", "listening")]["socket-address"][0].keys() == address[0].keys()

    text = DOC.read_text()
    for name in sorted(MISSING_RAM) + ["socket-address", "x-ram", "x-guest-downtime", "x-switchover",
                                        "x-expected-downtime"]:
        assert f"`{name}`" in text, f"docs/monitor.md does not list {name}"


# Names livemig takes from a later QEMU (docs/monitor.md); every other extra is an x- name.
LATER = {"dirty-limit", "vcpu-dirty-limit"}


def refusal(cmd, name: str, capability: bool) -> str:
    args = {"capabilities": [{"capability": name, "state": True}]} if capability else {name: 1}
    reply = cmd.cmd_raw("migrate-set-capabilities" if capability else "migrate-set-parameters", args)
    return reply["error"]["desc"] if "error" in reply else ""


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed (scripts/test installs it)")
def test_names_defaults_and_refusals_against_qemu(hosts, tmp_path):
    """Every capability and parameter of QEMU 7.2 is either livemig's, with QEMU's default
    and order, or refused as not supported by livemig; names QEMU lacks are refused in
    QEMU's words; HMP offers only commands QEMU has; the greeting says what it is."""
    qemu = Qemu(tmp_path, "q")
    try:
        q_caps = {c["capability"]: c["state"] for c in qemu.cmd("query-migrate-capabilities")}
        q_params = qemu.cmd("query-migrate-parameters")  # a JSON object: no order
        q_order = [line.split(":")[0] for line in qemu.cmd(
            "human-monitor-command", **{"command-line": "info migrate_parameters"}).splitlines()]
        q_help = qemu.cmd("human-monitor-command", **{"command-line": "help"})
        q_gone = [qemu.cmd("human-monitor-command", **{"command-line": line})
                  for line in ("migrate_set_speed 1", "migrate_set_downtime 1")]
        q_unknown = refusal(qemu.mon, "avail-switchover-bandwidth", False)
        q_commands = {c["name"] for c in qemu.cmd("query-commands")}
    finally:
        qemu.close()
    host = hosts.start("h", "--machine", "none", "--ram", "16M", return_path=False)  # as a user starts it
    mon = QEMUMonitorProtocol(qmp_address(host.qmp_addr))
    greeting = mon.connect()
    try:
        version = mon.cmd("query-version")
        assert version == {"qemu": {"major": 7, "minor": 2, "micro": 0},
                           "package": f"livemig {metadata.version('livemig')}"}
        # QEMU's shape (qemu.qmp checks it), livemig's name in `package`; no OOB offered
        assert greeting["QMP"] == {"version": version, "capabilities": []}
        caps = {c["capability"]: c["state"] for c in mon.cmd("query-migrate-capabilities")}
        params = mon.cmd("query-migrate-parameters")
        problems = []
        ours_commands = {c["name"] for c in mon.cmd("query-commands")}
        if extra := {n for n in ours_commands - q_commands if not n.startswith("x-")}:
            problems.append(f"commands QEMU 7.2 lacks, not named x-: {sorted(extra)}")
        for theirs, order, ours, capability in ((q_caps, list(q_caps), caps, True),
                                                (q_params, q_order, params, False)):
            for name, default in theirs.items():
                if name in ours:
                    if ours[name] != default:
                        problems.append(f"{name}: livemig's default {ours[name]!r}, QEMU's {default!r}")
                elif (said := refusal(mon, name, capability)) != \
                        f"{'Capability' if capability else 'Parameter'} '{name}' is not supported by livemig":
                    problems.append(f"{name}: neither reported nor refused as not supported: {said!r}")
            if extra := {n for n in ours if n not in theirs and not n.startswith("x-") and n not in LATER}:
                problems.append(f"livemig has {sorted(extra)}, QEMU 7.2 does not")
            if [n for n in ours if n in order] != [n for n in order if n in ours]:
                problems.append(f"not in QEMU's order: {[n for n in ours if n in order]}")
        assert not problems, "\n".join(problems)
        assert refusal(mon, "avail-switchover-bandwidth", False) == q_unknown == \
            "Parameter 'avail-switchover-bandwidth' is unexpected"
        assert "does not accept value 'bogus'" in refusal(mon, "bogus", True)
        ours_help = mon.cmd("human-monitor-command", **{"command-line": "help"})
        q_names = {line.split()[0].split("|")[0] for line in q_help.splitlines() if line[:1].isalpha()}
        ours_names = {line.split()[0].split("|")[0] for line in ours_help.splitlines() if line[:1].isalpha()}
        aliases = {line.split()[0] for line in ours_help.splitlines() if "|" in line.split()[0]}
        assert aliases == {n for n in (line.split()[0] for line in q_help.splitlines() if line[:1].isalpha())
                           if "|" in n and n.split("|")[0] in ours_names}, aliases
        assert {n for n in ours_names if not n.startswith("x_")} <= q_names, ours_names - q_names  # x_: livemig's
        assert [mon.cmd("human-monitor-command", **{"command-line": line})
                for line in ("migrate_set_speed 1", "migrate_set_downtime 1")] == q_gone
        assert mon.cmd("human-monitor-command", **{"command-line": "q"}) == ""  # QEMU's quit|q
        assert host.proc.wait(30) == 0
    finally:
        mon.close()
    text = DOC.read_text()
    for name in sorted(LATER) + ["return-path", "x-avail-switchover-bandwidth", "not supported by livemig"]:
        assert name in text, f"docs/monitor.md does not mention {name}"
