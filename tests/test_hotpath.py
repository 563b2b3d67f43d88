"""The hot path's building blocks: page-run copies, holes of the RAM file as
zero pages, zero pages over known-zero destination RAM, and the benchmark's
process accounting. Speed is shown by `scripts/bench`, never asserted here."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest

from actors import bench
from machine.ram import PAGE_SIZE, GuestRam
from protocol import savevm


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
    savevm.copy_pages(gathered, None, src, idx)
    assert np.array_equal(gathered, src[idx])
    scattered = np.zeros_like(src)
    expected = np.zeros_like(src)
    uniq = np.unique(idx, return_index=True)[1]  # duplicates: any one of them is fine to compare
    savevm.copy_pages(scattered, idx[uniq], gathered[uniq], None)
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
    enc = savevm.PageEncoder(512)
    out = [savevm.ram_mem_size([("pc.ram", block.nbytes)])]
    for pages, zero in batches:
        out += [bytes(b) for b in enc.encode("pc.ram", pages.astype(np.uint32), block, zero)]
    out.append(savevm.ram_eos())
    return b"".join(out)


def load(data: bytes, dest: np.ndarray, zeroed: bool) -> savevm.RamLoader:
    chunks = [data[i:i + 5000] for i in range(0, len(data), 5000)]

    def read_into(view: memoryview) -> int:
        if not chunks:
            return 0
        chunk = chunks.pop(0)
        view[:len(chunk)] = chunk
        return len(chunk)

    loader = savevm.RamLoader([savevm.RamBlock("pc.ram", dest)], zeroed=zeroed)
    loader.load(savevm.BufferedReader(read_into, 1 << 16), savevm.RAM_VERSION)
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
    src_later = src_first.copy()
    src_later[later] = 0
    load(encode_stream(src_later, [(pages[later], np.ones(int(later.sum()), np.bool_))]), dest, False)
    assert np.array_equal(dest, src_later)


def test_private_memory_leaves_out_guest_ram():
    ram = ram_file(4096)
    try:
        before = bench.private_memory(os.getpid())
        ram.populate(write=True)
        ram.pages[:] = 9  # 16 MiB of guest RAM, written by this process alone
        after = bench.private_memory(os.getpid())
        assert 0 < after["anon"] <= after["private"]
        assert after["private"] - before["private"] < 4 << 20
        assert bench.rss_anon(os.getpid()) > 0
        assert bench.is_guest_ram(ram.path + " (deleted)")
    finally:
        ram.close()
