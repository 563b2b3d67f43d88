"""The receiver never wedges: input that used to raise past its thread (a
vmdesc nested 200,000 deep) ends as `failed` with an error-desc, the host's
memory stays near idle, and the next good migration completes."""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time

import numpy as np
import pytest

from livemig.protocol import savevm
from livemig.tools.bench.accounting import actor_pids, private_memory
from tests.conftest import guest_args, replay_matches
from tests.fuzz import floods, peak_growth, stream_head

ARGS = guest_args(ram="32M", workload="memtouch:rate=2M,wss=4M")


def with_trailer(stream: bytes, trailer: bytes) -> bytes:
    """The stream with its vmdesc replaced by `trailer` (JSON text)."""
    at = stream.rindex(b'{"page_size"') - 5
    assert stream[at] == savevm.VMDESCRIPTION
    return stream[:at] + bytes([savevm.VMDESCRIPTION]) + struct.pack(">I", len(trailer)) + trailer


def test_deep_vmdesc_fails_and_the_next_migration_completes(hosts, tmp_path, port):
    dst = hosts.start("dst", *ARGS, "--incoming", f"tcp:127.0.0.1:{port}")
    src = hosts.start("src", *ARGS)
    path = tmp_path / "good.mig"
    src.cmd("migrate", uri=f"file:{path}")
    assert src.wait_migration(60)["status"] == "completed"
    src.cmd("cont")
    receiver = actor_pids(dst.proc.pid)["receiver"]
    idle = private_memory(receiver)["private"]
    deep = with_trailer(path.read_bytes(), b"[" * 200_000 + b"]" * 200_000)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(deep)
        s.shutdown(socket.SHUT_WR)
        info = dst.wait_migration(30, states=("failed",))
    assert "vmdesc nests deeper" in info["error-desc"], info
    assert dst.cmd("query-status")["status"] == "inmigrate"
    assert private_memory(receiver)["private"] - idle < 64 << 20
    dst.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")  # accepted at once
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert src.wait_migration(60)["status"] == "completed"
    dst.wait_status("running", 30)
    result = replay_matches(dst, tmp_path)
    assert result["ram_equal"] and result["vcpu_equal"]


FLOOD_CAUSES = {"mem-size": "listed twice in the block list", "sections": "sent a second time",
                "instances": "this guest has only instance 0", "digests": "this guest has only instance 0",
                "live-sections": "started a second time", "capabilities": "lists 4000000 capabilities",
                "vmdesc": "is too large"}


def send(port: int, chunks) -> None:
    """A stream to the destination, for as long as it reads."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            for chunk in chunks:
                s.sendall(chunk)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # refused and closed mid-stream


def test_floods_fail_in_bounded_memory_and_the_next_migration_completes(hosts, tmp_path, port):
    """Each count in the stream within its field but beyond what the guest
    holds (a block list naming pc.ram 4 million times, a million sections,
    4,000 digest sections, ...): the destination fails with the cause, the
    peak and the kept private memory of its receiver and coordinator stay
    within 64 MiB of idle, and it takes the next migration at once."""
    dst = hosts.start("dst", *ARGS, "--incoming", f"tcp:127.0.0.1:{port}")
    src = hosts.start("src", *ARGS)
    path = tmp_path / "good.mig"
    src.cmd("migrate", uri=f"file:{path}")
    assert src.wait_migration(60)["status"] == "completed"
    src.cmd("cont")
    good = path.read_bytes()
    guest = dst.cmd("x-query-host")["guest"]
    block, size = guest["blocks"][0]
    body = good[:good.rindex(b'{"page_size"') - 5]
    pids = actor_pids(dst.proc.pid)
    receiving = [pids["receiver"], pids["coordinator"]]
    for name, flood in floods(stream_head(good), body, guest["machine"], block, size).items():
        idle = [private_memory(pid)["private"] for pid in receiving]
        peaks = [peak_growth(pid) for pid in receiving]
        sender = threading.Thread(target=send, args=(port, flood()))
        sender.start()
        info = dst.wait_migration(60, states=("failed",))
        sender.join(30)
        assert FLOOD_CAUSES[name] in info.get("error-desc", ""), (name, info)
        rises = [(peak(), private_memory(pid)["private"] - before)
                 for pid, before, peak in zip(receiving, idle, peaks, strict=True)]
        print(f"{name}: peak and kept rise (MiB) of receiver, coordinator:",
              [(round(p / 2**20, 1), round(k / 2**20, 1)) for p, k in rises])
        assert all(p < 64 << 20 and k < 64 << 20 for p, k in rises), (name, rises)
        dst.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")  # accepted at once
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert src.wait_migration(60)["status"] == "completed"
    dst.wait_status("running", 30)
    result = replay_matches(dst, tmp_path)
    assert result["ram_equal"] and result["vcpu_equal"]


def test_parameters_that_would_do_nothing_are_refused(hosts):
    """An x-fault with a typo ran a normal migration; x-transport-timeout 0
    made the socket non-blocking. Both are refused, and nothing changes."""
    h = hosts.start("p", *guest_args(ram="16M"))
    for value, cause in [("pass:kil", "no action 'kil'"), ("pas:kill", "no fault point 'pas'"),
                         ("pass:fail-writer", "only kill and stall name an actor"),
                         ("pass:kill-nobody", "no actor 'nobody'")]:
        with pytest.raises(RuntimeError, match=cause):
            h.cmd("migrate-set-parameters", **{"x-fault": value})
    with pytest.raises(RuntimeError, match="'x-transport-timeout' must be at least 1 ms"):
        h.cmd("migrate-set-parameters", **{"x-transport-timeout": 0})
    params = h.cmd("query-migrate-parameters")
    assert params["x-fault"] == "" and params["x-transport-timeout"] == 30_000
    h.cmd("migrate-set-parameters", **{"x-fault": "block-bulk:kill-block_sender", "x-transport-timeout": 1})
    assert h.cmd("query-migrate-parameters")["x-fault"] == "block-bulk:kill-block_sender"


@pytest.fixture
def tiny_fs(tmp_path):
    """A 2 MiB tmpfs: a disk image on it runs out of space (root only)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mnt)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_full_disk_fails_both_sides_with_the_cause(hosts, tmp_path, port, tiny_fs):
    """Block migration onto an image whose file system fills: the destination
    fails with ENOSPC and tells the source over the return path, which fails
    within a second naming it; the destination takes the next migration at
    once, which completes."""
    image = tmp_path / "src.raw"
    image.write_bytes(np.random.default_rng(1).integers(0, 256, 16 << 20, np.uint8).tobytes())
    args = guest_args(ram="16M")
    src = hosts.start("src", *args, "--drive", f"file={image},format=raw,id=disk0")
    dst = hosts.start("dst", *args, "--drive", f"file={tiny_fs}/dst.raw,format=raw,id=disk0,size=16M",
                      "--incoming", f"tcp:127.0.0.1:{port}")
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}", blk=True)
    dinfo = dst.wait_migration(30, states=("failed",))
    failed_at = time.monotonic()
    assert "No space left on device" in dinfo["error-desc"], dinfo
    info = src.wait_migration(30)
    print(f"source failed {time.monotonic() - failed_at:.3f} s after the destination: {info['error-desc']}")
    assert time.monotonic() - failed_at < 1.0, info
    assert info["status"] == "failed" and "No space left on device" in info["error-desc"], info
    assert src.cmd("query-status")["status"] == "running"
    dst.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")  # accepted at once
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")  # RAM only: the disk stays where it is
    assert src.wait_migration(60)["status"] == "completed"
    dst.wait_status("running", 30)
    result = replay_matches(dst, tmp_path)
    assert result["ram_equal"] and result["vcpu_equal"]
