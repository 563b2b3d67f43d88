"""RAM sender: owns the migration dirty bitmap, harvests the vCPUs' dirty logs,
picks dirty pages within the byte budget it is granted, detects zero pages and
hands page descriptors (never page data) to the transport writer.

The bytes the coordinator wants on the wire (header, device sections, EOF)
go through it too, so that they keep their place after the pages queued
before them; the block sender, the other producer on the writer's data
socket, is kept in order by the coordinator waiting for its marks.
"""

from __future__ import annotations

import json
import time

import numpy as np
import zmq

from livemig.actors.base import Client, HostConfig, Server, actor_main
from livemig.machine.ram import PAGE_SIZE
from livemig.protocol import postcopy, savevm
from livemig.protocol.messages import Message
from livemig.protocol.ram import NORMAL_RECORD, ZERO_RECORD

BATCH_PAGES = 2048
# What one zero-page record costs on the wire; a normal page costs NORMAL_RECORD.
ZERO_COST = ZERO_RECORD
NORMAL_COST = NORMAL_RECORD


class RamSender:
    def __init__(self, cfg: HostConfig, ctx: zmq.Context) -> None:
        guest = cfg.guest
        self.ram = cfg.map_ram()
        self.ram.populate(write=False)  # map what holds data now: no fault per page later
        self.npages = self.ram.pages.shape[0]
        self.dirty = np.zeros(self.npages, np.bool_)
        self.vcpus = [Client(ctx, cfg.endpoint(f"vcpu{i}"), "ram_sender") for i in range(guest.vcpus)]
        self.data = ctx.socket(zmq.PUSH)
        self.data.setsockopt(zmq.SNDHWM, 2)
        self.data.setsockopt(zmq.LINGER, 0)
        self.data.connect(cfg.endpoint("writer-data"))
        self.block_of_page = np.zeros(self.npages, np.int32)
        for i, b in enumerate(self.ram.blocks):
            self.block_of_page[b.first_page:b.first_page + b.pages] = i
        self.marks = 0
        self.period_start = time.monotonic()
        self.period_dirty = 0
        self.dirty_rate = 0
        # The dirty-sync count (XBZRLE's cache age) and whether the first full
        # pass is done: only then may a page go as an XBZRLE delta.
        self.age = 0
        self.after_first_pass = False

    def emit(self, *chunks: bytes) -> None:
        self.data.send_multipart([b"bytes", *chunks], copy=False)

    def mark(self) -> str:
        self.marks += 1
        mark = f"ram:{self.marks}"
        self.data.send_multipart([b"mark", mark.encode()])
        return mark

    def harvest(self) -> int:
        """Fold every vCPU's dirty log into the bitmap; returns pages newly dirtied."""
        newly = 0
        for vcpu in self.vcpus:
            reply = vcpu.call("harvest", timeout=10)
            bits = np.unpackbits(np.frombuffer(reply.frames[0], np.uint8),
                                 count=self.npages, bitorder="little").view(np.bool_)
            newly += reply.data["result"]["dirty"]
            self.dirty |= bits
        return newly

    # requests ---------------------------------------------------------------
    def end_ram_section(self, section_id: int) -> None:
        """RAM's end of section and footer, as its own message: the writer puts
        multifd's SYNCs before it."""
        self.data.send_multipart([b"ram-eos", savevm.footer(section_id)])

    def on_emit(self, msg: Message) -> dict:
        self.emit(*msg.frames)
        if "ram_eos" in msg.data:
            self.end_ram_section(msg.data["ram_eos"])
        return {"mark": self.mark() if msg.data.get("mark") else None}

    def on_setup(self, _msg: Message) -> dict:
        self.harvest()  # start the vCPUs' logs afresh: everything is dirty anyway
        self.dirty[:] = True
        self.age, self.after_first_pass = 1, False
        self.period_start, self.period_dirty = time.monotonic(), 0
        return self.status(sync=True)

    def on_sync(self, _msg: Message) -> dict:
        newly = self.harvest()
        self.period_dirty += newly
        self.age += 1
        self.after_first_pass = True
        return {**self.status(sync=True), "dirtied": newly}

    def on_iterate(self, msg: Message) -> dict:
        """Send dirty pages worth at most `budget` bytes (0: all) as one section."""
        budget = msg.data["budget"]
        kind = savevm.SECTION_END if msg.data.get("end") else savevm.SECTION_PART
        self.emit(savevm.section_part(kind, msg.data["section_id"]))
        sent = self.send_pages(budget, last_stage=bool(msg.data.get("end")))
        self.end_ram_section(msg.data["section_id"])
        out = self.status(sync=False)
        out.update(sent)
        out["mark"] = self.mark()
        return out

    def on_postcopy_discard(self, _msg: Message) -> dict:
        """At the switch to post-copy: RAM_DISCARD for every page dirty now (the
        destination may hold an old copy of it); returns how many pages."""
        for b in self.ram.blocks:
            self.emit(*postcopy.discard_pages(b.name, self.dirty[b.first_page:b.first_page + b.pages]))
        return {"pages": int(np.count_nonzero(self.dirty))}

    def on_postcopy_push(self, msg: Message) -> dict:
        """Hand what is left to the writer, which sends it as the destination asks."""
        self.data.send_multipart([b"postcopy", np.packbits(self.dirty, bitorder="little").tobytes(),
                                  json.dumps(msg.data).encode()])
        left = int(np.count_nonzero(self.dirty))
        self.dirty[:] = False
        return {"pages": left}

    def on_postcopy_resume(self, msg: Message) -> dict:
        """After a recovery: the writer goes on with what the destination lacks."""
        self.data.send_multipart([b"postcopy-resume", json.dumps(msg.data).encode()])
        return {}

    def on_cleanup(self, _msg: Message) -> dict:
        self.dirty[:] = False
        return {}

    # ----------------------------------------------------------------------
    def status(self, sync: bool) -> dict:
        now = time.monotonic()
        out = {"remaining": int(np.count_nonzero(self.dirty)) * PAGE_SIZE}
        if sync and now - self.period_start >= 1.0:
            self.dirty_rate = int(self.period_dirty / (now - self.period_start))
            self.period_start, self.period_dirty = now, 0
        out["dirty_pages_rate"] = self.dirty_rate
        return out

    def send_pages(self, budget: int, last_stage: bool = False) -> dict:
        normal = zeros = wire = 0
        candidates = np.flatnonzero(self.dirty)
        pos = 0
        while pos < len(candidates) and (budget == 0 or wire < budget):
            want = BATCH_PAGES
            if budget:
                want = max(1, min(BATCH_PAGES, (budget - wire) // NORMAL_COST + 1))
            batch = candidates[pos:pos + want]
            # A batch never spans two RAM blocks.
            blocks = self.block_of_page[batch]
            if blocks[0] != blocks[-1]:
                batch = batch[blocks == blocks[0]]
            pos += len(batch)
            self.dirty[batch] = False  # cleared before reading: a later write re-dirties it
            is_zero = self.ram.zero_pages(batch)
            block = self.ram.blocks[int(blocks[0])]
            self.data.send_multipart(
                [b"pages", block.name.encode(), str(block.first_page).encode(),
                 (batch - block.first_page).astype(np.uint32).tobytes(), is_zero.tobytes(),
                 # for XBZRLE: the cache age (0 before the first full pass), the last stage
                 str(self.age if self.after_first_pass else 0).encode(), b"1" if last_stage else b"0"],
                copy=False)
            nz = int(is_zero.sum())
            zeros += nz
            normal += len(batch) - nz
            wire += (len(batch) - nz) * NORMAL_COST + nz * ZERO_COST
        return {"normal": normal, "zero": zeros, "queued": wire}


def run(cfg: HostConfig, ctx: zmq.Context) -> None:
    sender = RamSender(cfg, ctx)
    server = Server(ctx, cfg.endpoint("ram_sender"), "ram_sender")
    handlers = {"postcopy_discard": sender.on_postcopy_discard, "postcopy_push": sender.on_postcopy_push,
                "postcopy_resume": sender.on_postcopy_resume,
                "emit": sender.on_emit, "setup": sender.on_setup, "sync": sender.on_sync,
                "iterate": sender.on_iterate, "cleanup": sender.on_cleanup,
                "ping": lambda _m: {}}
    while True:
        server.serve(handlers, None)


if __name__ == "__main__":
    actor_main("ram_sender", run)
