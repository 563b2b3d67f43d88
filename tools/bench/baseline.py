"""Scenario 1: the physical limit, plain socket sender and receiver processes
over loopback tcp and a unix socket."""

from __future__ import annotations

import multiprocessing
import os
import socket
import time

from .targets import MiB

# Both ends run in spawned processes (no inherited buffers: a receive buffer
# shared copy-on-write with a forked child costs most of the receive rate).

SEND_BUFFER = 64 * MiB
SEND_SLICE = 8 * MiB
RECV_BUFFER = 8 * MiB


def _baseline_receiver(family: int, address, nbytes: int, conn) -> None:
    srv = socket.socket(family, socket.SOCK_STREAM)
    try:
        srv.bind(address)
        srv.listen(1)
        srv.settimeout(30)
        conn.send(srv.getsockname())
        peer, _ = srv.accept()
        buf = bytearray(RECV_BUFFER)  # allocated here, in the receiving process
        view = memoryview(buf)
        peer.settimeout(60)
        got = 0
        t0 = time.perf_counter()
        while got < nbytes:
            n = peer.recv_into(view[:min(RECV_BUFFER, nbytes - got)])
            if not n:
                break
            got += n
        elapsed = time.perf_counter() - t0
        peer.close()
        conn.send({"bytes": got, "seconds": elapsed})
    except OSError as exc:
        conn.send({"error": str(exc)})
    finally:
        srv.close()


def _baseline_sender(family: int, address, nbytes: int) -> None:
    buf = os.urandom(SEND_BUFFER)  # incompressible, like the guest RAM it stands for
    view = memoryview(buf)
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(address)
        sent = 0
        while sent < nbytes:
            start = sent % SEND_BUFFER
            n = min(SEND_SLICE, SEND_BUFFER - start, nbytes - sent)
            s.sendall(view[start:start + n])
            sent += n
        s.shutdown(socket.SHUT_WR)


def baseline(transport: str, nbytes: int, workdir: str) -> float:
    """Seconds a plain socket sender and receiver (separate processes) take to
    move `nbytes` over loopback tcp or a unix socket."""
    ctx = multiprocessing.get_context("spawn")
    if transport == "tcp":
        family, address = socket.AF_INET, ("127.0.0.1", 0)
    else:
        family, address = socket.AF_UNIX, os.path.join(workdir, f"baseline-{time.monotonic_ns()}.sock")
    parent, child = ctx.Pipe()
    recv = ctx.Process(target=_baseline_receiver, args=(family, address, nbytes, child), daemon=True)
    recv.start()
    send = None
    try:
        if not parent.poll(30):
            raise RuntimeError("baseline receiver did not start")
        bound = parent.recv()
        send = ctx.Process(target=_baseline_sender, args=(family, bound, nbytes), daemon=True)
        send.start()
        if not parent.poll(120):
            raise RuntimeError("baseline transfer did not finish in 120 s")
        out = parent.recv()
        if "error" in out or out["bytes"] != nbytes:
            raise RuntimeError(f"baseline transfer failed: {out}")
        return out["seconds"]
    finally:
        for p in (send, recv):
            if p is not None:
                p.join(10)
                if p.is_alive():
                    p.kill()
                    p.join(5)
        if family == socket.AF_UNIX and os.path.exists(address):
            os.unlink(address)
