"""A QMP session to one host, as every command of the CLI opens it."""

from __future__ import annotations

import os

import click

from livemig.actors.host import default_qmp, qmp_address


class Qmp:
    """A synchronous QMP session (qemu.qmp's legacy client) to one host."""

    def __init__(self, address: str, timeout: float | None = None) -> None:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        self.address = address
        self.mon = QEMUMonitorProtocol(qmp_address(address))
        try:
            self.mon.connect()
        except Exception as exc:
            raise click.ClickException(f"cannot reach the host's monitor at {address}: "
                                       f"{getattr(exc, 'strerror', None) or exc}") from None
        self.mon.settimeout(timeout)

    def __call__(self, name: str, **args):
        reply = self.mon.cmd_raw(name, args)
        if "error" in reply:
            raise click.ClickException(reply["error"]["desc"])
        return reply["return"]

    def close(self) -> None:
        self.mon.close()


def connect(host: str, qmp: str | None) -> Qmp:
    """The monitor named by --qmp, or the one of the local host named by -H."""
    if qmp:
        return Qmp(qmp)
    path = default_qmp(host)
    if not os.path.exists(path):
        raise click.ClickException(f"no host named {host} (`livemig list` shows the running ones)")
    try:
        return Qmp(path)
    except click.ClickException:
        raise click.ClickException(f"host {host} is not running (its monitor {path} does not answer)") \
            from None
