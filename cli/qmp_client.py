"""A QMP session to one host, as every command of the CLI opens it."""

from __future__ import annotations

import click

from livemig.actors.host import default_qmp, qmp_address


class Qmp:
    """A synchronous QMP session (qemu.qmp's legacy client) to one host."""

    def __init__(self, address: str) -> None:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        self.address = address
        self.mon = QEMUMonitorProtocol(qmp_address(address))
        try:
            self.mon.connect()
        except Exception as exc:
            raise click.ClickException(f"cannot reach the host's monitor at {address}: {exc}") from None

    def __call__(self, name: str, **args):
        reply = self.mon.cmd_raw(name, args)
        if "error" in reply:
            raise click.ClickException(reply["error"]["desc"])
        return reply["return"]

    def close(self) -> None:
        self.mon.close()


def connect(host: str, qmp: str | None) -> Qmp:
    return Qmp(qmp or default_qmp(host))
