"""Post-copy with QEMU 7.2 as the peer (`-M none`, RAM in a shared
memory-backend-file): both directions switch to post-copy mid-way and end
with equal RAM."""

from __future__ import annotations

import time

import numpy as np

from livemig.machine.ram import fill_ram
from tests.test_qemu_interop import (  # noqa: F401 - fixtures
    RAM,
    RAM_BYTES,
    guest_ram,
    needs_qemu,
    qemu,
    qemu_ram_file,
    scratch,
    uri_for,
)

POSTCOPY = [{"capability": "postcopy-ram", "state": True}]
SLOW = 32 << 20  # bytes/s: pre-copy of 256 MiB takes 8 s, so the switch comes mid-way


def until(get, want: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while (info := get()).get("status") != want:
        assert info.get("status") not in ("failed", "cancelled", "completed"), info
        assert time.monotonic() < deadline, info
        time.sleep(0.05)
    return info


@needs_qemu
def test_qemu_to_livemig_postcopy(hosts, qemu, scratch, tmp_path):  # noqa: F811
    mem = scratch / "qemu.ram"
    data = qemu_ram_file(mem, "random")
    uri = uri_for("tcp", tmp_path)
    dst = hosts.start("dst", "--machine", "none", "--ram", RAM, "--incoming", uri)
    dst.cmd("migrate-set-capabilities", capabilities=POSTCOPY)
    src = qemu("-M", "none", "-m", RAM, "-S",
               "-object", f"memory-backend-file,id=ram,size={RAM},mem-path={mem},share=on",
               "-machine", "memory-backend=ram")
    src.cmd("migrate-set-capabilities", capabilities=POSTCOPY)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": SLOW})
    src.cmd("migrate", uri=uri)
    until(lambda: src.cmd("query-migrate"), "active", 10)
    time.sleep(1.0)
    src.cmd("migrate-start-postcopy")
    until(lambda: src.cmd("query-migrate"), "postcopy-active", 20)
    sent = src.wait_migration(120)
    assert sent["status"] == "completed", sent
    got = dst.wait_migration(60)
    assert got["status"] == "completed", got
    assert got["x-postcopy"]["placed-twice"] == 0 and got["x-postcopy"]["missing"] == 0, got
    assert np.array_equal(guest_ram(dst, scratch), data)


@needs_qemu
def test_livemig_to_qemu_postcopy(hosts, qemu, scratch, tmp_path):  # noqa: F811
    src = hosts.start("src", "--machine", "none", "--ram", RAM, "--fill", "random", "--seed", "11")
    uri = uri_for("tcp", tmp_path)
    mem = scratch / "dst.ram"
    dst = qemu("-M", "none", "-m", RAM,
               "-object", f"memory-backend-file,id=ram,size={RAM},mem-path={mem},share=on",
               "-machine", "memory-backend=ram", "-incoming", "defer")
    dst.cmd("migrate-set-capabilities", capabilities=POSTCOPY)
    dst.cmd("migrate-incoming", uri=uri)
    src.cmd("migrate-set-capabilities", capabilities=POSTCOPY)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": SLOW, "max-postcopy-bandwidth": SLOW})
    src.cmd("migrate", uri=uri)
    until(lambda: src.cmd("query-migrate"), "active", 10)
    time.sleep(1.0)
    src.cmd("migrate-start-postcopy")
    until(lambda: src.cmd("query-migrate"), "postcopy-active", 20)
    info = src.wait_migration(120)
    assert info["status"] == "completed", info
    assert dst.wait_migration(30)["status"] == "completed"
    assert dst.status() == "running"
    # QEMU's RAM is the shared file: every page it placed is there.
    expected = np.zeros(RAM_BYTES, np.uint8)
    fill_ram(expected, "random", 11)
    assert np.array_equal(np.fromfile(mem, np.uint8), expected)
    assert info["ram"]["postcopy-bytes"] > 0, info
