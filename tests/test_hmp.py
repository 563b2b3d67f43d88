"""The human monitor: its text checked line for line against a real QEMU 7.2
(the oracle) where both have the command, the seed-era commands, `migrate`
without -d holding only its own client, and the `livemig hmp` / `livemig
events` command lines."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.conftest import guest_args
from tests.qmp_util import END, EventPrinter, RawQmp, migration_events, tokens, wait_for

QEMU = shutil.which("qemu-system-x86_64")
# `info migrate` lines QEMU prints only when their value is not zero, in its order.
OPTIONAL = ["dirty pages rate", "postcopy request count", "precopy ram", "downtime ram", "postcopy ram"]


def hmp(mon: QEMUMonitorProtocol, line: str) -> str:
    return mon.cmd("human-monitor-command", **{"command-line": line})


def raw_hmp(mon: RawQmp, line: str) -> str:
    return mon.cmd({"execute": "human-monitor-command", "arguments": {"command-line": line}})["return"]


def status_of(mon: QEMUMonitorProtocol) -> str | None:
    return mon.cmd("query-migrate").get("status")


@pytest.fixture
def qemu(tmp_path):
    """A real QEMU 7.2 with no devices and 32 MiB of RAM, driven over QMP."""
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed (scripts/test installs it)")
    sock = tmp_path / "qemu.sock"
    proc = subprocess.Popen([QEMU, "-M", "none", "-m", "32", "-nodefaults", "-display", "none",
                             "-qmp", f"unix:{sock},server=on,wait=off"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(sock.exists, 30, "QEMU's QMP socket")
        mon = QEMUMonitorProtocol(str(sock))
        mon.connect()
        try:
            yield mon
        finally:
            mon.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def fields(text: str) -> list[str]:
    """`info migrate` lines, without QEMU's `globals:` block (livemig has no such knobs)."""
    lines = text.split("\r\n")
    assert lines[-1] == "", repr(text)
    lines = lines[:-1]
    if lines and lines[0] == "globals:":
        lines = lines[lines.index(next(x for x in lines if x.startswith("clear-bitmap-shift"))) + 1:]
    return lines


def assert_same_layout(ours: str, theirs: str) -> None:
    """Same labels in the same order, each value in the same format; lines QEMU prints only
    when non-zero may differ, but keep QEMU's order."""
    mine, qemu = fields(ours), fields(theirs)
    label = [line.split(":")[0] for line in mine]
    assert [x for x in label if x not in OPTIONAL] == \
        [line.split(":")[0] for line in qemu if line.split(":")[0] not in OPTIONAL], (mine, qemu)
    extra = [x for x in label if x in OPTIONAL]
    assert extra == sorted(extra, key=OPTIONAL.index)
    assert all(label.index(x) > label.index("pages-per-second") for x in extra)
    shape = {line.split(":")[0]: re.sub(r"\d+", "N", line) for line in qemu}
    for line in mine:
        if line.split(":")[0] in shape:
            assert re.sub(r"\d+", "N", line) == shape[line.split(":")[0]], line


def test_hmp_text_matches_qemu(hosts, qemu, tmp_path):
    host = hosts.start("src", *guest_args(ram="32M", workload="memtouch:rate=4M,wss=8M"))
    ours = host.qmp()
    try:
        both = (ours, qemu)
        # Before any migration, nothing but QEMU's globals.
        assert fields(hmp(ours, "info migrate")) == fields(hmp(qemu, "info migrate")) == []
        # The same lines give the same text, errors included.
        for line in ["info status", "migrate_set_parameter max-bandwidth 32",
                     "migrate_set_parameter downtime-limit 250", "migrate_set_parameter no-such 1",
                     "migrate_set_capability events on", "migrate_set_capability no-such on",
                     "migrate_set_capability events maybe", "migrate", "bogus", "info bogus",
                     "migrate_cancel", "migrate_continue pre-switchover", "migrate_continue bogus",
                     "stop", "info status", "cont", "c", "info status",
                     "migrate_incoming tcp:127.0.0.1:1"]:
            assert hmp(ours, line) == hmp(qemu, line), line
        params = [m.cmd("query-migrate-parameters") for m in both]
        for key in ("max-bandwidth", "downtime-limit"):
            assert params[0][key] == params[1][key], key
        # Every parameter and capability both have prints the same line (the launcher
        # turns return-path on, as libvirt does; QEMU's default is off).
        hmp(ours, "migrate_set_capability return-path off")
        for info in ("info migrate_parameters", "info migrate_capabilities"):
            mine, theirs = (hmp(m, info).split("\r\n") for m in both)
            common = {x.split(":")[0] for x in mine} & {x.split(":")[0] for x in theirs}
            assert {"max-bandwidth", "downtime-limit"} <= common or \
                {"events", "return-path", "pause-before-switchover"} <= common
            assert [x for x in mine if x.split(":")[0] in common] == \
                [x for x in theirs if x.split(":")[0] in common], info

        # While active: rate-limited so that it lasts.
        hmp(ours, "migrate_set_parameter max-bandwidth 2M")
        hmp(qemu, "migrate_set_parameter max-bandwidth 20k")
        hmp(ours, f"migrate -d file:{tmp_path / 'ours.mig'}")
        hmp(qemu, "migrate -d exec:cat>/dev/null")
        active = []
        for mon in both:
            wait_for(lambda m=mon: status_of(m) == "active" and "expected-downtime" in m.cmd("query-migrate"),
                     20, "active")
            active.append(hmp(mon, "info migrate"))
        assert_same_layout(*active)
        assert "expected downtime: " in active[0] and "Migration status: active" in active[0]
        for mon in both:
            hmp(mon, "migrate_cancel")
            wait_for(lambda m=mon: status_of(m) in END, 20, "cancelled")

        # Completed, at full speed.
        hmp(ours, "migrate_set_parameter max-bandwidth 0")
        hmp(qemu, "migrate_set_parameter max-bandwidth 1G")
        assert hmp(ours, f"migrate file:{tmp_path / 'ours.mig'}") == ""  # returns once it has ended
        hmp(qemu, "migrate exec:cat>/dev/null")
        wait_for(lambda: status_of(qemu) in END, 20, "QEMU's migration")
        done = [hmp(m, "info migrate") for m in both]
        assert_same_layout(*done)
        assert "Migration status: completed\r\n" in done[0] and "downtime: " in done[0]
        # The numbers are query-migrate's, in kbytes where QEMU prints kbytes.
        info, lines = ours.cmd("query-migrate"), dict(x.split(": ", 1) for x in fields(done[0]))
        assert lines["transferred ram"] == f"{info['ram']['transferred'] >> 10} kbytes"
        assert lines["total ram"] == f"{info['ram']['total'] >> 10} kbytes" == "32768 kbytes"
        assert lines["duplicate"] == f"{info['ram']['duplicate']} pages"
        assert lines["normal"] == f"{info['ram']['normal']} pages"
        assert lines["dirty sync count"] == str(info["ram"]["dirty-sync-count"])
        assert lines["downtime"] == f"{info['downtime']} ms" and lines["setup"] == f"{info['setup-time']} ms"
        assert hmp(ours, "info status") == hmp(qemu, "info status") == "VM status: paused (postmigrate)\r\n"
    finally:
        ours.close()


def test_seed_era_commands_blockers_and_the_command_lines(hosts, tmp_path):
    host = hosts.start("src", *guest_args(ram="16M"), "--device", "no-migrate,id=nm0")
    mon = host.qmp()
    try:
        # The seed's migrate_set_speed and migrate_set_downtime are gone, as in QEMU 7.2.
        for gone in ("migrate_set_speed 32m", "migrate_set_downtime 0.03"):
            assert hmp(mon, gone) == f"unknown command: '{gone.split()[0]}'\r\n"
        hmp(mon, "migrate_set_parameter max-bandwidth 8")  # a bare number is in MiB, as in QEMU
        assert mon.cmd("query-migrate-parameters")["max-bandwidth"] == 8 << 20
        assert "invalid size 'fast'" in hmp(mon, "migrate_set_parameter max-bandwidth fast")
        # QEMU 7.2's names livemig lacks are refused as such; names QEMU lacks in QEMU's words.
        assert hmp(mon, "migrate_set_capability compress on") == \
            "Error: Capability 'compress' is not supported by livemig\r\n"
        assert hmp(mon, "migrate_set_parameter compress-threads 4") == \
            "Error: Parameter 'compress-threads' is not supported by livemig\r\n"
        assert hmp(mon, "migrate_set_parameter avail-switchover-bandwidth 1") == \
            "Error: invalid parameter value: avail-switchover-bandwidth\r\n"
        hmp(mon, "migrate_set_parameter downtime-limit 123")
        assert "downtime-limit: 123 ms\r\n" in hmp(mon, "info migrate_parameters")
        hmp(mon, "migrate_set_capability pause-before-switchover on")
        assert "pause-before-switchover: on\r\n" in hmp(mon, "info migrate_capabilities")
        assert "migrate [-d] [-b] [-i] uri -- " in hmp(mon, "help migrate")
        assert "info migrate  -- show migration status\r\n" in hmp(mon, "info")

        # A device that cannot be migrated blocks migration until it is removed.
        reason = "State blocked by non-migratable device 'nm0'"
        assert hmp(mon, "info migrate") == f"Outgoing migration blocked:\r\n  {reason}\r\n"
        assert mon.cmd("query-migrate") == {"blocked-reasons": [reason]}
        assert hmp(mon, f"migrate -d file:{tmp_path / 'x.mig'}") == f"Error: {reason}\r\n"
        mon.cmd("device_del", id="nm0")
        assert mon.cmd("query-migrate") == {}
        mon.cmd("device_add", driver="no-migrate", id="nm1")
        assert mon.cmd("query-migrate")["blocked-reasons"] == [reason.replace("nm0", "nm1")]
        mon.cmd("device_del", id="nm1")

        # `livemig hmp` and `livemig events` on the command line.
        printer = EventPrinter(host)
        try:
            out = subprocess.run([sys.executable, "-P", "-m", "livemig.cli.main", "hmp", "--qmp", host.qmp_addr, "stop"],
                                 capture_output=True, timeout=60)
            assert out.returncode == 0 and out.stdout == b"", out
            out = subprocess.run([sys.executable, "-P", "-m", "livemig.cli.main", "hmp", "--qmp", host.qmp_addr,
                                  "info status"], capture_output=True, timeout=60)
            assert out.stdout.decode().splitlines() == ["VM status: paused"]
            wait_for(lambda: any(e["event"] == "STOP" for e in printer.read(0.2)), 10, "STOP line")
            stop = next(e for e in printer.lines if e["event"] == "STOP")
            assert stop["topic"] == "runstate.stop" and stop["host"] == host.name
            assert set(stop["timestamp"]) == {"seconds", "microseconds"}
            assert json.loads(json.dumps(stop)) == stop
        finally:
            printer.close()
    finally:
        mon.close()


def test_migrate_without_d_holds_only_its_own_client(hosts, tmp_path):
    host = hosts.start("src", *guest_args(ram="32M", workload="memtouch:rate=4M,wss=8M"))
    waiting, other = RawQmp(host.qmp_addr), host.qmp()  # raw: it blocks in another thread
    try:
        other.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
        # -d returns at once; a second migrate is refused while it runs; cancel ends it.
        hmp(other, "migrate_set_parameter max-bandwidth 4m")
        assert raw_hmp(waiting, f"migrate -d file:{tmp_path / 'a.mig'}") == ""
        assert status_of(other) in ("setup", "active")
        assert hmp(other, f"migrate -d file:{tmp_path / 'b.mig'}") == "Error: migration already in progress\r\n"
        assert hmp(other, "migrate_cancel") == ""
        wait_for(lambda: status_of(other) == "cancelled", 20, "cancelled")

        # Without -d the command returns only when the migration has ended; the monitor
        # serves the other client meanwhile, events included.
        hmp(other, "migrate_set_parameter max-bandwidth 16m")  # 32 MiB of random RAM: about two seconds
        other.clear_events()
        result: dict = {}

        def blocking_migrate() -> None:
            result["out"] = raw_hmp(waiting, f"migrate file:{tmp_path / 'c.mig'}")
            result["status"] = waiting.cmd({"execute": "query-migrate"})["return"]["status"]
        thread = threading.Thread(target=blocking_migrate)
        thread.start()
        try:
            wait_for(lambda: status_of(other) == "active", 20, "active")
            assert other.pull_event(wait=10.0)["data"] == {"status": "setup"}
            assert thread.is_alive()
            assert hmp(other, "info status") == "VM status: running\r\n"
            wait_for(lambda: other.cmd("query-migrate")["ram"]["transferred"] > 4 << 20, 20, "progress")
            assert thread.is_alive()
        finally:
            thread.join(90)
        assert result == {"out": "", "status": "completed"}
        assert hmp(other, "info status") == "VM status: paused (postmigrate)\r\n"
        assert tokens(migration_events(other)).endswith("STOP MIGRATION_PASS MIGRATION:completed")
    finally:
        waiting.close()
        other.close()
