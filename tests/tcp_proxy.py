"""A TCP proxy for tests: forwards one connection both ways and can reset it
(SO_LINGER 0, so both ends see RST), as a middlebox dropping a flow does."""

from __future__ import annotations

import socket
import struct
import threading


class Proxy:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.pumps: list[threading.Thread] = []
        self.forwarded = 0  # bytes, both ways
        self.dropped = 0  # bytes of connections read but not forwarded
        self.lock = threading.Lock()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            self.forward(client)

    def forward(self, client: socket.socket) -> None:
        """A connection to the upstream for this client, pumped both ways."""
        server = socket.create_connection(self.upstream, timeout=10)
        server.settimeout(None)
        with self.lock:
            self.sockets += [client, server]
        for a, b in ((client, server), (server, client)):
            self.start_pump(a, b)

    def start_pump(self, a: socket.socket, b: socket.socket | None) -> None:
        t = threading.Thread(target=self.pump, args=(a, b), daemon=True)
        t.start()
        with self.lock:
            self.pumps.append(t)

    def pump(self, a: socket.socket, b: socket.socket | None) -> None:
        """a's bytes to b; with no b, read and dropped (counted in `dropped`)."""
        try:
            while data := a.recv(1 << 16):
                if b is not None:
                    b.sendall(data)
                with self.lock:
                    if b is None:
                        self.dropped += len(data)
                    else:
                        self.forwarded += len(data)
        except OSError:
            pass

    def reset(self) -> None:
        """Abort every forwarded connection with RST on both sides. A socket
        sends its RST when its last user lets go, so the pumps blocked in
        recv are woken (shutdown of the read side sends nothing) and joined
        before the close."""
        with self.lock:
            sockets, self.sockets = self.sockets, []
            pumps, self.pumps = self.pumps, []
        for s in sockets:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            try:
                s.shutdown(socket.SHUT_RD)
            except OSError:
                pass  # the peer is gone already
        for t in pumps:
            t.join(10)
        for s in sockets:
            s.close()

    def close(self) -> None:
        self.listener.close()
        self.reset()
