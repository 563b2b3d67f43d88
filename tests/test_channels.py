"""Every channel kind keeps to x-transport-timeout, file: takes QEMU's
offset=, and `livemig stream inspect` reads every section and command a
livemig source writes (x-digest, XBZRLE, block migration, post-copy)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from livemig.protocol import savevm
from tests.conftest import guest_args, replay_matches

CAPS = ("x-digest", "xbzrle")


def livemig(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", "-m", "livemig.cli.main", *args], capture_output=True,
                          text=True, timeout=120)


def inspect(stream: Path) -> dict:
    run = livemig("stream", "inspect", str(stream), "--json")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def set_caps(host, *caps: str) -> None:
    host.cmd("migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in caps])


class RecordingProxy:
    """A TCP proxy that passes both directions through and keeps what the
    source sent, to inspect a stream that needs a return path."""

    def __init__(self, target: int, record: Path) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target = target
        self.record = record
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        self.listener.settimeout(60)
        src, _ = self.listener.accept()
        dst = socket.create_connection(("127.0.0.1", self.target), timeout=10)
        dst.settimeout(None)
        back = threading.Thread(target=self.pipe, args=(dst, src, None), daemon=True)
        back.start()
        with open(self.record, "wb") as f:
            self.pipe(src, dst, f)
        back.join(60)
        src.close()
        dst.close()

    @staticmethod
    def pipe(a: socket.socket, b: socket.socket, keep) -> None:
        try:
            while chunk := a.recv(1 << 16):
                if keep is not None:
                    keep.write(chunk)
                b.sendall(chunk)
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.thread.join(60)
        self.listener.close()


def test_inspect_reads_digest_xbzrle_and_block_streams(hosts, tmp_path):
    """An x-digest stream used to crash `stream inspect --json` (bytes are
    not JSON): the digests show as hex and equal the source's RAM's."""
    src = hosts.start("src", *guest_args(ram="32M", workload="memtouch:rate=4M,wss=8M"),
                      "--drive", f"file={tmp_path}/disk.raw,format=raw,id=disk0,size=4M")
    set_caps(src, *CAPS)
    stream = tmp_path / "digest.stream"
    src.cmd("migrate", uri=f"exec:cat > {stream}", blk=True)
    info = src.wait_migration(120)
    assert info["status"] == "completed", info
    got = inspect(stream)
    names = [s["name"] for s in got["sections"]]
    assert names == ["block", "ram", "livemig/vcpu", "livemig/switchover", "livemig/digest", "globalstate"]
    digest = next(s for s in got["sections"] if s["name"] == "livemig/digest")["state"]
    assert set(digest) == {b[0] for b in src.cmd("x-query-host")["guest"]["blocks"]}
    assert all(len(bytes.fromhex(d)) == 32 for d in digest.values())
    text = livemig("stream", "inspect", str(stream))
    assert text.returncode == 0 and "livemig/digest" in text.stdout, text.stderr


def test_inspect_reads_a_postcopy_stream_with_its_commands(hosts, tmp_path, port):
    """Post-copy needs a return path, so its stream is recorded by a proxy:
    every command it carries (the PACKAGED blob's included) is listed."""
    guest = guest_args(ram="32M", workload="memtouch:rate=16M,wss=24M")
    dst = hosts.start("dst", *guest, "--incoming", f"tcp:127.0.0.1:{port}")
    src = hosts.start("src", *guest)
    for h in (src, dst):
        set_caps(h, "postcopy-ram")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 4 << 20})
    stream = tmp_path / "postcopy.stream"
    proxy = RecordingProxy(port, stream)
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{proxy.port}")
    time.sleep(1)
    src.cmd("migrate-start-postcopy")
    assert src.wait_migration(120)["status"] == "completed"
    proxy.close()
    got = inspect(stream)
    commands = {c["name"] for c in got["commands"]}
    assert {"OPEN_RETURN_PATH", "PING", "POSTCOPY_ADVISE", "POSTCOPY_RAM_DISCARD", "PACKAGED",
            "POSTCOPY_LISTEN", "POSTCOPY_RUN"} <= commands, commands
    assert [s["name"] for s in got["sections"]] == ["ram", "livemig/vcpu", "globalstate"]


def stalled_channel(kind: str, tmp_path: Path, out: bool, keep: list[int]) -> tuple[str, tuple[str, ...], tuple]:
    """A one-way channel whose far end never reads (out) or never writes
    after the stream's first bytes: (URI, host arguments, fds to pass)."""
    if kind == "exec":
        return "exec:sleep 5", (), ()  # ends by itself before the test's end
    if kind == "file":
        fifo = tmp_path / "stall.fifo"
        os.mkfifo(fifo)
        if out:
            keep.append(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # a reader that reads nothing
        return f"file:{fifo}", (), ()
    r, w = os.pipe()
    keep += [r, w]
    fd = w if out else r
    return f"fd:{fd}", ("--fd", str(fd)), (fd,)


@pytest.mark.parametrize("kind", ["exec", "file", "fd"])
def test_a_stalled_one_way_channel_fails_the_source_in_its_timeout(hosts, tmp_path, kind):
    """x-transport-timeout did nothing on exec:, file: and fd: channels: a
    reader that takes nothing held the source for good."""
    keep: list[int] = []
    try:
        uri, extra, fds = stalled_channel(kind, tmp_path, True, keep)
        src = hosts.start("src", *guest_args(ram="16M", workload="memtouch:rate=1M,wss=2M"), *extra,
                          pass_fds=fds)
        src.cmd("migrate-set-parameters", **{"x-transport-timeout": 1000})
        start = time.monotonic()
        src.cmd("migrate", uri=uri)
        info = src.wait_migration(30)
        took = time.monotonic() - start
        assert info["status"] == "failed", info
        assert info["error-desc"] == ("write to migration channel failed: no progress for 1 s "
                                      "(x-transport-timeout)"), info
        assert took < 6, took
        assert src.cmd("query-status")["status"] == "running"
    finally:
        for fd in keep:
            os.close(fd)


@pytest.mark.parametrize("kind", ["exec", "file", "fd"])
def test_a_stalled_one_way_channel_fails_the_destination_in_its_timeout(hosts, tmp_path, kind):
    """The destination's progress deadline holds on a pipe or FIFO too: a
    source that sends a header and then nothing fails it, with the cause."""
    keep: list[int] = []
    try:
        uri, extra, fds = stalled_channel(kind, tmp_path, False, keep)
        dst = hosts.start("dst", *guest_args(ram="16M"), "--incoming", "defer", *extra, pass_fds=fds)
        dst.cmd("migrate-set-parameters", **{"x-transport-timeout": 1000})
        start = time.monotonic()
        dst.cmd("migrate-incoming", uri=uri)
        if kind == "file":
            keep.append(os.open(uri.removeprefix("file:"), os.O_WRONLY))  # opens once the destination reads
        if kind != "exec":
            os.write(keep[-1] if kind == "file" else keep[1], savevm.header())
        info = dst.wait_migration(30, states=("failed",))
        took = time.monotonic() - start
        assert "no progress for 1 s (x-transport-timeout)" in info["error-desc"], info
        assert took < 6, took
        assert dst.cmd("query-status")["status"] == "inmigrate"
    finally:
        for fd in keep:
            os.close(fd)


def test_file_offset_is_honoured_both_ways(hosts, tmp_path):
    """file:PATH,offset=N (QEMU's): the stream starts N bytes in, after
    whatever the user keeps there; an unknown option is refused."""
    path = tmp_path / "guest.mig"
    args = guest_args(ram="16M", workload="memtouch:rate=1M,wss=2M")
    src = hosts.start("src", *args)
    with pytest.raises(RuntimeError, match="unknown option 'size=4' \\(file: takes only offset=N\\)"):
        src.cmd("migrate", uri=f"file:{path},size=4")
    src.cmd("migrate", uri=f"file:{path},offset=4K")
    assert src.wait_migration(60)["status"] == "completed"
    data = path.read_bytes()
    assert data[:4096] == bytes(4096) and data[4096:4104] == savevm.header()
    with open(path, "r+b") as f:
        f.write(b"a header of the user's own".ljust(4096, b"."))
    dst = hosts.start("dst", *args, "--incoming", f"file:{path},offset=4096")
    info = dst.wait_migration(60)
    assert info["status"] == "completed", info
    dst.wait_status("running", 30)
    result = replay_matches(dst, tmp_path)
    assert result["ram_equal"] and result["vcpu_equal"]
