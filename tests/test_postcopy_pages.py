"""Post-copy's page flow without the actors: a source Pusher, a destination
IncomingPages with a real vCPU child process faulting on missing pages, the
page records and page requests on real sockets. The destination RAM must end
equal to the source's, every page placed exactly once."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time

import numpy as np
import pytest

from livemig.actors.postcopy import IncomingPages, Pusher
from livemig.machine.ram import PAGE_SIZE, GuestRam, fill_ram
from livemig.machine.userfaultfd import register_and_send
from livemig.protocol import postcopy, returnpath, savevm
from livemig.protocol.ram import RAM_VERSION, PageEncoder, ram_eos

BLOCKS = [("pc.ram", 8 << 20), ("extra", 1 << 20)]


@pytest.fixture
def rams(tmp_path):
    src = GuestRam(str(tmp_path / "src.ram"), BLOCKS, create=True)
    fill_ram(src.bytes, "half", 3)
    dst = GuestRam(f"/dev/shm/livemig-pc-test-{os.getpid()}.ram", BLOCKS, create=True)
    yield src, dst
    src.close()
    os.unlink(dst.path)
    dst.close()


def _vcpu(path: str, sock_path: str, touch: list[int], out: socket.socket) -> None:
    ram = GuestRam(path, BLOCKS)
    uffd = register_and_send(sock_path, ram.bytes.ctypes.data, ram.size, "vcpu0")
    out.recv(1)
    lat = []
    for page in touch:
        t0 = time.perf_counter_ns()
        digest = hashlib.blake2b(ram.pages[page], digest_size=16).digest()
        lat.append(time.perf_counter_ns() - t0)
        out.sendall(struct.pack("<IQ", page, lat[-1]) + digest)
    uffd.close()


def _source(src: GuestRam, dirty: np.ndarray, data: socket.socket, rp: socket.socket, stats: dict) -> None:
    pusher = Pusher(dirty, src.blocks)
    requests = returnpath.PageRequests({b.name: b.size for b in src.blocks})

    def read_rp() -> None:
        buf = b""
        while True:
            got = rp.recv(65536)
            if not got:
                return
            buf += got
            while len(buf) >= 4:
                mtype, n = struct.unpack_from(">HH", buf)
                if len(buf) < 4 + n:
                    break
                pusher.request(requests.parse(mtype, buf[4:4 + n]))
                buf = buf[4 + n:]

    threading.Thread(target=read_rp, daemon=True).start()
    enc = PageEncoder(64)
    while True:
        pusher.wait_request(0.002)  # a slow background push: 64 pages per 2 ms
        batch = pusher.next_batch(64)
        if batch is None:
            break
        block, idx, _ = batch
        pages = src.block_pages(block)
        zero = ~pages[idx].any(axis=1)
        enc.new_section()
        out = [savevm.section_part(savevm.SECTION_PART, 2)]
        out += [bytes(item) for item in enc.encode(block.name, idx, pages, zero)]
        out += [ram_eos(), savevm.footer(2)]
        data.sendall(b"".join(out))
    data.shutdown(socket.SHUT_WR)
    stats.update(requests=pusher.requests, asked=pusher.requested_pages, background=pusher.background_pages)


def test_vcpu_faults_pull_pages_and_all_arrive_once(rams, tmp_path):
    src, dst = rams
    npages = src.pages.shape[0]
    # Pre-copy moved the first quarter; then the source dirtied some of it again.
    dst.pages[: npages // 4] = src.pages[: npages // 4]
    dirty = np.ones(npages, np.bool_)
    dirty[: npages // 4] = False
    again = np.arange(0, npages // 4, 7)
    dirty[again] = True
    for b in dst.blocks:  # the discards: those pages become holes again
        pages = np.zeros(b.pages, np.bool_)
        pages[:] = dirty[b.first_page:b.first_page + b.pages] & (np.arange(b.pages) + b.first_page < npages // 4)
        for cmd in postcopy.discard_pages(b.name, pages):
            for start, length in postcopy.parse_discard(cmd[5:]).ranges:
                dst.map.madvise(0x9, b.first_page * PAGE_SIZE + start, length)  # MADV_REMOVE
    rng = np.random.default_rng(1)
    touch = [int(p) for p in rng.choice(npages, 300, replace=False)] + [int(p) for p in again[:20]]

    data_s, data_d = socket.socketpair()
    rp_d, rp_s = socket.socketpair()
    rp_lock = threading.Lock()

    def send(msg: bytes) -> None:
        with rp_lock:
            rp_d.sendall(msg)

    incoming = IncomingPages(dst, str(tmp_path / "uffd.sock"), send)
    ctl_p, ctl_c = socket.socketpair()
    pid = 0
    try:
        def register(name: str, path: str) -> None:
            nonlocal pid
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the vCPU
                code = 0
                try:
                    _vcpu(dst.path, path, touch, ctl_c)
                except BaseException:
                    code = 1
                os._exit(code)

        incoming.collect(["vcpu0"], register)
        assert incoming.placer.missing() == int(dirty.sum())
        incoming.start()
        stats: dict = {}
        source = threading.Thread(target=_source, args=(src, dirty, data_s, rp_s, stats), daemon=True)
        source.start()
        ctl_p.sendall(b"g")
        loader = postcopy.PostcopyRamLoader({b.name: b.pages for b in dst.blocks},
                                            incoming.place, incoming.place_zero)
        reader = savevm.BufferedReader(data_d.recv_into, 1 << 20)
        while True:
            try:
                kind = reader.u8()
            except savevm.StreamError:
                break
            assert kind == savevm.SECTION_PART and reader.be32() == 2
            loader.load(reader, RAM_VERSION)
            assert reader.u8() == savevm.SECTION_FOOTER and reader.be32() == 2
        source.join(30)
        ctl_p.settimeout(30)
        got = b""
        while len(got) < 28 * len(touch):
            chunk = ctl_p.recv(65536)
            assert chunk, "the vCPU died"
            got += chunk
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert status == 0
        for i, page in enumerate(touch):
            p, _, digest = struct.unpack_from("<IQ16s", got, 28 * i)
            assert p == page and digest == hashlib.blake2b(src.pages[page], digest_size=16).digest()
        s = incoming.stats()
        assert s["placed-twice"] == 0 and s["missing"] == 0
        assert s["placed"] == int(dirty.sum())  # each page the destination lacked, once
        assert 0 < stats["requests"] <= s["postcopy-requests"]  # the last may cross the end
        assert stats["asked"] + stats["background"] == int(dirty.sum())
        assert np.array_equal(dst.pages, src.pages)
        assert incoming.received.all()
        print(f"\n{s['postcopy-requests']} requests, fault latency {s.get('fault-latency')}, "
              f"blocktime {s['postcopy-vcpu-blocktime']} ms")
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        incoming.close()
        for sock in (data_s, data_d, rp_d, rp_s, ctl_p, ctl_c):
            sock.close()
