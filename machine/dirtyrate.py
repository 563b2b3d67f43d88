"""Measuring how fast a guest dirties its RAM (QEMU's calc-dirty-rate).

Two modes, both giving MiB/s (QEMU's "MB/s", 2^20 bytes):

- page-sampling, as QEMU does it: pick `sample-pages` random pages per GiB
  of each RAM block (blocks under 128 KiB are skipped), CRC32 them, wait
  `calc-time`, CRC32 them again; the share of sampled pages that changed,
  times the blocks' size, over the time. It sees every writer, not only the
  vCPUs, but a page written twice counts once: for a workload writing R
  bytes/s uniformly over a working set W, the figure is about
  W x (1 - exp(-R x T / W)) / T, which is R while R x T << W and tends to
  W / T as the working set is covered.
- dirty-bitmap: every vCPU counts the distinct pages it writes during
  `calc-time` in a bitmap of its own (beside the dirty log the migration
  harvests, so a running migration is not disturbed): exact, the same
  distinct-page figure without sampling error.
"""

from __future__ import annotations

import zlib

import numpy as np

from livemig.machine.ram import PAGE_SIZE, GuestRam

MIB = 1 << 20
GIB = 1 << 30
MIN_BLOCK = 128 << 10  # QEMU skips smaller RAM blocks
SAMPLE_PAGES_DEFAULT = 512  # per GiB
SAMPLE_PAGES_RANGE = (128, 16384)
CALC_TIME_RANGE = (1, 60)  # seconds
MODES = ("page-sampling", "dirty-ring", "dirty-bitmap")


def rate_mib(pages: float, seconds: float) -> float:
    return pages * PAGE_SIZE / MIB / seconds if seconds > 0 else 0.0


class PageSampler:
    """CRC32 of random pages of a guest's RAM, taken twice."""

    def __init__(self, ram: GuestRam, sample_pages: int, seed: int | None = None) -> None:
        rng = np.random.default_rng(seed)
        picks, self.bytes = [], 0
        for b in ram.blocks:
            if b.size < MIN_BLOCK:
                continue
            # QEMU rounds down to none for small blocks; one sample at least is kinder.
            count = min(b.pages, max(1, sample_pages * b.size // GIB))
            picks.append(b.first_page + rng.choice(b.pages, count, replace=False))
            self.bytes += b.size
        self.pages = np.sort(np.concatenate(picks)) if picks else np.empty(0, np.int64)
        self.ram = ram
        self.first = self.crcs()

    def crcs(self) -> np.ndarray:
        # Holes of the RAM file are zero: reading them through the mapping would back them.
        hole = self.ram.holes(self.pages) if len(self.pages) else np.empty(0, np.bool_)
        zero_crc = zlib.crc32(bytes(PAGE_SIZE))
        return np.array([zero_crc if h else zlib.crc32(self.ram.pages[p])
                         for p, h in zip(self.pages.tolist(), hole.tolist(), strict=True)], np.uint32)

    def changed(self) -> int:
        return int(np.count_nonzero(self.crcs() != self.first))

    def rate(self, seconds: float) -> float:
        """MiB/s: the changed share of samples, scaled to the sampled blocks."""
        if not len(self.pages):
            return 0.0
        return self.changed() / len(self.pages) * self.bytes / MIB / seconds


class DirtyMeter:
    """A vCPU's own count of distinct pages written while a measurement runs."""

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.bits: np.ndarray | None = None

    @property
    def active(self) -> bool:
        return self.bits is not None

    def start(self) -> None:
        self.bits = np.zeros(self.npages, np.bool_)

    def mark(self, pages: np.ndarray) -> None:
        if self.bits is not None:
            self.bits[pages] = True

    def stop(self) -> int:
        """Distinct pages written since start (0 if none was started)."""
        count = int(np.count_nonzero(self.bits)) if self.bits is not None else 0
        self.bits = None
        return count
