"""The hot path's building blocks: page-run copies, holes of the RAM file as
zero pages, zero pages over known-zero destination RAM, and the benchmark's
process accounting. Speed is shown by `scripts/bench`, never asserted here."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
import uuid

import numpy as np
import pytest

from livemig.machine.ram import PAGE_SIZE, GuestRam
from livemig.protocol import savevm
from livemig.protocol.ram import (
    RAM_CONTINUE,
    RAM_PAGE,
    RAM_VERSION,
    RAM_ZERO,
    PageEncoder,
    PageVectors,
    RamBlock,
    RamLoader,
    copy_pages,
    ram_eos,
    ram_mem_size,
)
from livemig.protocol.transport import Channel, iovec_skip, iovec_table
from livemig.tools.bench import accounting


def ram_file(pages: int) -> GuestRam:
    path = f"/dev/shm/livemig-test-{uuid.uuid4().hex[:8]}.ram"
    ram = GuestRam(path, [("pc.ram", pages * PAGE_SIZE)], create=True)
    os.unlink(path)  # the mapping and the open descriptor keep it
    return ram


@pytest.mark.parametrize("idx", [np.arange(10, 60), np.array([3, 4, 5, 9, 10, 40]),
                                 np.arange(0, 200, 2), np.array([7, 6, 5, 5, 1])])
def test_copy_pages_both_ways(idx):
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, (256, PAGE_SIZE), np.uint8)
    gathered = np.zeros((len(idx), PAGE_SIZE), np.uint8)
    copy_pages(gathered, None, src, idx)
    assert np.array_equal(gathered, src[idx])
    scattered = np.zeros_like(src)
    expected = np.zeros_like(src)
    uniq = np.unique(idx, return_index=True)[1]  # duplicates: any one of them is fine to compare
    copy_pages(scattered, idx[uniq], gathered[uniq], None)
    expected[idx[uniq]] = gathered[uniq]
    assert np.array_equal(scattered, expected)


def test_holes_are_zero_pages_that_need_no_read():
    ram = ram_file(64)
    try:
        assert ram.all_holes()
        ram.pages[5] = 1
        ram.pages[40:43] = 2
        assert not ram.all_holes()
        pages = np.arange(64)
        assert list(np.flatnonzero(~ram.holes(pages))) == [5, 40, 41, 42]
        ram.pages[6, 0] = 3  # a hole becomes data later: asked again, seen
        assert list(np.flatnonzero(~ram.holes(pages))) == [5, 6, 40, 41, 42]
        ram.populate(write=False)  # maps data only: holes stay holes
        assert ram.data_ranges() == [(5, 7), (40, 43)]
        ram.populate(write=True)
        assert ram.data_ranges() == [(0, 64)]
        assert not ram.pages[7:40].any()
    finally:
        ram.close()


def encode_stream(block: np.ndarray, batches: list[tuple[np.ndarray, np.ndarray]]) -> bytes:
    enc = PageEncoder(512)
    out = [ram_mem_size([("pc.ram", block.nbytes)])]
    for pages, zero in batches:
        out += [bytes(b) for b in enc.encode("pc.ram", pages.astype(np.uint32), block, zero)]
    out.append(ram_eos())
    return b"".join(out)


def load(data: bytes, dest: np.ndarray, zeroed: bool, chunk: int = 5000) -> RamLoader:
    chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)]

    def read_into(view: memoryview) -> int:
        if not chunks:
            return 0
        chunk = chunks.pop(0)
        n = min(len(chunk), len(view))
        view[:n] = chunk[:n]
        if n < len(chunk):
            chunks.insert(0, chunk[n:])
        return n

    loader = RamLoader([RamBlock("pc.ram", dest)], zeroed=zeroed)
    loader.load(savevm.BufferedReader(read_into, 1 << 18), RAM_VERSION)
    return loader


@pytest.mark.parametrize("zeroed", [True, False])
def test_zero_pages_over_known_zero_ram(zeroed):
    rng = np.random.default_rng(2)
    src = rng.integers(1, 256, (32, PAGE_SIZE), np.uint8)
    pages = np.arange(32)
    first = np.zeros(32, np.bool_)
    first[::3] = True  # some pages zero in the first pass
    src_first = src.copy()
    src_first[first] = 0
    later = np.zeros(32, np.bool_)
    later[1:8] = True  # pages that held data, then were zeroed and sent again
    stream = encode_stream(src_first, [(pages, first)])
    dest = np.zeros_like(src) if zeroed else rng.integers(0, 256, src.shape, np.uint8)
    loader = load(stream, dest, zeroed)
    assert np.array_equal(dest, src_first)
    assert loader.stats.zero == int(first.sum()) and loader.stats.normal == 32 - int(first.sum())
    assert loader.never_arrived() is None  # zero pages arrive too, written or not
    src_later = src_first.copy()
    src_later[later] = 0
    load(encode_stream(src_later, [(pages[later], np.ones(int(later.sum()), np.bool_))]), dest, False)
    assert np.array_equal(dest, src_later)


@pytest.mark.parametrize("chunk", [4104 * 3 + 5, 100_000, 1 << 20])
def test_runs_of_consecutive_pages_and_the_rest(chunk):
    """Consecutive pages load as one run; a break in the run, a page out of
    order and a page beyond the block are each caught wherever reads end."""
    rng = np.random.default_rng(5)
    src = rng.integers(0, 256, (128, PAGE_SIZE), np.uint8)
    pages = np.concatenate([np.arange(10, 40), np.arange(50, 90), [45, 3], np.arange(100, 128)])
    stream = encode_stream(src, [(pages, np.zeros(len(pages), np.bool_))])
    dest = np.zeros_like(src)
    loader = load(stream, dest, True, chunk)
    expected = np.zeros_like(src)
    expected[pages] = src[pages]
    assert np.array_equal(dest, expected) and loader.stats.normal == len(pages)
    assert list(np.flatnonzero(~loader.known_zero["pc.ram"])) == sorted(pages.tolist())
    assert list(np.flatnonzero(loader.arrived["pc.ram"])) == sorted(pages.tolist())
    assert loader.never_arrived() == ("pc.ram", 128 - len(pages))
    declared = ram_mem_size([("pc.ram", src.nbytes)])
    smaller = ram_mem_size([("pc.ram", 120 * PAGE_SIZE)]) + stream[len(declared):]
    with pytest.raises(savevm.StreamError, match="beyond block"):
        load(smaller, np.zeros((120, PAGE_SIZE), np.uint8), True, chunk)


def test_private_memory_leaves_out_guest_ram():
    ram = ram_file(4096)
    try:
        before = accounting.private_memory(os.getpid())
        ram.populate(write=True)
        ram.pages[:] = 9  # 16 MiB of guest RAM, written by this process alone
        after = accounting.private_memory(os.getpid())
        assert 0 < after["anon"] <= after["private"]
        assert after["private"] - before["private"] < 4 << 20
        assert accounting.rss_anon(os.getpid()) > 0
        assert accounting.is_guest_ram(ram.path + " (deleted)")
    finally:
        ram.close()


def test_page_vectors_are_the_page_records():
    """The encoder's vectors point at the pages in guest RAM; gathered, they are
    byte for byte the records QEMU's format wants."""
    rng = np.random.default_rng(3)
    block = rng.integers(0, 256, (64, PAGE_SIZE), np.uint8)
    enc = PageEncoder(8)  # smaller than the batch: records come in several tables
    pages = np.array([3, 4, 5, 20, 21, 40, 41, 42, 43, 44, 60, 1], np.uint32)
    zero = np.zeros(len(pages), np.bool_)
    zero[-1] = True
    block[1] = 0
    items = [bytes(i) for i in enc.encode("pc.ram", pages, block, zero)]
    expected = [struct.pack(">Q", (3 << 12) | RAM_PAGE) + bytes([6]) + b"pc.ram", bytes(block[3])]
    expected += [struct.pack(">Q", (p << 12) | RAM_PAGE | RAM_CONTINUE) + bytes(block[p])
                 for p in pages[1:-1]]
    expected += [struct.pack(">Q", (1 << 12) | RAM_ZERO | RAM_CONTINUE) + b"\0"]
    assert b"".join(items) == b"".join(expected)
    with pytest.raises(ValueError):
        list(enc.encode("pc.ram", pages, block[:, ::2], zero))


@pytest.mark.parametrize("kind", ["socket", "pipe"])
def test_write_vectors_survives_partial_writes(kind):
    """A full socket or pipe takes part of a table; the rest follows in order,
    including vectors cut in the middle."""
    rng = np.random.default_rng(4)
    block = rng.integers(0, 256, (600, PAGE_SIZE), np.uint8)
    enc = PageEncoder(600)  # 1200 vectors: more than one writev may take
    enc.new_section()
    pages = np.arange(600, dtype=np.uint32)
    items = list(enc.encode("pc.ram", pages, block, np.zeros(600, np.bool_)))
    vectors = items[-1]
    assert isinstance(vectors, PageVectors)
    expected = bytes(vectors)
    if kind == "socket":
        a, b = socket.socketpair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        a.settimeout(10)  # non-blocking underneath: writev meets EAGAIN and waits
        channel, reader = Channel(a.fileno(), a), b.makefile("rb")
    else:
        r, w = os.pipe()
        channel, reader = Channel(w), os.fdopen(r, "rb")
    got = []
    thread = threading.Thread(target=lambda: got.append(reader.read(len(expected))))
    thread.start()
    try:
        assert channel.write_vectors(vectors.table) == len(expected)
    finally:
        thread.join(10)
        channel.close()
        reader.close()
    assert got == [expected]


def test_iovec_skip_cuts_inside_a_vector():
    table = iovec_table(3)
    table[:, 0] = [1000, 2000, 3000]
    table[:, 1] = [8, 4096, 8]
    assert iovec_skip(table, 0).tolist() == table.tolist()
    assert iovec_skip(table, 8).tolist() == [[2000, 4096], [3000, 8]]
    assert iovec_skip(table, 10).tolist() == [[2002, 4094], [3000, 8]]
    assert iovec_skip(table, 4104 + 3).tolist() == [[3003, 5]]
    assert iovec_skip(table, 4112).tolist() == []


def test_cpu_seconds_counts_threads_that_ended():
    """The benchmark's CPU figure for a process includes the run time of its
    threads, those that ended too (the receiver's ends with the migration)."""
    def spin() -> None:
        end = time.thread_time() + 0.2
        while time.thread_time() < end:
            pass

    before = accounting.cpu_seconds(os.getpid())
    worker = threading.Thread(target=spin)
    worker.start()
    worker.join(30)
    assert accounting.cpu_seconds(os.getpid()) - before >= 0.19
