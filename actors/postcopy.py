"""The two halves of post-copy that actors run: on the source, which page to
send next (asked-for pages first, then the rest from near the last fault);
on the destination, collecting the vCPUs' userfaultfds, placing pages and
asking the source for the ones a vCPU is blocked on."""

from __future__ import annotations

import os
import socket
import threading
from collections import deque
from collections.abc import Callable

import numpy as np

from livemig.machine.ram import PAGE_SIZE, BlockLayout, GuestRam
from livemig.machine.userfaultfd import Placer, recv_uffd
from livemig.protocol import returnpath
from livemig.protocol.returnpath import PageRequest
from livemig.protocol.rpc import log

SCAN = 1 << 16  # pages looked at per step when searching for the next dirty run


class Pusher:
    """What the source sends once the guest runs on the destination. `dirty`
    (a bool per guest page, all blocks back to back) is what the destination
    still lacks; each page leaves it exactly once."""

    def __init__(self, dirty: np.ndarray, blocks: list[BlockLayout]) -> None:
        self.dirty = dirty.astype(np.bool_, copy=True)
        self.blocks = blocks
        self.by_name = {b.name: b for b in blocks}
        self.block_of_page = np.zeros(len(dirty), np.int32)
        for i, b in enumerate(blocks):
            self.block_of_page[b.first_page:b.first_page + b.pages] = i
        self.urgent: deque[int] = deque()
        self.cursor = 0
        self.left = int(np.count_nonzero(self.dirty))
        self.cond = threading.Condition()
        self.requests = 0  # page requests received
        self.requested_pages = 0  # pages sent because they were asked for
        self.background_pages = 0

    def request(self, req: PageRequest) -> None:
        """A page request from the return path (its own thread)."""
        b = self.by_name[req.block]
        first = b.first_page + req.start // PAGE_SIZE
        with self.cond:
            self.requests += 1
            self.urgent.extend(range(first, first + req.length // PAGE_SIZE))
            self.cond.notify_all()

    def set_received(self, block: str, received: np.ndarray) -> int:
        """After a reconnect: the destination's received bitmap of a block says
        what is still to send (pages in flight when the link broke were lost).
        Returns the pages of the block still to send."""
        b = self.by_name[block]
        with self.cond:
            self.dirty[b.first_page:b.first_page + b.pages] = ~received
            self.left = int(np.count_nonzero(self.dirty))
            self.urgent.clear()
            return int(np.count_nonzero(~received))

    def wait_request(self, timeout: float) -> bool:
        """Sleep up to `timeout` (rate limiting) unless a request comes in."""
        with self.cond:
            if not self.urgent:
                self.cond.wait(timeout)
            return bool(self.urgent)

    def remaining(self) -> int:
        return self.left

    def next_batch(self, max_pages: int, background: bool = True) -> tuple[BlockLayout, np.ndarray, bool] | None:
        """(block, page indexes within it, asked for) to send next, already
        taken out of `dirty`; None when everything was sent (or, with
        background=False, when nothing was asked for)."""
        with self.cond:
            taken: list[int] = []
            while self.urgent and len(taken) < max_pages:
                page = self.urgent.popleft()
                if not self.dirty[page]:
                    continue  # sent already (in flight, or asked twice)
                if taken and self.block_of_page[page] != self.block_of_page[taken[0]]:
                    self.urgent.appendleft(page)
                    break
                self.dirty[page] = False
                taken.append(page)
            if taken:
                self.cursor = taken[-1] + 1  # go on from near the fault: its neighbours are likely next
                self.requested_pages += len(taken)
                self.left -= len(taken)
                return self._batch(np.array(taken, np.int64), True)
            batch = self._scan(max_pages) if background else None
            if batch is None:
                return None
            self.dirty[batch] = False
            self.cursor = int(batch[-1]) + 1
            self.background_pages += len(batch)
            self.left -= len(batch)
            return self._batch(batch, False)

    def _scan(self, max_pages: int) -> np.ndarray | None:
        """The next dirty pages of one block from the cursor on, wrapping once."""
        if not self.left:
            return None
        n = len(self.dirty)
        cursor = min(self.cursor, n)
        for lo, hi in ((cursor, n), (0, cursor)):
            for pos in range(lo, hi, SCAN):
                hits = np.flatnonzero(self.dirty[pos:min(hi, pos + SCAN)])
                if len(hits):
                    batch = hits[:max_pages] + pos
                    block = self.block_of_page[batch]
                    return batch[block == block[0]]
        return None

    def _batch(self, pages: np.ndarray, asked: bool) -> tuple[BlockLayout, np.ndarray, bool]:
        b = self.blocks[int(self.block_of_page[pages[0]])]
        return b, pages - b.first_page, asked


class IncomingPages:
    """The destination while the guest runs and pages still arrive.

    Pages already in the RAM file (pre-copy sent them and no discard removed
    them) are present; every other page is placed once, by `place`, through
    our registered mapping. vCPU processes register their own mappings and
    send their uffds to `path`; a thread reads their faults and asks the
    source for each missing page with `send` (a return-path writer).
    """

    def __init__(self, ram: GuestRam, path: str, send: Callable[[bytes], None]) -> None:
        self.ram = ram
        npages = ram.pages.shape[0]
        present = np.zeros(npages, np.bool_)
        for a, b in ram.data_ranges():
            present[a:b] = True
        self.placer = Placer(ram.bytes.ctypes.data, npages, present)
        self.received = present.copy()  # QEMU's receivedmap: what recovery reports
        self.blocks = ram.blocks
        self.block_of_page = np.zeros(npages, np.int32)
        for i, b in enumerate(ram.blocks):
            self.block_of_page[b.first_page:b.first_page + b.pages] = i
        self.send = send
        self.requests = 0
        self.last_block: str | None = None
        self.error: str | None = None
        self.path = path
        if os.path.exists(path):
            os.unlink(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(64)
        self.listener.settimeout(10)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def collect(self, names: list[str], register: Callable[[str, str], None]) -> None:
        """For each vCPU: ask it (register(name, path)) to send its uffd, and take it."""
        for name in names:
            register(name, self.path)
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(10)
                remote = recv_uffd(conn)
            if remote.name != name:
                remote.uffd.close()
                raise OSError(f"expected the userfaultfd of {name}, got {remote.name}'s")
            self.placer.add(remote)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._serve, name="postcopy-faults", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                pages = self.placer.poll(0.05)
                for page in pages:
                    try:
                        self._request(page)
                    except OSError:
                        pass  # the link broke: asked again on resume (re_request)
            except OSError as exc:
                self.error = f"post-copy fault handling failed: {exc}"
                log.error("%s", self.error)
                return

    def _request(self, page: int) -> None:
        b = self.blocks[int(self.block_of_page[page])]
        start = (page - b.first_page) * PAGE_SIZE
        name = None if b.name == self.last_block else b.name
        self.send(returnpath.req_pages(start, PAGE_SIZE, name))
        self.last_block = b.name
        self.requests += 1

    def re_request(self) -> int:
        """Ask again for every page a vCPU waits on (after a reconnect)."""
        with self.placer.lock:
            pages = sorted(self.placer.waiting)
        self.last_block = None
        for page in pages:
            self._request(page)
        return len(pages)

    # the loader's side ------------------------------------------------------
    def place(self, block: str, index: np.ndarray, rows: np.ndarray) -> None:
        pages = index + self.ram.block(block).first_page
        self.received[pages] = True
        self.placer.place_rows(pages, rows)

    def place_zero(self, block: str, index: np.ndarray) -> None:
        first = self.ram.block(block).first_page
        for i in index.tolist():
            self.received[first + i] = True
            self.placer.place_zero(first + i)

    def received_bitmap(self, block: str) -> np.ndarray:
        b = self.ram.block(block)
        return self.received[b.first_page:b.first_page + b.pages]

    def stats(self) -> dict:
        p = self.placer
        out = {"postcopy-requests": self.requests, "faults": p.stats.faults, "placed": p.stats.placed,
               "placed-zero": p.stats.zero, "placed-twice": p.stats.exists, "missing": p.missing(),
               "postcopy-blocktime": p.all_blocked_ns // 1_000_000,
               "postcopy-vcpu-blocktime": [ns // 1_000_000 for ns in p.blocked_ns]}
        latency = p.fault_latency_ms()
        if latency:
            out["fault-latency"] = latency
        return out

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(5)
        self.listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.placer.close()
