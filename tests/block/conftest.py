"""Shared helpers for block-layer tests: qemu-img/qemu-io as oracles."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")

needs_qemu = pytest.mark.skipif(
    QEMU_IMG is None or QEMU_IO is None,
    reason="qemu-img/qemu-io not installed (Debian package qemu-utils); they are the oracle",
)


def run(*args: str | os.PathLike, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([os.fspath(a) for a in args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{args} failed rc={r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def qemu_img(*args: str | os.PathLike, check: bool = True) -> subprocess.CompletedProcess:
    return run("qemu-img", *args, check=check)


def qemu_io(img: str | os.PathLike, *cmds: str, fmt: str = "qcow2",
            check: bool = True) -> subprocess.CompletedProcess:
    args: list[str] = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    r = run(*args, img, check=False)
    bad = r.returncode != 0 or "failed" in r.stdout.lower() or "error" in r.stderr.lower()
    if check and bad:
        raise AssertionError(f"qemu-io {cmds} on {img}: rc={r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def check_image(img: str | os.PathLike) -> dict:
    """qemu-img check must be clean: rc 0 and no leaks/corruptions."""
    r = qemu_img("check", "--output=json", img, check=False)
    assert r.returncode == 0, f"qemu-img check rc={r.returncode}\n{r.stdout}\n{r.stderr}"
    info = json.loads(r.stdout)
    assert "leaks" not in info and "corruptions" not in info, info
    assert info.get("check-errors", 0) == 0, info
    return info


def compare_raw(img: str | os.PathLike, raw: str | os.PathLike, fmt: str = "qcow2") -> None:
    r = qemu_img("compare", "-f", fmt, "-F", "raw", img, raw, check=False)
    assert r.returncode == 0, f"qemu-img compare rc={r.returncode}: {r.stdout}{r.stderr}"


def map_extents(img: str | os.PathLike) -> list[dict]:
    return json.loads(qemu_img("map", "--output=json", img).stdout)


def assert_no_shared_host_clusters(img: str | os.PathLike, cluster_size: int) -> None:
    """No host cluster may back two guest clusters (a cross-link)."""
    seen: dict[int, int] = {}
    for ext in map_extents(img):
        if ext.get("depth", 0) != 0 or "offset" not in ext or not ext.get("data"):
            continue
        for k in range(0, ext["length"], cluster_size):
            host = (ext["offset"] + k) // cluster_size
            guest = ext["start"] + k
            assert host not in seen, f"host cluster {host} backs guest {seen[host]} and {guest}"
            seen[host] = guest


def verify_image(img: Path, expected: bytes | bytearray, cluster_size: int) -> None:
    """The full oracle: check clean, content equal, no host cluster used twice."""
    raw = img.with_suffix(".expected.raw")
    raw.write_bytes(bytes(expected))
    check_image(img)
    compare_raw(img, raw)
    assert_no_shared_host_clusters(img, cluster_size)


def qemu_create(img: str | os.PathLike, size: str | int, *opts: str, fmt: str = "qcow2",
                backing: str | None = None, backing_fmt: str | None = None) -> None:
    args: list[str] = ["create", "-q", "-f", fmt]
    if opts:
        args += ["-o", ",".join(opts)]
    if backing:
        args += ["-b", backing, "-F", backing_fmt or "qcow2"]
    qemu_img(*args, img, str(size))


def qemu_to_raw(img: str | os.PathLike, out: str | os.PathLike) -> bytes:
    qemu_img("convert", "-O", "raw", img, out)
    return Path(out).read_bytes()


PROMPT = b"qemu-io> "


class QemuIO:
    """A long-lived qemu-io that keeps its own qcow2 caches (a second opener).

    Locking is off so it can coexist with other openers, as two hosts on shared
    storage without lock coordination would.
    """

    def __init__(self, img: str | os.PathLike, *extra: str) -> None:
        self.opts = (f"driver=qcow2,file.driver=file,file.filename={os.fspath(img)},"
                     "file.locking=off")
        self.p = subprocess.Popen(["qemu-io", *extra, "--image-opts", self.opts],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        self._wait()

    def _wait(self) -> str:
        buf = b""
        while not buf.endswith(PROMPT):
            chunk = self.p.stdout.read1(4096)
            if not chunk:
                break
            buf += chunk
        return buf[:-len(PROMPT)].decode() if buf.endswith(PROMPT) else buf.decode()

    def cmd(self, line: str) -> str:
        self.p.stdin.write(line.encode() + b"\n")
        self.p.stdin.flush()
        out = self._wait()
        assert "error" not in out.lower() and "failed" not in out.lower(), out
        return out

    def quit(self) -> None:
        self.p.stdin.write(b"quit\n")
        self.p.stdin.flush()
        self.p.wait(timeout=30)


@pytest.fixture
def patterned():
    """Deterministic pseudo-random bytes: patterned(seed, n)."""
    import random

    def make(seed: int, n: int) -> bytes:
        return random.Random(seed).randbytes(n)

    return make


def digest(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def poke_incompatible(p: Path, bits: int) -> None:
    """Set qcow2 incompatible-feature bits behind the driver's back."""
    with open(p, "r+b") as f:
        f.seek(72)
        (v,) = struct.unpack(">Q", f.read(8))
        f.seek(72)
        f.write(struct.pack(">Q", v | bits))
