"""What a person watches while a migration runs: the progress bar, and the
summary table at the end."""

from __future__ import annotations

import time

import click

from livemig.cli.qmp_client import Qmp

END_STATES = ("completed", "failed", "cancelled")


def follow(mon: Qmp, timeout: float, quiet: bool = False) -> dict:
    """Poll query-migrate until the migration ends, with a progress bar."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    deadline = time.monotonic() + timeout
    columns = [TextColumn("[bold]{task.fields[status]:<9}"), BarColumn(), DownloadColumn(binary_units=True),
               TextColumn("{task.fields[rate]:>10}"), TextColumn("pass {task.fields[passes]}"),
               TextColumn("exp. downtime {task.fields[expected]} ms"), TimeElapsedColumn()]
    with Progress(*columns, disable=quiet, transient=False) as bar:
        task = bar.add_task("migrate", total=None, status="setup", rate="", passes=0, expected="-")
        try:
            while True:
                info = mon("query-migrate")
                ram = info.get("ram", {})
                total = ram.get("total") or None
                done = (total - ram.get("remaining", 0)) if total else 0
                bar.update(task, total=total, completed=max(0, done), status=info.get("status", "?"),
                           rate=f"{ram.get('mbps', 0):.0f} Mbps", passes=ram.get("dirty-sync-count", 0),
                           expected=info.get("expected-downtime", "-"))
                if info.get("status") in END_STATES:
                    return info
                if time.monotonic() > deadline:
                    raise click.ClickException("migration did not finish in time (still running)")
                time.sleep(0.1)
        except KeyboardInterrupt:
            mon("migrate_cancel")
            bar.stop()
            click.echo("cancel requested", err=True)
            while (info := mon("query-migrate")).get("status") not in END_STATES:
                time.sleep(0.1)
            return info


def print_summary(info: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"migration {info.get('status')}", show_header=False)
    ram = info.get("ram", {})
    rows = [("total time", f"{info.get('total-time', 0)} ms"), ("setup time", f"{info.get('setup-time', 0)} ms"),
            ("downtime", f"{info.get('downtime', '-')} ms"),
            ("guest downtime", f"{info.get('x-guest-downtime', '-')} ms"),
            ("passes", ram.get("dirty-sync-count", 0)),
            ("transferred", f"{ram.get('transferred', 0) / 2**20:.1f} MiB"),
            ("RAM", f"{ram.get('total', 0) / 2**20:.0f} MiB"),
            ("normal pages", ram.get("normal", 0)), ("zero pages", ram.get("duplicate", 0)),
            ("throughput", f"{ram.get('mbps', 0):.0f} Mbps")]
    if info.get("error-desc"):
        rows.append(("error", info["error-desc"]))
    for k, v in rows:
        table.add_row(k, str(v))
    Console().print(table)
