"""One measured migration: two fresh `livemig host` processes on loopback,
migrate over QMP, and query-migrate's figures with CPU and memory."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from livemig.machine.runstate import MIGRATION_END
from livemig.tools.launch import HostProcess, free_port
from livemig.tools.tls_certs import Pki

from .accounting import Watch


@dataclass
class Guest:
    ram: int
    fill: str = "random"
    workload: str = "idle"
    seed: int = 8
    stopped: bool = True

    def args(self) -> list[str]:
        return ["--ram", str(self.ram), "--seed", str(self.seed), "--workload", self.workload]


@dataclass
class Run:
    """One migration between two fresh hosts, as query-migrate reported it."""

    info: dict
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (s, remaining, expected ms)
    cpu: dict[str, float] = field(default_factory=dict)
    private: dict[str, int] = field(default_factory=dict)


class Hosts:
    """A source and a destination host, started in parallel and always stopped."""

    def __init__(self, guest: Guest, uri: str, tag: str, tls: Pki | None = None, env: dict | None = None,
                 multifd: dict | None = None) -> None:
        self.guest = guest
        src_args = [*guest.args(), "--fill", guest.fill]
        # A real destination starts from zeroed RAM; its receiver prefaults it.
        defer = tls or multifd  # set before the destination listens
        dst_args = [*guest.args(), "--fill", "zero", "--incoming", "defer" if defer else uri]
        if tls:
            src_args += ["--object", f"tls-creds-x509,id=tls0,dir={tls.client},endpoint=client"]
            dst_args += ["--object", f"tls-creds-x509,id=tls0,dir={tls.server},endpoint=server"]
        with ThreadPoolExecutor(2) as pool:
            futs = [pool.submit(HostProcess, f"{tag}-src", *src_args, timeout=120, env=env),
                    pool.submit(HostProcess, f"{tag}-dst", *dst_args, timeout=120, env=env)]
            errors = [f.exception() for f in futs]
            started = [f.result() for f in futs if f.exception() is None]
        if any(errors):
            for h in started:
                h.close()
            raise RuntimeError(f"hosts did not start: {[e for e in errors if e]}")
        self.src, self.dst = started
        if tls:  # the destination learns its credentials before it listens
            self.dst.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
        if multifd:
            multifd_on(self.dst, multifd)
        if defer:
            self.dst.cmd("migrate-incoming", uri=uri)

    def close(self) -> None:
        for h in (self.src, self.dst):
            h.close()

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def multifd_on(host: HostProcess, params: dict) -> None:
    """The multifd capability and parameters (multifd-channels, multifd-compression, ...)."""
    host.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    host.cmd("migrate-set-parameters", **params)


def qmp_call(mon, name: str, **args):
    reply = mon.cmd_raw(name, args)
    if "error" in reply:
        raise RuntimeError(f"{name}: {reply['error']['desc']}")
    return reply["return"]


def migrate(guest: Guest, transport: str, workdir: str, params: dict, tag: str,
            settle: float = 0.0, poll: float = 0.0, timeout: float = 300, tls: Pki | None = None,
            multifd: dict | None = None) -> Run:
    """Start two hosts, migrate the source's guest to the destination, and
    return query-migrate's figures, CPU and memory; with `poll` (seconds),
    also progress samples taken by querying that often; with `tls`, over TLS
    with its client and server certificates; with `multifd`, that capability
    and these parameters on both hosts."""
    if transport == "tcp":
        uri = f"tcp:127.0.0.1:{free_port()}"
    else:
        uri = f"unix:{os.path.join(workdir, tag + '.sock')}"
    if tls:
        params = {**params, "tls-creds": "tls0"}
    with Hosts(guest, uri, tag, tls, multifd=multifd) as hosts:
        if multifd:
            multifd_on(hosts.src, multifd)
        if guest.stopped:
            hosts.src.cmd("stop")
        elif settle:
            time.sleep(settle)  # let the guest dirty memory before the first pass
        mon = hosts.src.qmp()
        try:
            qmp_call(mon, "migrate-set-parameters", **params)
            if not poll:
                # No progress samples wanted: wait for the MIGRATION event rather
                # than load two shared cores with queries while they are measured.
                qmp_call(mon, "migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
            watch = Watch({"src": hosts.src, "dst": hosts.dst})
            watch.start()
            t0 = time.monotonic()
            qmp_call(mon, "migrate", uri=uri)
            samples = []
            while True:
                if not poll:
                    event = mon.pull_event(wait=max(0.1, timeout - (time.monotonic() - t0)))
                    if not (event and event["event"] == "MIGRATION" and event["data"]["status"] in MIGRATION_END):
                        if time.monotonic() - t0 <= timeout:
                            continue
                info = qmp_call(mon, "query-migrate")
                now = time.monotonic() - t0
                ram = info.get("ram", {})
                if info.get("status") == "active":
                    samples.append((now, ram.get("remaining", 0), info.get("expected-downtime", 0)))
                if info.get("status") in MIGRATION_END:
                    break
                if now > timeout:
                    qmp_call(mon, "migrate_cancel")
                    raise TimeoutError(f"{tag}: migration not done after {timeout:.0f} s")
                time.sleep(poll)
            watch.lap("src")
        finally:
            mon.close()
        if info["status"] != "completed":
            watch.stop()
            raise RuntimeError(f"{tag}: migration {info['status']}: {info.get('error-desc')}")
        hosts.dst.wait_migration(60)
        watch.lap("dst")
        figures = watch.stop()
        samples.append((info["total-time"] / 1000, 0, samples[-1][2] if samples else 0))
        return Run(info, samples, figures["cpu"], figures["private"])
