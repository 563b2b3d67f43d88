"""The hand-over under loss (docs/reliability.md): at each of its messages,
with and without the return path, the connection is reset on either side
(x-fault) or the message is lost (a proxy between the hosts cuts both
connections instead of passing it). Within 30 s exactly one guest runs, and
it equals a replay of its steps; both sides' run states are sampled all the
while and are never both running. Where the hosts cannot reach each other
(the proxy goes dark), neither runs, both name the holder in query-migrate,
and x-migrate-resolve brings back exactly one.

The default suite runs one case per message once (SAMPLE); LIVEMIG_LONG=1
runs every case 3 times (the rest, and the second and third trials, are
marked `long`)."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from livemig.protocol import returnpath
from livemig.tools.launch import free_port
from tests.conftest import guest_args, replay_matches

ARGS = guest_args(ram="32M", workload="memtouch:rate=2M,wss=4M")
TRIALS = [0, *(pytest.param(n, marks=pytest.mark.long) for n in (1, 2))]
WINDOW = 30.0  # s from `migrate` to exactly one guest running


def rst(*socks: socket.socket) -> None:
    """Reset connections. A socket another thread blocks reading is only
    released (and the RST sent) once that read returns: SHUT_RD wakes it."""
    for sock in socks:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass
    for sock in socks:
        sock.close()


class Proxy:
    """TCP between the hosts. `drop` names one message to lose: "shut" (the
    destination's SHUT), "go" (the source's GO, the first bytes it sends
    after SHUT), "running" (the first X_HANDOVER on any connection). Instead
    of passing it, the proxy resets both connections. `dark` refuses every
    connection after the loss: the hosts cannot reach each other."""

    def __init__(self, target: int, drop: str, dark: bool = False) -> None:
        self.target, self.drop, self.go_dark = target, drop, dark
        self.lost = threading.Event()
        self.shut_passed = False
        self.dark = False
        self.port = free_port()
        self.lsock = socket.create_server(("127.0.0.1", self.port))
        self.lsock.settimeout(0.1)
        self.closed = False
        self.threads = [threading.Thread(target=self.serve, daemon=True)]
        self.threads[0].start()

    def serve(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.dark:
                rst(conn)
                continue
            try:
                out = socket.create_connection(("127.0.0.1", self.target), timeout=2)
            except OSError:
                rst(conn)
                continue
            for args in ((conn, out, self.forward), (out, conn, self.backward)):
                t = threading.Thread(target=self.pump, args=(*args, conn, out), daemon=True)
                t.start()
                self.threads.append(t)

    def cut(self, a: socket.socket, b: socket.socket) -> None:
        self.lost.set()
        if self.go_dark:
            self.dark = True
        rst(a, b)

    def forward(self, data: bytes, state: dict) -> bytes | None:
        """Source -> destination: the first bytes after SHUT are GO."""
        if self.drop == "go" and self.shut_passed and not self.lost.is_set():
            return None
        return data

    def backward(self, data: bytes, state: dict) -> bytes | None:
        """Destination -> source: return-path messages, one by one."""
        buf = state.setdefault("buf", b"") + data
        out = b""
        while len(buf) >= 4:
            mtype, length = struct.unpack(">HH", buf[:4])
            if len(buf) < 4 + length:
                break
            msg, buf = buf[:4 + length], buf[4 + length:]
            if not self.lost.is_set():
                if self.drop == "shut" and mtype == returnpath.RP_SHUT:
                    return None
                if self.drop == "running" and mtype == returnpath.RP_X_HANDOVER:
                    return None
            if mtype == returnpath.RP_SHUT:
                self.shut_passed = True
            out += msg
        state["buf"] = buf
        return out

    def pump(self, src: socket.socket, dst: socket.socket, through, a, b) -> None:
        state: dict = {}
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    if src.fileno() != -1:  # an end, not our own cut
                        dst.shutdown(socket.SHUT_WR)
                    return
                passed = through(data, state)
                if passed is None:
                    self.cut(a, b)
                    return
                if passed:
                    dst.sendall(passed)
        except OSError:
            rst(a, b)

    def light(self) -> None:
        self.dark = False

    def close(self) -> None:
        self.closed = True
        self.lsock.close()


class Sampler:
    """Both hosts' run states, read in turn (source, destination, source, ...)
    until stopped. A host read running, then the other read running, then the
    first read running again, ran both guests at once: the middle reading fell
    between two of the first host's (no host stops and resumes in a hand-over)."""

    def __init__(self, src, dst) -> None:
        self.hosts = (src, dst)
        self.readings: list[tuple[float, str, str]] = []  # (time, host, status)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        mons = [(h.name, h.qmp()) for h in self.hosts]
        try:
            while not self.stop.is_set():
                for name, mon in mons:
                    status = mon.cmd_raw("query-status", {})["return"]["status"]
                    self.readings.append((time.monotonic(), name, status))
                time.sleep(0.005)
        finally:
            for _, mon in mons:
                mon.close()

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(10)
        assert len(self.readings) > 10, "the run states were hardly sampled"
        r = self.readings
        for first, middle, last in zip(r, r[1:], r[2:], strict=False):
            assert not (first[2] == middle[2] == last[2] == "running"), f"two guests ran at once: {first, middle, last}"


def wait_one(src, dst, seconds: float) -> str:
    """Until exactly one guest runs and the source's migration ended: which one.
    The end is read first: the run states read after it are final."""
    deadline = time.monotonic() + seconds
    while True:
        info = src.cmd("query-migrate")
        states = {"src": src.cmd("query-status")["status"], "dst": dst.cmd("query-status")["status"]}
        running = [name for name, st in states.items() if st == "running"]
        if len(running) == 1 and info.get("status") in ("completed", "failed"):
            return running[0]
        assert time.monotonic() < deadline, (states, info, dst.cmd("query-migrate"))
        time.sleep(0.05)


def start(hosts, port: int, return_path: bool):
    dst = hosts.start("dst", *ARGS, "--incoming", f"tcp:127.0.0.1:{port}")
    src = hosts.start("src", *ARGS)
    if not return_path:
        src.cmd("migrate-set-capabilities", capabilities=[{"capability": "return-path", "state": False}])
    return src, dst


def check_survivor(src, dst, who: str, tmp_path) -> None:
    info, dinfo = src.cmd("query-migrate"), dst.cmd("query-migrate")
    if who == "dst":
        assert info["status"] == "completed" and info["x-guest-holder"] == "destination", info
        assert src.cmd("query-status")["status"] == "postmigrate"
        assert dinfo["status"] == "completed", dinfo
    else:
        assert info["status"] == "failed" and info["x-guest-holder"] == "source", info
        assert dinfo["status"] == "failed" and dst.cmd("query-status")["status"] == "inmigrate", dinfo
    survivor = dst if who == "dst" else src
    before = survivor.cmd("x-query-vcpus")[0]["step"]
    time.sleep(0.3)
    assert survivor.cmd("x-query-vcpus")[0]["step"] > before, "the guest does not run on"
    result = replay_matches(survivor, tmp_path)
    assert result["ram_equal"] and result["vcpu_equal"], result


# (return path, where the loss is): ("src"|"dst", x-fault) or ("proxy", message)
CASES = {
    "eof-source-reset": (True, ("src", "after-eof:reset")),
    "eof-destination-reset": (True, ("dst", "after-eof:reset")),
    "shut-lost": (True, ("proxy", "shut")),
    "shut-destination-reset": (True, ("dst", "after-shut:reset")),
    "go-lost": (True, ("proxy", "go")),
    "go-source-reset": (True, ("src", "after-go:reset")),
    "running-destination-reset": (True, ("dst", "after-go:reset")),
    "running-lost": (True, ("proxy", "running")),
    "norp-eof-source-reset": (False, ("src", "after-eof:reset")),
    "norp-eof-destination-reset": (False, ("dst", "after-eof:reset")),
    "norp-answer-lost": (False, ("proxy", "running")),
}


SAMPLE = ("eof-destination-reset", "shut-lost", "go-source-reset", "running-lost", "norp-answer-lost")


@pytest.mark.parametrize("trial", TRIALS)
@pytest.mark.parametrize("case", [c if c in SAMPLE else pytest.param(c, marks=pytest.mark.long) for c in CASES])
def test_loss_at_a_handover_message(hosts, tmp_path, port, case, trial):
    return_path, (where, what) = CASES[case]
    src, dst = start(hosts, port, return_path)
    proxy = Proxy(port, what) if where == "proxy" else None
    if where != "proxy":
        (src if where == "src" else dst).cmd("migrate-set-parameters", **{"x-fault": what})
    sampler = Sampler(src, dst)
    try:
        t0 = time.monotonic()
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{proxy.port if proxy else port}")
        who = wait_one(src, dst, WINDOW)
        took = time.monotonic() - t0
        time.sleep(0.3)  # and it stays one
    finally:
        sampler.finish()
        if proxy:
            proxy.close()
    if proxy:
        assert proxy.lost.is_set(), "the proxy never saw the message it was to lose"
    print(f"{case}: one guest ({who}) after {took:.1f} s, {len(sampler.readings)} readings")
    check_survivor(src, dst, who, tmp_path)


@pytest.mark.parametrize("trial", TRIALS)
@pytest.mark.parametrize("lost", ["shut", "go"])
def test_unreachable_then_resolve(hosts, tmp_path, port, lost, trial):
    """The message is lost and the hosts cannot reach each other: neither
    runs, both name the holder; x-migrate-resolve refuses on the side that
    does not hold the guest's last state and runs it on the one that does.
    When the link comes back the source learns the outcome by itself."""
    src, dst = start(hosts, port, True)
    proxy = Proxy(port, lost, dark=True)
    sampler = Sampler(src, dst)
    try:
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{proxy.port}")
        deadline = time.monotonic() + WINDOW
        while not (proxy.lost.is_set() and dst.cmd("query-migrate").get("x-guest-holder")):
            assert time.monotonic() < deadline, (src.cmd("query-migrate"), dst.cmd("query-migrate"))
            time.sleep(0.05)
        time.sleep(2)  # the source tries to resolve, and cannot
        assert src.cmd("query-status")["status"] == "finish-migrate"
        assert dst.cmd("query-status")["status"] == "inmigrate"
        info, dinfo = src.cmd("query-migrate"), dst.cmd("query-migrate")
        assert info["status"] == "device" and info["x-handover"], info
        assert info["x-guest-holder"] == ("unknown" if lost == "shut" else "destination"), info
        assert dinfo["status"] == "active" and dinfo["x-guest-holder"] == "destination", dinfo
        with pytest.raises(RuntimeError, match="run x-migrate-resolve there"):
            src.cmd("x-migrate-resolve")
        assert src.cmd("query-status")["status"] == "finish-migrate"
        assert dst.cmd("x-migrate-resolve") == {"holder": "destination"}
        dst.wait_status("running", 10)
        assert src.cmd("query-status")["status"] == "finish-migrate"
        proxy.light()
        assert src.wait_migration(15)["status"] == "completed"
        with pytest.raises(RuntimeError, match="runs on the destination"):
            src.cmd("x-migrate-resolve")
    finally:
        sampler.finish()
        proxy.close()
    check_survivor(src, dst, "dst", tmp_path)
