"""Multifd on the source: `multifd-channels` more connections to the
migration's URI after the main one, each with its own thread that frames
pages (protocol/multifd.py), compresses them if asked and writes them, raw
pages straight from guest RAM. The writer's data thread hands the threads
packets of up to 128 pages, and a SYNC on every channel before each RAM end
of section, as QEMU 7.2 does; zero pages stay on the main channel.

The threads run in parallel for real: writev, zlib and zstd release the GIL.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque

import numpy as np

from livemig.protocol.multifd import PACKET_PAGES, PacketSender
from livemig.protocol.ram import NORMAL_RECORD
from livemig.protocol.transport import Channel, Handshake, TransportError, connect
from livemig.protocol.uri import Uri

DEPTH = 4  # packets queued per channel: enough to keep it busy, little to drain at a mark
NO_PAGES = np.zeros(0, np.int64)


class Lane:
    """One channel and its thread, fed through a short queue."""

    def __init__(self, channel: Channel, cid: int, method: str, level: int, numbers: itertools.count) -> None:
        self.channel = channel
        self.cid = cid
        self.sender = PacketSender(channel, cid, method, level)  # its init packet goes out now
        self.numbers = numbers
        self.items: deque = deque()
        self.cond = threading.Condition()
        self.busy = False
        self.closing = False
        self.error: str | None = None
        self.saved = 0  # bytes fewer than the RAM sender counted for these pages (NORMAL_RECORD each)
        self.thread = threading.Thread(target=self.run, daemon=True, name=f"multifd-send-{cid}")
        self.thread.start()

    def put(self, item: tuple) -> None:
        with self.cond:
            while len(self.items) >= DEPTH and not self.closing and self.error is None:
                self.cond.wait(1)
            self.check()
            self.items.append(item)
            self.cond.notify_all()

    def full(self) -> bool:
        return len(self.items) >= DEPTH

    def check(self) -> None:
        if self.error is not None:
            raise TransportError(self.error)
        if self.closing:
            raise TransportError(f"multifd channel {self.cid} is closed")

    def wait_idle(self) -> None:
        with self.cond:
            while (self.items or self.busy) and not self.closing and self.error is None:
                self.cond.wait(1)
            self.check()

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.items and not self.closing:
                    self.cond.wait()
                if not self.items:
                    return
                block, block_pages, pages, sync = self.items.popleft()
                self.busy = True
                self.cond.notify_all()
            try:
                n = self.sender.send(block, block_pages, pages, next(self.numbers), sync)
                self.saved += len(pages) * NORMAL_RECORD - n
            except (OSError, ValueError) as exc:
                with self.cond:
                    if self.error is None:
                        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                        self.error = f"write to multifd channel {self.cid} failed: {why}"
                    self.items.clear()
            finally:
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()

    def stop(self, abort: bool) -> None:
        with self.cond:
            self.closing = True
            if abort:
                self.items.clear()
            self.cond.notify_all()
        if abort:
            self.channel.abort()
        self.thread.join(30)
        self.channel.close()


class MultifdSender:
    def __init__(self, uri: Uri, config: dict, tls: Handshake | None, timeout: float) -> None:
        self.lanes: list[Lane] = []
        numbers = itertools.count()  # packet_num: one counter for all channels, as QEMU
        try:
            for cid in range(config["channels"]):
                channel = connect(uri, timeout=timeout, tls=tls)
                channel.settimeout(timeout)  # a channel that takes nothing for this long fails
                try:  # its init packet before the next connects: the destination reads it first
                    self.lanes.append(Lane(channel, cid, config["compression"], config["level"], numbers))
                except BaseException:
                    channel.close()
                    raise
        except (OSError, ValueError) as exc:
            self.close(abort=True)
            raise TransportError(f"multifd channel {len(self.lanes)}: {exc}") from None
        self.next = 0

    def pick(self) -> Lane:
        """The next channel with room, round robin; the next one if all are full."""
        n = len(self.lanes)
        for i in range(n):
            lane = self.lanes[(self.next + i) % n]
            if not lane.full():
                break
        else:
            lane = self.lanes[self.next % n]
        self.next = (lane.cid + 1) % n
        return lane

    def send_pages(self, block: str, block_pages: np.ndarray, pages: np.ndarray) -> None:
        """Queue the (non-zero) pages at indexes `pages` of the block, 128 a packet."""
        pages = pages.astype(np.int64)
        for lo in range(0, len(pages), PACKET_PAGES):
            self.pick().put((block, block_pages, pages[lo:lo + PACKET_PAGES], False))

    def sync(self) -> None:
        """A SYNC on every channel, after everything queued on it: the RAM end of
        section that follows on the main channel waits for them."""
        for lane in self.lanes:
            lane.put(("", None, NO_PAGES, True))

    def drain(self) -> None:
        """Return once every channel has written all it was given."""
        for lane in self.lanes:
            lane.wait_idle()

    def check(self) -> None:
        for lane in self.lanes:
            if lane.error is not None:
                raise TransportError(lane.error)

    def abort(self) -> None:
        for lane in self.lanes:
            with lane.cond:
                if lane.error is None:
                    lane.error = "migration channel aborted"
                lane.cond.notify_all()
            lane.channel.abort()

    def close(self, abort: bool) -> None:
        for lane in self.lanes:
            lane.stop(abort)

    def stats(self) -> dict:
        """Bytes written on the channels; `sent`: those that left the host."""
        # Per system call where the channel counts so (a TLS channel does not), else per packet.
        out = sum(max(lane.channel.out, lane.sender.bytes) for lane in self.lanes)
        return {"bytes": sum(lane.sender.bytes for lane in self.lanes),
                "sent": max(0, out - sum(lane.channel.unsent() for lane in self.lanes)),
                "saved": sum(lane.saved for lane in self.lanes)}

