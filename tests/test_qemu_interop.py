"""Wire compatibility with QEMU: real qemu-system-x86_64 processes (Debian's
7.2 here) and real livemig hosts migrate to each other, both directions,
over tcp and unix, and QEMU's saved streams go through `livemig stream`.

The livemig guests use the `none` machine, which mirrors
`qemu-system-x86_64 -M none -m SIZE`: one RAM block `ram`, the sections
`timer` and `globalstate`, no vCPU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from livemig.machine.ram import fill_ram
from livemig.machine.runstate import MIGRATION_END
from livemig.tools.launch import free_port
from tests.conftest import replay_matches

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed "
                                "(scripts/test installs Debian's qemu-system-x86)")

RAM = "256M"
RAM_BYTES = 256 << 20
PAGE = 4096
FAST = 8 << 30  # QEMU's max-bandwidth on loopback: no need to wait 2 s at its 128 MiB/s default


class Qemu:
    """One qemu-system-x86_64 process driven over its own QMP socket."""

    def __init__(self, workdir: Path, tag: str, *args: str) -> None:
        self.qmp_path = str(workdir / f"qmp-{os.getpid()}-{time.monotonic_ns()}.sock")
        self.log = workdir / "qemu.log"
        cmd = [QEMU, "-nodefaults", "-display", "none", "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
               *args]
        with open(self.log, "ab") as log:
            # The tag puts QEMU (and the `sh -c` of an exec: migration) under the leftover check.
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env={**os.environ, "LIVEMIG_TEST_TAG": tag})
        from qemu.qmp.legacy import QEMUMonitorProtocol

        deadline = time.monotonic() + 30
        while not os.path.exists(self.qmp_path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited with {self.proc.returncode}: {self.log.read_text()}")
            assert time.monotonic() < deadline, "QEMU's QMP socket did not appear within 30 s"
            time.sleep(0.05)
        self.mon = QEMUMonitorProtocol(self.qmp_path)
        self.mon.connect()

    def cmd(self, name: str, **args):
        reply = self.mon.cmd_raw(name, args)
        if "error" in reply:
            raise RuntimeError(f"QEMU {name}: {reply['error']['desc']}")
        return reply["return"]

    def status(self) -> str:
        return self.cmd("query-status")["status"]

    def wait_migration(self, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while (info := self.cmd("query-migrate")).get("status") not in MIGRATION_END:
            assert time.monotonic() < deadline, f"QEMU migration still {info.get('status')} after {timeout} s"
            time.sleep(0.05)
        return info

    def save(self, path: Path) -> dict:
        """Migrate to a file the way analyze-migration.py users do."""
        self.cmd("migrate-set-parameters", **{"max-bandwidth": FAST})
        self.cmd("migrate", uri=f"exec:cat > {path}")
        return self.wait_migration()

    def kill(self) -> None:
        try:
            self.mon.close()
        except Exception:
            pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def qemu(hosts, tmp_path):
    """Start QEMUs with qemu(*args); every one is killed after the test
    (before the hosts fixture checks for leftover processes)."""
    started: list[Qemu] = []

    def start(*args: str) -> Qemu:
        q = Qemu(tmp_path, hosts.tag, *args)
        started.append(q)
        return q

    yield start
    for q in started:
        q.kill()


@pytest.fixture
def scratch():
    """Room for RAM images and saved streams (hundreds of MiB): tmpfs when there is one."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = Path(tempfile.mkdtemp(prefix="livemig-qemu-test-", dir=base))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def livemig(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", "-m", "livemig.cli.main", *args], capture_output=True, text=True,
                          timeout=120)


def uri_for(transport: str, tmp_path: Path) -> str:
    if transport == "tcp":
        return f"tcp:127.0.0.1:{free_port()}"
    return f"unix:{tmp_path}/mig-{time.monotonic_ns()}.sock"


def guest_ram(host, workdir: Path) -> np.ndarray:
    dump = workdir / "guest.ram"
    host.cmd("pmemsave", val=0, size=RAM_BYTES, filename=str(dump))
    data = np.fromfile(dump, np.uint8)
    dump.unlink()
    return data


def extract(stream: Path, out: Path) -> dict[str, Path]:
    run = livemig("stream", "extract", str(stream), "--ram", str(out), "--json")
    assert run.returncode == 0, run.stderr
    return {f["block"]: Path(f["file"]) for f in json.loads(run.stdout)["ram_files"]}


def inspect(stream: Path) -> dict:
    run = livemig("stream", "inspect", str(stream), "--json")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


# --------------------------------------------------------------------------- livemig -> QEMU


@pytest.mark.parametrize("transport, start_paused, qemu_S, expect", [
    # livemig sends "running"; a QEMU started without -S runs it (with -S it would obey -S and pause).
    ("tcp", False, False, "running"),
    # A livemig guest that never ran sends "prelaunch", which QEMU takes as is.
    ("unix", True, True, "prelaunch"),
])
@needs_qemu
def test_livemig_to_qemu_round_trip(hosts, qemu, scratch, tmp_path, transport, start_paused, qemu_S, expect):
    """livemig guest with random RAM -> QEMU -> QEMU saves to a file -> livemig
    stream extract -> byte for byte the livemig guest's RAM."""
    src = hosts.start("src", "--machine", "none", "--ram", RAM, "--fill", "random", "--seed", "11",
                      *(["-S"] if start_paused else []))
    assert src.cmd("x-query-vcpus") == []
    uri = uri_for(transport, tmp_path)
    dst = qemu("-M", "none", "-m", RAM, *(["-S"] if qemu_S else []), "-incoming", uri)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})  # unlimited: no need to pace loopback
    src.cmd("migrate", uri=uri)
    info = src.wait_migration(120)
    assert info["status"] == "completed", info
    # QEMU answered on the return path (the launcher turns livemig's return-path on, as libvirt does).
    assert "x-guest-downtime" in info, info
    assert dst.wait_migration(30)["status"] == "completed"
    assert dst.status() == expect

    stream = scratch / "qemu.stream"
    saved = dst.save(stream)
    assert saved["status"] == "completed", saved
    files = extract(stream, scratch / "ram")
    assert list(files) == ["ram"]
    expected = np.zeros(RAM_BYTES, np.uint8)
    fill_ram(expected, "random", 11)
    assert np.array_equal(guest_ram(src, scratch), expected)  # the source guest is what we think
    assert np.array_equal(np.fromfile(files["ram"], np.uint8), expected)
    # QEMU saved what it holds: exactly the sections of a `none` machine.
    sections = [(s["name"], s["version"]) for s in inspect(stream)["sections"]]
    assert sections == [("ram", 4), ("timer", 2), ("globalstate", 1)]


@needs_qemu
def test_livemig_to_qemu_with_xbzrle(hosts, qemu, scratch, tmp_path):
    """A none guest whose (local) vCPU rewrites 64 bytes per touched page
    migrates to QEMU with XBZRLE: deltas were sent, and QEMU's RAM equals
    the source's at the switchover (the source stays stopped after it)."""
    src = hosts.start("src", "--machine", "none", "--ram", RAM, "--fill", "random", "--seed", "11",
                      "--vcpus", "1", "--workload", "memtouch:rate=8M,wss=16M,bytes=64")
    uri = uri_for("tcp", tmp_path)
    dst = qemu("-M", "none", "-m", RAM, "-incoming", uri)
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "xbzrle", "state": True}])
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 64 << 20})
    src.cmd("migrate", uri=uri)
    info = src.wait_migration(120)
    assert info["status"] == "completed", info
    assert info["xbzrle-cache"]["pages"] > 0 and info["xbzrle-cache"]["bytes"] > 0, info
    assert dst.wait_migration(30)["status"] == "completed"
    stream = scratch / "qemu.stream"
    assert dst.save(stream)["status"] == "completed"
    files = extract(stream, scratch / "ram")
    assert np.array_equal(np.fromfile(files["ram"], np.uint8), guest_ram(src, scratch))


# --------------------------------------------------------------------------- QEMU -> livemig


def qemu_ram_file(path: Path, content: str) -> np.ndarray:
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, RAM_BYTES, np.uint8)
    if content == "zero-heavy":
        pages = data.reshape(-1, PAGE)
        pages[np.arange(len(pages)) % 16 != 0] = 0  # 15 of 16 pages travel as ZERO records
    data.tofile(path)
    return data


@pytest.mark.parametrize("transport, content, return_path, block", [
    ("tcp", "random", False, "ram"),
    # QEMU's return path (off by default): it sends PING, wants a PONG, then waits for SHUT.
    ("unix", "random", True, "ram"),
    # QEMU names the block after its backend's id; livemig's --ram-block follows it.
    ("tcp", "zero-heavy", False, "guestmem"),
])
@needs_qemu
def test_qemu_to_livemig(hosts, qemu, scratch, tmp_path, transport, content, return_path, block):
    mem = scratch / "qemu.ram"
    data = qemu_ram_file(mem, content)
    uri = uri_for(transport, tmp_path)
    dst = hosts.start("dst", "--machine", "none", "--ram", RAM, "--incoming", uri,
                      *(["--ram-block", block] if block != "ram" else []))
    src = qemu("-M", "none", "-m", RAM, "-S",
               "-object", f"memory-backend-file,id={block},size={RAM},mem-path={mem},share=off",
               "-machine", f"memory-backend={block}")
    if return_path:
        src.cmd("migrate-set-capabilities", capabilities=[{"capability": "return-path", "state": True}])
    src.cmd("migrate-set-parameters", **{"max-bandwidth": FAST})
    src.cmd("migrate", uri=uri)
    sent = src.wait_migration(120)
    assert sent["status"] == "completed", sent
    got = dst.wait_migration(60)
    assert got["status"] == "completed", got
    # QEMU's -S guest was in prelaunch; livemig (started without -S) does not run it.
    assert dst.cmd("query-status")["status"] == "paused"
    assert dst.cmd("x-query-host")["guest"]["blocks"] == [[block, RAM_BYTES]]
    assert np.array_equal(guest_ram(dst, scratch), data)
    zero_pages = int(np.count_nonzero(~data.reshape(-1, PAGE).any(axis=1)))
    assert got["x-ram"]["duplicate"] == sent["ram"]["duplicate"] == zero_pages  # QEMU's dst has no ram
    # QEMU sends every page once in pre-copy, zero ones as ZERO records (livemig's destination counts on it)
    assert got["x-ram"]["normal"] + got["x-ram"]["duplicate"] == RAM_BYTES // PAGE, got["x-ram"]
    if content == "zero-heavy":
        assert zero_pages == RAM_BYTES // PAGE * 15 // 16


@pytest.mark.parametrize("qemu_args, error", [
    (["-M", "pc"], "machine type received is 'pc-i440fx-7.2' and local is 'none'; a 'none' guest cannot "
                   "load that machine's sections; the first section it lacks: unknown savevm section"),
    (["-M", "none", "-device", "ipmi-bmc-sim,id=bmc0"],
     "unknown savevm section or instance 'ipmi-bmc-sim' 0 (version 1)"),
    (["-M", "none", "-icount", "shift=0"], "section 'timer' carries subsection 'timer/icount'"),
], ids=["pc", "extra-device", "icount"])
@needs_qemu
def test_unhostable_qemu_stream_refused(hosts, qemu, tmp_path, qemu_args, error):
    uri = uri_for("tcp", tmp_path)
    dst = hosts.start("dst", "--machine", "none", "--ram", RAM, "--incoming", uri)
    src = qemu(*qemu_args, "-m", RAM, "-S")
    if qemu_args[1] == "pc":
        assert "pc-i440fx-7.2" in json.dumps(src.cmd("query-machines"))  # the error text names it
    # With its return path on, QEMU learns the destination's failure instead of calling it a success.
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "return-path", "state": True}])
    src.cmd("migrate", uri=uri)
    got = dst.wait_migration(60)
    assert got["status"] == "failed", got
    assert error in got["error-desc"], got["error-desc"]
    assert dst.cmd("query-status")["status"] == "inmigrate"  # no guest started
    assert src.wait_migration(60)["status"] == "failed"


# --------------------------------------------------------------------------- livemig stream


@needs_qemu
def test_stream_tools_on_qemu_pc_stream(qemu, scratch):
    """A full PC's stream (30 device sections livemig cannot load) still
    inspects and extracts: the vmdesc trailer gives every section's size."""
    src = qemu("-M", "pc", "-m", "64M", "-S")
    stream = scratch / "pc.stream"
    assert src.save(stream)["status"] == "completed"
    info = inspect(stream)
    assert info["configuration"]["machine"].startswith("pc-i440fx-")
    names = [s["name"] for s in info["sections"]]
    assert names[0] == "ram" and names[-1] == "globalstate" and "cpu" in names and "apic" in names
    assert all(s["described"] for s in info["sections"] if s["kind"] == "full")
    timer = next(s for s in info["sections"] if s["name"] == "timer")
    assert set(timer["state"]) == {"cpu_ticks_offset", "cpu_clock_offset"}
    assert {b["name"] for b in info["ram_blocks"]} >= {"pc.ram", "pc.bios", "/rom@etc/acpi/tables"}
    files = extract(stream, scratch / "ram")
    assert files["pc.ram"].stat().st_size == 64 << 20
    assert files["/rom@etc/acpi/tables"].name == "%2From@etc%2Facpi%2Ftables"
    bios = Path("/usr/share/seabios/bios-256k.bin")
    if bios.exists():  # Debian's seabios: what QEMU loaded into pc.bios
        assert files["pc.bios"].read_bytes() == bios.read_bytes()

    # Without its trailer the same stream cannot be walked past the first unknown device.
    raw = stream.read_bytes()
    cut = scratch / "no-trailer.stream"
    cut.write_bytes(raw[:info["vmdesc_offset"]])
    run = livemig("stream", "inspect", str(cut))
    assert run.returncode != 0
    assert "cannot skip section 'cpu_common' instance 0" in run.stderr
    assert "no vmdesc trailer" in run.stderr


@needs_qemu
def test_stream_tools_on_nested_subsections(qemu, scratch):
    """QEMU's timer with icount carries a subsection inside a subsection."""
    src = qemu("-M", "none", "-m", "16M", "-S", "-icount", "shift=0")
    stream = scratch / "icount.stream"
    assert src.save(stream)["status"] == "completed"
    info = inspect(stream)
    timer = next(d for d in info["vmdesc"]["devices"] if d["name"] == "timer")
    assert timer["subsections"][0]["subsections"][0]["vmsd_name"] == "timer/icount/warp_timer"
    assert [s["name"] for s in info["sections"]] == ["ram", "timer", "globalstate"]
    assert info["sections"][-1]["state"] == "prelaunch"


def test_stream_tools_on_livemig_stream(hosts, scratch):
    """livemig's own stream (pc machine: vCPU sections, block migration of a
    drive) reads back through the same tools."""
    src = hosts.start("src", "--ram", "32M", "--fill", "half", "--seed", "3", "--vcpus", "2",
                      "--workload", "memtouch:rate=4M,wss=8M",
                      "--drive", f"file={scratch}/disk.raw,format=raw,id=disk0,size=4M")
    stream = scratch / "livemig.stream"
    src.cmd("migrate", uri=f"exec:cat > {stream}", blk=True)
    assert src.wait_migration(120)["status"] == "completed"
    info = inspect(stream)
    assert info["configuration"] == {"machine": "pc"}
    assert [c["command"] for c in info["commands"]] == []  # exec: has no return path
    sections = [(s["name"], s["instance"]) for s in info["sections"]]
    assert sections == [("block", 0), ("ram", 0), ("livemig/vcpu", 0), ("livemig/vcpu", 1),
                        ("livemig/switchover", 0), ("globalstate", 0)]
    assert info["drives"] == ["disk0"]
    regs = src.cmd("x-query-vcpus")
    assert [s["state"] for s in info["sections"] if s["name"] == "livemig/vcpu"] == regs
    files = extract(stream, scratch / "ram")
    dump = scratch / "src.ram"
    src.cmd("pmemsave", val=0, size=32 << 20, filename=str(dump))
    assert files["pc.ram"].read_bytes() == dump.read_bytes()


def test_host_none_machine_options():
    run = livemig("host", "--machine", "none", "--workload", "memtouch:rate=1M")
    assert run.returncode != 0 and "runs a workload only with --vcpus N" in run.stderr
    run = livemig("host", "--machine", "none", "--drive", "file=/nonexistent,format=raw,id=d")
    assert run.returncode != 0 and "machine 'none' has no disks" in run.stderr
    run = livemig("host", "--machine", "q35")
    assert run.returncode != 0 and "'q35' is not one of" in run.stderr


def test_none_guest_between_livemig_hosts(hosts, tmp_path, port):
    """The `none` machine between two livemig hosts: no vCPU anywhere."""
    args = ("--machine", "none", "--ram", "64M", "--fill", "random", "--seed", "7")
    src = hosts.start("src", *args)
    dst = hosts.start("dst", *args, "--incoming", f"tcp:127.0.0.1:{port}")
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert src.wait_migration(60)["status"] == "completed"
    assert dst.wait_migration(60)["status"] == "completed"
    dst.wait_status("running", 30)
    assert dst.cmd("x-query-host")["guest"]["blocks"] == [["ram", 64 << 20]]
    result = replay_matches(dst, tmp_path)  # no vCPU: the replay is the fill itself
    assert result == {"ram_equal": True, "vcpu_equal": True, "steps": []}
