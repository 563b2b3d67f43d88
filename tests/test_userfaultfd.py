"""userfaultfd for real: a child process registers its own mapping of shared
RAM, hands its uffd over SCM_RIGHTS, touches missing pages and blocks; this
process serves them and the child must read the right bytes."""

from __future__ import annotations

import hashlib
import mmap
import os
import select
import socket
import struct
import time

import numpy as np
import pytest

from livemig.machine.userfaultfd import (
    PAGE_SIZE,
    PageExists,
    Placer,
    Userfaultfd,
    recv_uffd,
    send_uffd,
)

NPAGES = 256


def _content(page: int) -> bytes:
    return hashlib.blake2b(struct.pack("<Q", page), digest_size=64).digest() * (PAGE_SIZE // 64)


def _child(memfd: int, sock: socket.socket, order: list[int]) -> None:
    """Register our own mapping, send the uffd, touch pages; report digest and latency per page."""
    ram = mmap.mmap(memfd, NPAGES * PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    view = np.frombuffer(ram, np.uint8)
    uffd = Userfaultfd.create()
    uffd.register(view.ctypes.data, NPAGES * PAGE_SIZE)
    send_uffd(sock, uffd, view.ctypes.data, NPAGES * PAGE_SIZE, "vcpu0")
    sock.recv(1)  # the server is ready
    out = []
    for page in order:
        t0 = time.perf_counter_ns()
        first = int(view[page * PAGE_SIZE])  # blocks until served
        dt = time.perf_counter_ns() - t0
        digest = hashlib.blake2b(view[page * PAGE_SIZE:(page + 1) * PAGE_SIZE], digest_size=16).digest()
        out.append(struct.pack("<IQB", page, dt, first) + digest)
    sock.sendall(b"".join(out))


@pytest.fixture
def memfd():
    fd = os.memfd_create("livemig-uffd-test")
    os.ftruncate(fd, NPAGES * PAGE_SIZE)
    yield fd
    os.close(fd)


def _fork_child(memfd: int, order: list[int]) -> tuple[int, socket.socket]:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        parent.close()
        code = 0
        try:
            _child(memfd, child, order)
        except BaseException:
            code = 1
        os._exit(code)
    child.close()
    parent.settimeout(20)
    return pid, parent


def _serve_until_reported(placer: Placer, socks: list[socket.socket], n: int, served: list[int]) -> list[bytes]:
    """Serve faults until every child has sent its n-byte report. Serving goes
    on after the last new page: a second child's fault on a page the first
    one got placed is only woken once its message is read."""
    raws = [b""] * len(socks)
    deadline = time.monotonic() + 20
    while any(len(r) < n for r in raws):
        assert time.monotonic() < deadline, f"children reported {[len(r) for r in raws]} of {n} bytes"
        for page in placer.poll(0.05):
            assert placer.place(page, _content(page)) == 1
            served.append(page)
        for k, sock in enumerate(socks):
            while len(raws[k]) < n and select.select([sock], [], [], 0)[0]:
                got = sock.recv(n - len(raws[k]))
                assert got, f"child closed after {len(raws[k])} of {n} bytes"
                raws[k] += got
    return raws


@pytest.mark.parametrize("children", [1, 2])
def test_child_faults_are_served_from_another_process(memfd, children):
    # Pages 0..15 are present before the children run (pre-copy loaded them);
    # each then touches pages in a scattered order, some twice. Two children
    # fault on the same pages: each page is placed once and both are woken.
    rng = np.random.default_rng(7)
    order = [int(p) for p in rng.permutation(NPAGES)[:120]] + [3, 5]
    pre = os.pwrite(memfd, b"".join(_content(p) for p in range(16)), 0)
    assert pre == 16 * PAGE_SIZE
    present = np.zeros(NPAGES, np.bool_)
    present[:16] = True

    ram = mmap.mmap(memfd, NPAGES * PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    view = np.frombuffer(ram, np.uint8)
    kids = [_fork_child(memfd, order) for _ in range(children)]
    placer = Placer(view.ctypes.data, NPAGES, present)
    try:
        for _, sock in kids:
            placer.add(recv_uffd(sock))
        for _, sock in kids:
            sock.sendall(b"g")
        served: list[int] = []
        record = 4 + 8 + 1 + 16
        raws = _serve_until_reported(placer, [sock for _, sock in kids], record * len(order), served)
        latencies = []
        for k, (pid, sock) in enumerate(kids):
            _, status = os.waitpid(pid, 0)
            kids[k] = (0, sock)
            assert status == 0
            latencies += _check(raws[k], order)
        # Every missing page faulted and was placed exactly once (a second
        # process's fault on a page is either woken or never happens).
        assert sorted(served) == sorted({p for p in order if p >= 16})
        assert placer.stats.exists == 0
        assert placer.stats.placed == len(served)
        # The bytes are in the shared page cache: this process sees them too.
        for page in served[:10]:
            assert bytes(view[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]) == _content(page)
        lat = np.array(latencies) / 1e6
        print(f"\nfault latency over {len(lat)} faults, {children} process(es): p50 "
              f"{np.percentile(lat, 50):.3f} ms, p99 {np.percentile(lat, 99):.3f} ms, max {lat.max():.3f} ms")
    finally:
        for pid, sock in kids:
            if pid:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
            sock.close()
        placer.close()
        del view
        ram.close()


def _check(raw: bytes, order: list[int]) -> list[int]:
    """Each touched page read the right bytes; the latencies of first touches of missing pages."""
    record = 4 + 8 + 1 + 16
    latencies = []
    for i in range(len(order)):
        page, dt, _, digest = struct.unpack_from("<IQB16s", raw, i * record)
        assert page == order[i]
        assert digest == hashlib.blake2b(_content(page), digest_size=16).digest(), f"page {page} has wrong bytes"
        if page >= 16 and page not in order[:i]:
            latencies.append(dt)
    return latencies


def test_placing_twice_is_refused_and_zero_pages(memfd):
    ram = mmap.mmap(memfd, NPAGES * PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    view = np.frombuffer(ram, np.uint8)
    placer = Placer(view.ctypes.data, NPAGES)
    try:
        block = b"".join(_content(p) for p in range(10, 20))
        assert placer.place(10, block) == 10
        assert placer.place(12, _content(12)) == 0  # known present: skipped, not copied again
        assert placer.stats.placed == 10 and placer.stats.exists == 0
        with pytest.raises(PageExists):  # the kernel itself refuses a second placement
            placer.own.copy(view.ctypes.data + 12 * PAGE_SIZE, np.frombuffer(_content(1), np.uint8).ctypes.data,
                            PAGE_SIZE)
        assert placer.place_zero(30) and not placer.place_zero(30)
        assert os.pread(memfd, PAGE_SIZE, 30 * PAGE_SIZE) == bytes(PAGE_SIZE)
        assert os.pread(memfd, 10 * PAGE_SIZE, 10 * PAGE_SIZE) == block
        # A run with a present page in the middle places the rest around it.
        assert placer.place(18, b"".join(_content(p) for p in range(18, 24))) == 4
        assert placer.missing() == NPAGES - 15
        with pytest.raises(OSError, match="beyond RAM"):
            placer.place(NPAGES - 1, _content(0) * 2)
    finally:
        placer.close()
        del view
        ram.close()
