"""What a person watches while a migration runs: a progress bar on a terminal
(plain lines otherwise), and the summary table at the end. Rates are shown
in one style everywhere: Mbit/s, from QEMU's `mbps` (megabits per second)."""

from __future__ import annotations

import sys
import time

import click

from livemig.cli.qmp_client import Qmp
from livemig.machine.runstate import MIGRATION_END

PLAIN_EVERY = 1.0  # s between plain progress lines when stdout is not a terminal
MiB = 1 << 20


def rate(mbps: float | None) -> str:
    return "-" if mbps is None else f"{mbps:.0f} Mbit/s"


def plain_line(info: dict) -> str:
    """One line of progress: what the bar shows, in words."""
    ram = info.get("ram") or {}
    parts = [info.get("status", "?")]
    if ram.get("total"):
        done = ram["total"] - ram.get("remaining", 0)
        parts.append(f"{done / MiB:.1f}/{ram['total'] / MiB:.1f} MiB")
    if "mbps" in ram:
        parts.append(rate(ram["mbps"]))
    if ram.get("dirty-sync-count"):
        parts.append(f"pass {ram['dirty-sync-count']}")
    if "expected-downtime" in info:
        parts.append(f"expected downtime {info['expected-downtime']} ms")
    parts += convergence_notes(info)
    return ", ".join(parts)


def convergence_notes(info: dict) -> list[str]:
    """The brakes in force and the stall verdict, in words."""
    notes = []
    if "cpu-throttle-percentage" in info:
        notes.append(f"cpu throttle {info['cpu-throttle-percentage']} %")
    if "dirty-limit-throttle-time-per-round" in info:
        notes.append(f"dirty-limit held {info['dirty-limit-throttle-time-per-round'] // 1000} ms/round")
    if stalled := info.get("x-stalled"):
        # x-stalled gives bytes/s; shown as every rate here is
        notes.append(f"NOT CONVERGING (dirtying {rate(stalled['dirty-rate'] * 8 / 1e6)}, "
                     f"link {rate(stalled['bandwidth'] * 8 / 1e6)})")
    return notes


def follow(mon: Qmp, timeout: float, quiet: bool = False) -> dict:
    """Poll query-migrate until the migration ends: a bar on a terminal, a line per
    second (and per status change) otherwise, nothing when quiet."""
    deadline = time.monotonic() + timeout
    try:
        if quiet or not sys.stdout.isatty():
            return _follow_plain(mon, deadline, quiet)
        return _follow_bar(mon, deadline)
    except KeyboardInterrupt:
        mon("migrate_cancel")
        click.echo("cancel requested", err=True)
        while (info := mon("query-migrate")).get("status") not in MIGRATION_END:
            time.sleep(0.1)
        return info


def _poll(mon: Qmp, deadline: float) -> dict:
    if time.monotonic() > deadline:
        raise click.ClickException("migration did not finish in time (still running; "
                                   "`livemig cancel` stops it)")
    return mon("query-migrate")


def _follow_plain(mon: Qmp, deadline: float, quiet: bool) -> dict:
    last_status, last_at = None, 0.0
    while True:
        info = _poll(mon, deadline)
        status = info.get("status")
        if not quiet and (status != last_status or time.monotonic() - last_at >= PLAIN_EVERY):
            click.echo(plain_line(info))
            last_status, last_at = status, time.monotonic()
        if status in MIGRATION_END:
            return info
        time.sleep(0.1)


def _follow_bar(mon: Qmp, deadline: float) -> dict:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    # Fixed-width columns and a bar that takes what is left: the line is as wide
    # as the terminal, never wider (at 80 columns the bar is about 15 wide).
    columns = [TextColumn("[bold]{task.fields[status]:<9}"), BarColumn(bar_width=None),
               DownloadColumn(binary_units=True), TextColumn("{task.fields[rate]:>12}"),
               TextColumn("{task.fields[extra]}")]
    with Progress(*columns, expand=True, transient=False) as bar:
        task = bar.add_task("migrate", total=None, status="setup", rate="", extra="")
        while True:
            info = _poll(mon, deadline)
            ram = info.get("ram") or {}
            total = ram.get("total") or None
            done = (total - ram.get("remaining", 0)) if total else 0
            status = info.get("status", "?")
            extra = f"pass {ram.get('dirty-sync-count', 0)}"
            if "expected-downtime" in info:
                extra += f", exp. {info['expected-downtime']} ms"
            extra = ", ".join([extra, *convergence_notes(info)])
            bar.update(task, total=total, completed=max(0, done), status=status,
                       rate=rate(ram.get("mbps")) if "mbps" in ram else "", extra=extra)
            if status in MIGRATION_END:
                return info
            time.sleep(0.1)


def summary_rows(info: dict) -> list[tuple[str, str]]:
    """The rows of the summary: only figures the monitor reported (a destination or a
    cancelled migration has fewer, and shows fewer, never a made-up 0)."""
    ram = info.get("ram")
    rows = []
    for key, label in (("total-time", "total time"), ("setup-time", "setup time"),
                       ("downtime", "downtime"), ("x-guest-downtime", "guest downtime"),
                       ("expected-downtime", "expected downtime")):
        if key in info:
            rows.append((label, f"{info[key]} ms"))
    if ram and ram.get("transferred"):
        rows += [("passes", str(ram.get("dirty-sync-count", 0))),
                 ("transferred", f"{ram['transferred'] / MiB:.1f} MiB"),
                 ("RAM", f"{ram.get('total', 0) / MiB:.0f} MiB"),
                 ("normal pages", str(ram.get("normal", 0))), ("zero pages", str(ram.get("duplicate", 0))),
                 ("throughput", rate(ram.get("mbps")))]
    disk = info.get("disk")
    if disk and disk.get("total"):
        rows.append(("disk", f"{disk.get('transferred', 0) / MiB:.1f} of {disk['total'] / MiB:.1f} MiB"))
    if info.get("error-desc"):
        rows.append(("error", info["error-desc"]))
    return rows


def print_summary(info: dict) -> None:
    rows = summary_rows(info)
    if not rows:  # a destination's, or a cancelled migration's: the status is all there is
        click.echo(f"migration {info.get('status')}")
        return
    if not sys.stdout.isatty():
        click.echo(f"migration {info.get('status')}")
        for k, v in rows:
            click.echo(f"  {k}: {v}")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"migration {info.get('status')}", show_header=False)
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)
