"""Deterministic vCPU workloads.

A step's effect depends only on the workload's seed, the vCPU index and the
step number, never on time, so any run can be replayed without migration and
compared byte for byte. Each vCPU writes only its own slice of RAM, so the
interleaving of vCPUs cannot change the outcome. The registers (step counter,
PRNG state, an accumulator over every value produced) are the vCPU state that
travels in the migration stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from livemig.machine.ram import PAGE_SIZE
from livemig.protocol.units import parse_size

WORDS = PAGE_SIZE // 8
GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK = (1 << 64) - 1
_WORD_INDEX = np.arange(WORDS, dtype=np.uint64)
KINDS = ("idle", "memtouch", "stream", "diskwrite", "kv")
DISK_KINDS = ("diskwrite", "kv")
KV_SLOT = 16
KV_RECORD = 64
IDLE_STEPS_PER_SECOND = 1000.0


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, vectorised (uint64 arithmetic wraps)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _mix1(x: int) -> int:
    return int(_mix(np.array([x & _MASK], np.uint64))[0])


@dataclass(frozen=True)
class WorkloadSpec:
    kind: str
    rate: int = 0  # bytes/s for memtouch and stream, steps/s for kv
    wss: int = 0  # working set for memtouch, bytes (0: all RAM)
    iops: int = 0  # disk writes per second for diskwrite
    size: int = 4096  # bytes per diskwrite write (a multiple of 512)
    bytes: int = PAGE_SIZE  # bytes memtouch rewrites in each page it touches

    @classmethod
    def parse(cls, text: str) -> WorkloadSpec:
        kind, _, params = text.partition(":")
        if kind not in KINDS:
            raise ValueError(f"unknown workload {kind!r}: use idle, memtouch:rate=R,wss=S,bytes=B, stream:rate=R, "
                             "diskwrite:iops=N,size=S or kv:rate=N")
        values: dict[str, int] = {}
        for item in filter(None, params.split(",")):
            key, eq, val = item.partition("=")
            allowed = {"idle": (), "memtouch": ("rate", "wss", "bytes"), "stream": ("rate",),
                       "diskwrite": ("iops", "size"), "kv": ("rate",)}[kind]
            if not eq or key not in allowed:
                raise ValueError(f"workload {kind!r} takes {', '.join(allowed) or 'no parameters'}, not {item!r}")
            values[key] = parse_size(val)
        spec = cls(kind, values.get("rate", 0), values.get("wss", 0), values.get("iops", 0),
                   values.get("size", 4096), values.get("bytes", PAGE_SIZE))
        if kind in ("memtouch", "stream", "kv") and spec.rate <= 0:
            raise ValueError(f"workload {kind!r} needs rate=N > 0")
        if kind == "diskwrite" and (spec.iops <= 0 or spec.size <= 0 or spec.size % 512):
            raise ValueError("diskwrite needs iops=N > 0 and size=S, a positive multiple of 512")
        if not 0 < spec.bytes <= PAGE_SIZE:
            raise ValueError(f"memtouch bytes=B must be 1..{PAGE_SIZE}, not {spec.bytes}")
        return spec

    @property
    def uses_disk(self) -> bool:
        return self.kind in DISK_KINDS

    def __str__(self) -> str:
        if self.kind == "idle":
            return "idle"
        if self.kind == "stream":
            return f"stream:rate={self.rate}"
        if self.kind == "diskwrite":
            return f"diskwrite:iops={self.iops},size={self.size}"
        if self.kind == "kv":
            return f"kv:rate={self.rate}"
        tail = f",bytes={self.bytes}" if self.bytes != PAGE_SIZE else ""
        return f"memtouch:rate={self.rate},wss={self.wss}{tail}"

    @property
    def steps_per_second(self) -> float:
        if self.kind == "idle":
            return IDLE_STEPS_PER_SECOND
        if self.kind == "diskwrite":
            return float(self.iops)
        if self.kind == "kv":
            return float(self.rate)
        return self.rate / PAGE_SIZE


class Workload:
    """One vCPU's program over guest RAM pages (an (n, 4096) uint8 array)."""

    def __init__(self, spec: WorkloadSpec, seed: int, vcpu: int, vcpus: int, ram_pages: int) -> None:
        self.spec = spec
        self.vcpu = vcpu
        self.base = _mix1((seed & _MASK) ^ _mix1((vcpu + 1) * 0xD1B54A32D192ED03))
        span = ram_pages
        if spec.kind == "memtouch" and spec.wss:
            span = max(vcpus, min(ram_pages, spec.wss // PAGE_SIZE))
        self.first = vcpu * span // vcpus
        self.count = max(1, (vcpu + 1) * span // vcpus - self.first)
        self.seed = seed
        self.step = 0
        self.acc = 0

    @property
    def registers(self) -> dict:
        prng = (self.base + self.step * int(GAMMA)) & _MASK
        return {"workload": str(self.spec), "vcpu": self.vcpu, "seed": self.seed,
                "step": self.step, "prng": prng, "acc": self.acc}

    def load_registers(self, regs: dict) -> None:
        if regs.get("workload") != str(self.spec) or regs.get("seed") != self.seed \
                or regs.get("vcpu") != self.vcpu:
            raise ValueError(
                f"vCPU state for {regs.get('workload')!r} seed {regs.get('seed')} vcpu {regs.get('vcpu')} "
                f"does not match this guest ({self.spec} seed {self.seed} vcpu {self.vcpu})")
        self.step = int(regs["step"])
        self.acc = int(regs["acc"])
        if regs.get("prng") != self.registers["prng"]:
            raise ValueError("vCPU PRNG state does not match its step counter")

    def run(self, pages: np.ndarray, n: int, disks: list | None = None) -> np.ndarray:
        """Run n steps; return the page indexes written (for the dirty log).
        Disk workloads write through `disks` (machine.disk.Disk), which log
        their own dirty chunks."""
        if n <= 0:
            return np.empty(0, np.int64)
        k = np.arange(self.step + 1, self.step + n + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            x = _mix(np.uint64(self.base) + k * GAMMA)
            self.acc = (self.acc + int(x.sum(dtype=np.uint64))) & _MASK
        self.step += n
        if self.spec.kind == "idle":
            return np.empty(0, np.int64)
        if self.spec.uses_disk:
            if not disks:
                raise ValueError(f"workload {self.spec} needs a drive (--drive)")
            return self._disk_steps(pages, k, x, disks)
        if self.spec.kind == "memtouch":
            offs = (x % np.uint64(self.count)).astype(np.int64)
        else:
            offs = ((k - np.uint64(1)) % np.uint64(self.count)).astype(np.int64)
        target = offs + self.first
        if self.spec.bytes < PAGE_SIZE:
            return self._partial(pages, target, x)
        # Later steps win when a batch touches a page twice, as sequential steps would.
        rev_unique, rev_pos = np.unique(target[::-1], return_index=True)
        last = n - 1 - rev_pos
        values = _mix(x[last] ^ np.uint64(0xA5A5A5A5A5A5A5A5)) | np.uint64(1)
        pages[rev_unique] = (values[:, None] ^ _WORD_INDEX).view(np.uint8)
        return rev_unique

    def _partial(self, pages: np.ndarray, target: np.ndarray, x: np.ndarray) -> np.ndarray:
        """memtouch with bytes=B: each step rewrites a B-byte window of its
        page (the bytes a full rewrite would put there). Windows of one batch
        may overlap, so steps are applied in order: the k-th visit of every
        page in one vectorised round."""
        width = self.spec.bytes
        values = _mix(x ^ np.uint64(0xA5A5A5A5A5A5A5A5)) | np.uint64(1)
        start = (_mix(x ^ np.uint64(0x3C6EF372FE94F82B)) % np.uint64(PAGE_SIZE - width + 1)).astype(np.int64)
        order = np.argsort(target, kind="stable")
        sorted_target = target[order]
        first_of_group = np.flatnonzero(np.r_[True, sorted_target[1:] != sorted_target[:-1]])
        group = np.repeat(first_of_group, np.diff(np.r_[first_of_group, len(order)]))
        visit = np.empty(len(order), np.int64)
        visit[order] = np.arange(len(order)) - group
        span = np.arange(width, dtype=np.int64)
        for k in range(int(visit.max()) + 1):
            sel = np.flatnonzero(visit == k)
            pos = start[sel, None] + span  # byte positions in the page
            word = (values[sel, None] ^ (pos >> 3).astype(np.uint64))
            data = (word >> ((pos & 7) * 8).astype(np.uint64)).astype(np.uint8)
            pages[target[sel, None], pos] = data
        return np.unique(target)


    def _disk_steps(self, pages: np.ndarray, k: np.ndarray, x: np.ndarray, disks: list) -> np.ndarray:
        y = _mix(x ^ np.uint64(0x5851F42D4C957F2D))
        written = []
        for step, xv, yv in zip(k.tolist(), x.tolist(), y.tolist(), strict=True):
            if self.spec.kind == "diskwrite":
                disk = disks[(xv >> 8) % len(disks)]
                length = min(self.spec.size, disk.size - disk.size % 512)
                slots = max(1, (disk.size - length) // 512 + 1)
                offset = ((xv >> 16) % slots) * 512
                if xv % 8 == 0:
                    disk.write_zeroes(offset, length)
                else:
                    data = np.uint64(yv) ^ np.arange(length // 8, dtype=np.uint64)
                    disk.write(offset, data.tobytes())
            else:  # kv: the table lives in this vCPU's RAM, the log on the first disk
                slots = self.count * PAGE_SIZE // KV_SLOT
                key = xv % slots
                page = self.first + key * KV_SLOT // PAGE_SIZE
                at = key * KV_SLOT % PAGE_SIZE
                pages[page, at:at + KV_SLOT] = np.array([key, yv], np.uint64).view(np.uint8)
                written.append(page)
                disk = disks[0]
                records = disk.size // KV_RECORD
                record = np.array([step, key, yv, xv, 0, 0, 0, 0], np.uint64).tobytes()
                disk.write((step % records) * KV_RECORD, record)
        return np.unique(np.array(written, np.int64))


def replay(pages: np.ndarray, spec: WorkloadSpec, seed: int, vcpus: int,
           steps: list[int], disks: list | None = None) -> list[dict]:
    """Run each vCPU's first steps[i] steps on `pages` (and `disks`), unpaced;
    return registers."""
    regs = []
    for i, n in enumerate(steps):
        w = Workload(spec, seed, i, vcpus, pages.shape[0])
        done = 0
        while done < n:
            chunk = min(65536, n - done)
            w.run(pages, chunk, disks)
            done += chunk
        regs.append(w.registers)
    return regs
