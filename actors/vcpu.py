"""vCPU actor: runs its workload over shared guest RAM, paced in wall-clock
time, and between two steps serves stop / cont / dirty-log harvests / state."""

from __future__ import annotations

import sys
import time

import numpy as np
import zmq

from actors.base import ActorError, HostConfig, Server, actor_main
from machine.ram import GuestRam
from machine.workload import Workload, WorkloadSpec
from protocol.messages import Message

# At most this long between two chances to serve a request.
SLICE_SECONDS = 0.01


class Vcpu:
    def __init__(self, cfg: HostConfig, index: int) -> None:
        guest = cfg["guest"]
        self.ram = GuestRam(cfg["ram_path"], [tuple(b) for b in guest["blocks"]])
        spec = WorkloadSpec.parse(guest["workload"])
        self.workload = Workload(spec, guest["seed"], index, guest["vcpus"], self.ram.pages.shape[0])
        self.dirty = np.zeros(self.ram.pages.shape[0], np.bool_)
        self.running = False
        self.rate = spec.steps_per_second
        self.t0 = 0.0
        self.done = 0

    def steps_due(self, now: float) -> int:
        return int((now - self.t0) * self.rate) - self.done

    def run_due(self) -> None:
        now = time.monotonic()
        due = self.steps_due(now)
        if due > 0:
            n = min(due, max(1, int(self.rate * SLICE_SECONDS)))
            written = self.workload.run(self.ram.pages, n)
            self.dirty[written] = True  # marked after writing, as KVM's log does
            self.done += n

    def idle_ms(self) -> int:
        if not self.running:
            return 1000
        due_at = self.t0 + (self.done + 1) / self.rate
        return max(0, int((due_at - time.monotonic()) * 1000))

    # requests ---------------------------------------------------------------
    def stop(self, _msg: Message) -> dict:
        self.running = False
        return {"step": self.workload.step}

    def cont(self, _msg: Message) -> dict:
        if not self.running:
            self.running = True
            self.t0, self.done = time.monotonic(), 0
        return {"step": self.workload.step}

    def harvest(self, _msg: Message) -> tuple[dict, list]:
        """Return and clear the dirty log, as one packed bitmap frame."""
        bits = np.packbits(self.dirty, bitorder="little")
        count = int(np.count_nonzero(self.dirty))
        self.dirty[:] = False
        return {"dirty": count}, [bits.tobytes()]

    def get_state(self, _msg: Message) -> dict:
        return self.workload.registers

    def set_state(self, msg: Message) -> dict:
        if self.running:
            raise ActorError("cannot load vCPU state while the vCPU runs")
        try:
            self.workload.load_registers(msg.data["registers"])
        except (KeyError, ValueError) as exc:
            raise ActorError(f"invalid vCPU state: {exc}") from None
        return self.workload.registers


def run(cfg: HostConfig, ctx: zmq.Context) -> None:
    index = int(sys.argv[2])
    vcpu = Vcpu(cfg, index)
    server = Server(ctx, cfg.endpoint(f"vcpu{index}"), f"vcpu{index}")
    handlers = {"stop": vcpu.stop, "cont": vcpu.cont, "harvest": vcpu.harvest,
                "get_state": vcpu.get_state, "set_state": vcpu.set_state,
                "ping": lambda _m: {"step": vcpu.workload.step}}
    while True:
        # Serve everything pending, then run the steps that are due.
        while server.serve(handlers, vcpu.idle_ms() if vcpu.running else 200):
            if vcpu.running and vcpu.steps_due(time.monotonic()) > 0:
                break
        if vcpu.running:
            vcpu.run_due()


if __name__ == "__main__":
    actor_main("vcpu", run)
