"""The monitor as QMP clients written for QEMU see it: the real `qemu.qmp`
client (asyncio QMPClient and the sync legacy QEMUMonitorProtocol) and raw
sockets for what no polite client sends, against real hosts."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import select
import socket
import stat
import struct
import subprocess
import sys
import termios
import threading
import time
from importlib import metadata

import numpy as np
import pytest
from qemu.qmp import QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

from livemig.actors.host import qmp_address, qmp_greets
from livemig.machine.runstate import (
    MIGRATION_END,
    MigrationStatus,
    StateError,
    check_migration_transition,
)
from livemig.protocol import events as ev
from livemig.tools.launch import free_port
from tests.conftest import guest_args
from tests.qmp_util import (
    END,
    EventPrinter,
    RawQmp,
    migration_events,
    replayed_ram,
    tokens,
    wait_for,
)

EVENTS_ON = {"capabilities": [{"capability": "events", "state": True}]}
TOUCH = guest_args(ram="32M", workload="memtouch:rate=4M,wss=8M")


async def events_until_end(listener, timeout: float) -> list[dict]:
    out: list[dict] = []
    while not (out and out[-1]["event"] == "MIGRATION" and out[-1]["data"]["status"] in END):
        out.append(dict(await asyncio.wait_for(listener.get(), timeout)))
    return out


async def migrate_with_async_clients(src, dst, port: int) -> tuple[dict, list[dict], list[dict]]:
    s, d = QMPClient("src"), QMPClient("dst")
    await s.connect(qmp_address(src.qmp_addr))
    await d.connect(qmp_address(dst.qmp_addr))
    try:
        assert s.greeting is not None and s.greeting.QMP.version["qemu"]["major"] == 7
        for client in (s, d):
            await client.execute("migrate-set-capabilities", EVENTS_ON)
        await s.execute("migrate-set-parameters", {"max-bandwidth": 256 << 20, "downtime-limit": 300})
        params = await s.execute("query-migrate-parameters")
        assert params["max-bandwidth"] == 256 << 20 and params["downtime-limit"] == 300
        assert await s.execute("query-migrate") == {}
        with s.listener() as src_listener, d.listener() as dst_listener:
            await s.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            src_events = await events_until_end(src_listener, 60)
            dst_events = await events_until_end(dst_listener, 30)
        return await s.execute("query-migrate"), src_events, dst_events
    finally:
        await s.disconnect()
        await d.disconnect()


def test_async_client_runs_a_migration_and_gets_its_events_in_order(hosts, tmp_path, port):
    src = hosts.start("src", *TOUCH)
    dst = hosts.start("dst", *TOUCH, "--incoming", f"tcp:127.0.0.1:{port}")
    printer = EventPrinter(src)  # `livemig events` on the source's PUB socket
    try:
        info, src_events, dst_events = asyncio.run(migrate_with_async_clients(src, dst, port))
        wait_for(lambda: any(e["data"].get("status") in END for e in printer.read(0.2)), 10, "PUB end")
        pub = printer.lines
    finally:
        printer.close()

    assert info["status"] == "completed", info
    # QEMU's order: setup, pass 1, active, passes, STOP, the final pass, completed.
    assert re.fullmatch(r"MIGRATION:setup MIGRATION_PASS MIGRATION:active (MIGRATION_PASS )*"
                        r"STOP MIGRATION_PASS MIGRATION:completed", tokens(src_events)), tokens(src_events)
    passes = [e["data"]["pass"] for e in src_events if e["event"] == "MIGRATION_PASS"]
    assert passes == list(range(1, len(passes) + 1)) and passes[-1] == info["ram"]["dirty-sync-count"]
    # The destination resumes the guest before it reports completed.
    assert tokens(dst_events) == "MIGRATION:active RESUME MIGRATION:completed"
    stamps = [(e["timestamp"]["seconds"], e["timestamp"]["microseconds"]) for e in src_events]
    assert stamps == sorted(stamps) and all(0 <= us < 1_000_000 for _, us in stamps)
    assert all("data" not in e for e in src_events if e["event"] == "STOP")

    # The PUB socket carried the same events, in the same order, under their topics.
    first = next(i for i, e in enumerate(pub) if e["event"] == "MIGRATION")
    pub = pub[first:first + len(src_events)]
    assert [(e["event"], e["data"] or None) for e in pub] == \
        [(e["event"], e.get("data")) for e in src_events]
    assert all(e["topic"] == ev.topic(e["event"]).decode() and e["host"] == src.name for e in pub)

    # pmemsave: the whole RAM and an unaligned slice equal a replay of the guest's steps.
    dst.wait_status("running", 30)
    dst.cmd("stop")
    steps = [r["step"] for r in dst.cmd("x-query-vcpus")]
    expected = replayed_ram(dst, steps)
    whole, part = tmp_path / "whole.ram", tmp_path / "part.ram"
    dst.cmd("pmemsave", val=0, size=expected.size, filename=str(whole))
    dst.cmd("pmemsave", val=12345, size=3 * 4096 + 7, filename=str(part))
    assert np.array_equal(np.fromfile(whole, np.uint8), expected)
    assert part.read_bytes() == expected[12345:12345 + 3 * 4096 + 7].tobytes()
    with pytest.raises(RuntimeError, match="outside guest RAM"):
        dst.cmd("pmemsave", val=expected.size - 10, size=11, filename=str(part))


BAD_ARGUMENTS = [
    ("migrate", {"uri": 5}, "Invalid parameter type for 'uri', expected: string"),
    ("migrate", {}, "Parameter 'uri' is missing"),
    ("migrate", {"uri": "tcp:127.0.0.1:1", "speed": 1}, "Parameter 'speed' is unexpected"),
    ("migrate", {"uri": "tcp:127.0.0.1:1", "blk": "yes"}, "Invalid parameter type for 'blk', expected: boolean"),
    ("migrate", {"uri": "nowhere:1"}, "unsupported migration URI"),
    ("migrate-set-parameters", {"max-bandwidth": 1, "downtime-limit": "x"},
     "Invalid parameter type for 'downtime-limit', expected: integer"),
    ("migrate-set-parameters", {"max-bandwidth": 1, "no-such": 1}, "Parameter 'no-such' is unexpected"),
    # one of QEMU 7.2's that livemig lacks, and one 7.2 lacks too (8.2 has it)
    ("migrate-set-parameters", {"compress-threads": 4}, "Parameter 'compress-threads' is not supported by livemig"),
    ("migrate-set-parameters", {"avail-switchover-bandwidth": 1}, "Parameter 'avail-switchover-bandwidth' is unexpected"),
    ("migrate-set-parameters", {"downtime-limit": 2_000_001}, "in the range of 0 to 2000000"),
    ("migrate-set-parameters", {"max-bandwidth": -1}, "expects a non-negative integer"),
    # a refused x-fault names the points and actions there are (tests/test_wedge.py: the rest)
    ("migrate-set-parameters", {"x-fault": "pass:kil"},
     "no action 'kil' (actions: fail, kill, stall, reset, slow, cancel)"),
    ("migrate-set-parameters", {"x-fault": "nowhere:fail"}, "no fault point 'nowhere' (points: "
     "connect, setup, pass, block-bulk, before-stop, after-stop, after-eof, after-go, incoming, after-shut)"),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True},
                                                   {"capability": "xbzrle2", "state": True}]},
     "'capabilities[1].capability' does not accept value 'xbzrle2'"),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "compress", "state": False}]},
     "Capability 'compress' is not supported by livemig"),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "events"}]},
     "Parameter 'capabilities[0].state' is missing"),
    ("migrate-set-capabilities", {"capabilities": {"events": True}},
     "Invalid parameter type for 'capabilities', expected: array"),
    ("migrate-continue", {"state": "bogus"}, "Parameter 'state' does not accept value 'bogus'"),
    ("migrate-continue", {"state": "pre-switchover"}, "Migration not in expected state: none"),
    ("pmemsave", {"val": 0, "size": "1", "filename": "/dev/null"},
     "Invalid parameter type for 'size', expected: integer"),
    ("human-monitor-command", {}, "Parameter 'command-line' is missing"),
    ("query-status", {"verbose": True}, "Parameter 'verbose' is unexpected"),
]


QMP_SHELL = os.path.join(os.path.dirname(sys.executable), "qmp-shell")  # qemu.qmp's script


def qmp_shell(address: str, lines: list[str], *flags: str) -> list[str]:
    """Run qemu.qmp's qmp-shell on a host's monitor with LINES typed in; its
    output split at each prompt (the first part is the banner)."""
    out = subprocess.run([QMP_SHELL, *flags, address], input="\n".join(lines) + "\n",
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr, out
    return [part.strip() for part in out.stdout.split("(QEMU) ")]


def test_qmp_shell_drives_a_host_unchanged(hosts, tmp_path):
    """QEMU's own shell, as shipped with qemu.qmp: banner, commands in its
    key=value syntax, errors, a migration, and its HMP mode."""
    host = hosts.start("shell", *guest_args(ram="16M"))
    address = qmp_address(host.qmp_addr)
    image = tmp_path / "guest.mig"
    replies = qmp_shell(address, [
        "query-version", "migrate-set-parameters downtime-limit=250 max-bandwidth=0",
        'migrate-set-capabilities capabilities=[{"capability":"compress","state":true}]',
        "query-no-such", f"migrate uri=file:{image}"])
    assert replies[0].splitlines() == ["Welcome to the QMP low-level shell!", "Connected to QEMU 7.2.0"]
    version, params, compress, unknown, migrate = (json.loads(r) for r in replies[1:6])
    assert version == {"return": {"qemu": {"major": 7, "minor": 2, "micro": 0},
                                  "package": f"livemig {metadata.version('livemig')}"}}
    assert params == {"return": {}} == migrate
    assert compress["error"]["desc"] == "Capability 'compress' is not supported by livemig"
    assert unknown["error"]["class"] == "CommandNotFound"
    assert host.wait_migration(60)["status"] == "completed" and image.stat().st_size > 16 << 20
    assert host.cmd("query-migrate-parameters")["downtime-limit"] == 250

    replies = qmp_shell(address, ["info status", "migrate_set_speed 1", "info migrate_parameters"], "-H")
    assert replies[0].splitlines() == ["Welcome to the HMP shell!", "Connected to QEMU 7.2.0"]
    assert replies[1] == "VM status: paused (postmigrate)"
    assert replies[2] == "unknown command: 'migrate_set_speed'"
    assert "downtime-limit: 250 ms" in replies[3].splitlines()


def test_negotiation_errors_parameters_and_seed_era_commands(hosts, tmp_path):
    tcp_port = free_port()
    sock = tmp_path / "mon.sock"
    hosts.start("mon", *guest_args(ram="16M"), "--qmp", f"unix:{sock}", "--qmp", f"tcp::{tcp_port}")
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert qmp_greets(("127.0.0.2", tcp_port))  # `tcp::PORT` means every address, as in QEMU
    raw = RawQmp(f"tcp:127.0.0.1:{tcp_port}", negotiate=False)
    try:
        assert raw.greeting == {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
                                                    "package": f"livemig {metadata.version('livemig')}"},
                                        "capabilities": []}}
        assert raw.cmd({"execute": "query-status", "id": "early"}) == {"error": {
            "class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"},
            "id": "early"}
        assert raw.cmd({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": 1})["error"] == {
            "class": "GenericError", "desc": "Capability 'oob' not available"}
        any_id = {"any": ["json", 1, None]}  # echoed verbatim
        assert raw.cmd({"execute": "qmp_capabilities", "id": any_id}) == {"return": {}, "id": any_id}
        assert raw.cmd({"execute": "qmp_capabilities", "id": 2})["error"]["class"] == "CommandNotFound"
        assert raw.cmd({"execute": "no-such-command", "id": 3}) == {"error": {
            "class": "CommandNotFound", "desc": "The command no-such-command has not been found"}, "id": 3}
    finally:
        raw.close()

    mon = QEMUMonitorProtocol(str(sock))
    mon.connect()
    try:
        names = {c["name"] for c in mon.cmd("query-commands")}
        assert {"qmp_capabilities", "query-version", "query-commands", "query-status", "stop", "cont",
                "quit", "migrate", "migrate-incoming", "migrate_cancel", "migrate-continue",
                "query-migrate", "migrate-set-parameters", "query-migrate-parameters",
                "migrate-set-capabilities", "query-migrate-capabilities", "query-block", "pmemsave",
                "human-monitor-command", "device_add", "device_del"} <= names
        assert not {"migrate_set_speed", "migrate_set_downtime"} & names  # gone in QEMU 6.0
        assert mon.cmd("query-version")["qemu"] == {"major": 7, "minor": 2, "micro": 0}
        assert mon.cmd("query-migrate") == {}
        assert mon.cmd("query-block") == []

        # Parameters and capabilities: set, read back; a bad request changes nothing.
        mon.cmd("migrate-set-parameters", **{"max-bandwidth": 10 << 20, "downtime-limit": 50})
        before = mon.cmd("query-migrate-parameters")
        assert before["max-bandwidth"] == 10 << 20 and before["downtime-limit"] == 50
        caps = {"events": True, "pause-before-switchover": True}
        mon.cmd("migrate-set-capabilities", capabilities=[{"capability": k, "state": v} for k, v in caps.items()])
        caps_before = {c["capability"]: c["state"] for c in mon.cmd("query-migrate-capabilities")}
        assert {"events", "return-path", "pause-before-switchover"} <= set(caps_before)
        assert caps_before["events"] and caps_before["pause-before-switchover"]
        for name, args, desc in BAD_ARGUMENTS:
            reply = mon.cmd_obj({"execute": name, "arguments": args, "id": name})
            assert reply["id"] == name and reply["error"]["class"] == "GenericError", reply
            assert desc in reply["error"]["desc"], (name, args, reply)
        assert mon.cmd("query-migrate-parameters") == before
        assert {c["capability"]: c["state"] for c in mon.cmd("query-migrate-capabilities")} == caps_before
        assert mon.cmd_raw("device_del", {"id": "nope"})["error"] == {
            "class": "DeviceNotFound", "desc": "Device 'nope' not found"}

        # Seed era: migrate_set_speed and migrate_set_downtime are gone, as in QEMU 7.2; an idle cancel.
        assert mon.cmd_raw("migrate_set_speed", {"value": 1})["error"] == {
            "class": "CommandNotFound", "desc": "The command migrate_set_speed has not been found"}
        assert mon.cmd("migrate_cancel") == {} and mon.cmd("migrate_cancel") == {}
        assert mon.cmd("query-migrate") == {}

        # Run state, with STOP and RESUME events.
        mon.clear_events()
        mon.cmd("stop")
        assert mon.cmd("query-status") == {"running": False, "singlestep": False, "status": "paused"}
        mon.cmd("cont")
        assert mon.cmd("query-status")["status"] == "running"
        got = [mon.pull_event(wait=10.0)["event"], mon.pull_event(wait=10.0)["event"]]
        assert got == ["STOP", "RESUME"]
    finally:
        mon.close()


def test_bad_input_never_hurts_the_monitor_or_other_clients(hosts):
    host = hosts.start("mon", *guest_args(ram="16M"))
    good = QEMUMonitorProtocol(qmp_address(host.qmp_addr))
    good.connect()
    raw = RawQmp(host.qmp_addr)
    try:
        # Invalid JSON: an error without id; the next command is served.
        assert raw.cmd(b'{"execute": }')["error"]["class"] == "GenericError"
        assert raw.cmd(b'{"execute":"query-status","id":1}')["return"]["status"] == "running"
        for bad, desc in [(b"[1, 2]", "QMP input must be a JSON object"),
                          (b'{"execute": 1, "id": 5}', "QMP input member 'execute' must be a string"),
                          (b'{"id": 6}', "QMP input lacks member 'execute'"),
                          (b'{"execute": "query-status", "arguments": [], "id": 7}', "must be an object"),
                          (b'{"execute": "query-status", "extra": 1, "id": 8}', "'extra' is unexpected"),
                          (b'{"execute": "query-status", "arguments": {"x": 99999999999999999999999}, "id": 9}',
                           "Parameter 'x' is unexpected")]:
            reply = raw.cmd(bad)
            assert desc in reply["error"]["desc"], reply
        # Nesting beyond the limit, then a control character to resynchronise.
        assert "nesting" in raw.cmd(b"[" * 5000)["error"]["desc"]
        assert raw.cmd(b'\x00{"execute":"query-status","id":"after"}')["id"] == "after"
        raw.close()

        # 10 MB of garbage while another client keeps being served.
        flood = RawQmp(host.qmp_addr)
        garbage = np.random.default_rng(1).integers(0, 256, 10 << 20, dtype=np.uint8).tobytes()
        sender = threading.Thread(target=send_quietly, args=(flood.sock, garbage + b'\x00{"execute":"query-status","id":"end"}'))
        sender.start()
        latencies = []
        while sender.is_alive():
            t = time.monotonic()
            assert good.cmd("query-status")["status"] == "running"
            latencies.append(time.monotonic() - t)
        sender.join(60)
        assert max(latencies) < 5, latencies
        try:  # either every error and then the answer, or a closed connection
            while (msg := flood.reply()).get("id") != "end":
                assert msg["error"]["class"] == "GenericError"
        except (EOFError, ConnectionError):
            pass
        flood.close()

        # Abrupt disconnects: mid-message, right after a command, before the greeting.
        half = RawQmp(host.qmp_addr)
        half.send(b'{"execute": "query-sta')
        half.close()
        reset = RawQmp(host.qmp_addr)
        reset.send(b'{"execute": "query-migrate"}')
        reset.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
        reset.close()
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(qmp_address(host.qmp_addr))
        assert good.cmd("query-status")["status"] == "running"
        assert RawQmp(host.qmp_addr).cmd({"execute": "query-version"})["return"]["qemu"]["major"] == 7
    finally:
        good.close()
    assert host.alive()


def send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # the monitor may hang up on a flood: that is allowed


def test_a_client_that_never_reads_blocks_nothing(hosts, tmp_path):
    host = hosts.start("src", *guest_args(ram="32M", workload="memtouch:rate=4M,wss=8M"))
    mon = QEMUMonitorProtocol(qmp_address(host.qmp_addr))
    mon.connect()
    stuck = RawQmp(host.qmp_addr)
    try:
        mon.cmd("migrate-set-capabilities", **EVENTS_ON)
        # Replies it never reads, until the socket is full and the monitor's writes to it stall.
        query = b'{"execute": "query-commands"}'
        send_quietly(stuck.sock, query * 400)
        wait_for(lambda: unread_bytes(stuck.sock) > 30_000, 10, "a full socket")
        time.sleep(0.3)
        unread = unread_bytes(stuck.sock)
        # Meanwhile a migration runs to its end, its events queued for the stuck client too.
        mon.clear_events()
        mon.cmd("migrate", uri=f"file:{tmp_path / 'guest.mig'}")
        names = tokens(migration_events(mon, 60))
        assert names.startswith("MIGRATION:setup") and names.endswith("STOP MIGRATION_PASS MIGRATION:completed")
        assert unread_bytes(stuck.sock) == unread  # nothing more reached it: its writer was stalled
        # More than its queue holds: the monitor hangs up on it, and nobody else notices.
        send_quietly(stuck.sock, query * 3000)
        wait_for(lambda: hung_up(stuck.sock), 30, "the monitor to hang up")
        with pytest.raises((EOFError, ConnectionError)):
            while True:
                stuck.recv()
        assert mon.cmd("query-status")["status"] == "postmigrate"
    finally:
        stuck.close()
        mon.close()
    assert host.alive()


def hung_up(sock: socket.socket) -> bool:
    """Whether the peer closed the connection, without reading what it left unread."""
    poller = select.poll()
    poller.register(sock, select.POLLHUP)
    return any(mask & select.POLLHUP for _, mask in poller.poll(0))


def unread_bytes(sock: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def test_cancel_refused_second_migrate_and_pause_before_switchover(hosts, tmp_path):
    host = hosts.start("src", *guest_args(ram="64M", workload="memtouch:rate=4M,wss=8M"))
    mon = QEMUMonitorProtocol(qmp_address(host.qmp_addr))
    mon.connect()
    target = f"file:{tmp_path / 'guest.mig'}"
    try:
        mon.cmd("migrate-set-capabilities", **EVENTS_ON)
        # A slow migration: refused while it runs, then cancelled.
        mon.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 20})
        mon.cmd("migrate", uri=target)
        wait_for(lambda: mon.cmd("query-migrate")["status"] == "active", 20, "active")
        reply = mon.cmd_raw("migrate", {"uri": target})
        assert reply["error"] == {"class": "GenericError", "desc": "migration already in progress"}
        reply = mon.cmd_raw("migrate-set-capabilities", EVENTS_ON)
        assert reply["error"]["desc"] == "There's a migration process in progress"
        mon.cmd("migrate_cancel")
        assert tokens(migration_events(mon)).endswith("MIGRATION:cancelling MIGRATION:cancelled")
        assert mon.cmd("query-migrate")["status"] == "cancelled"
        wait_for(lambda: mon.cmd("query-status")["status"] == "running", 30, "the guest to run on")

        # pause-before-switchover: the guest stops, the migration waits for migrate-continue.
        mon.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
        mon.cmd("migrate-set-capabilities", capabilities=[{"capability": "pause-before-switchover",
                                                           "state": True}])
        for outcome in ("cancelled", "completed"):
            mon.clear_events()
            mon.cmd("migrate", uri=target)
            wait_for(lambda: mon.cmd("query-migrate")["status"] == "pre-switchover", 30, "pre-switchover")
            assert mon.cmd("query-status")["status"] == "finish-migrate"
            time.sleep(0.3)
            assert mon.cmd("query-migrate")["status"] == "pre-switchover"  # it does wait
            reply = mon.cmd_raw("migrate-continue", {"state": "active"})
            assert reply["error"]["desc"] == "Migration not in expected state: pre-switchover"
            if outcome == "cancelled":
                mon.cmd("migrate_cancel")
            else:
                mon.cmd("migrate-continue", state="pre-switchover")
            statuses = [e["data"]["status"] for e in migration_events(mon) if e["event"] == "MIGRATION"]
            expected = ["setup", "active", "pre-switchover"]
            expected += ["cancelling", "cancelled"] if outcome == "cancelled" else ["device", "completed"]
            assert statuses == expected
            assert mon.cmd("query-migrate")["status"] == outcome
            runstate = "running" if outcome == "cancelled" else "postmigrate"
            wait_for(lambda s=runstate: mon.cmd("query-status")["status"] == s, 30, runstate)
        assert (tmp_path / "guest.mig").read_bytes()[:8] == b"QEVM\0\0\0\3"
    finally:
        mon.close()


def test_migration_status_transitions_are_guarded():
    M = MigrationStatus
    path = [M.NONE, M.SETUP, M.ACTIVE, M.PRE_SWITCHOVER, M.DEVICE, M.COMPLETED]
    for old, new in zip(path, path[1:], strict=False):
        check_migration_transition(old, new)
    check_migration_transition(M.FAILED, M.FAILED)  # reported twice: harmless
    for old, new in ((M.COMPLETED, M.ACTIVE), (M.CANCELLED, M.FAILED), (M.NONE, M.COMPLETED),
                     (M.CANCELLING, M.ACTIVE)):
        with pytest.raises(StateError, match=f"from {old.value} to {new.value}"):
            check_migration_transition(old, new)
    assert {s for s in M if s.ended} == MIGRATION_END == {"completed", "failed", "cancelled"}
