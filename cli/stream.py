"""`livemig stream`: look inside saved migration streams (QEMU's or livemig's),
e.g. one written by `migrate exec:cat > FILE` or `migrate file:FILE`."""

from __future__ import annotations

import json
import sys

import click

from livemig.machine.ram import PAGE_SIZE
from livemig.protocol import savevm
from livemig.protocol.inspect import StreamInfo, scan


def _scan(path: str, ram_dir: str | None) -> StreamInfo:
    try:
        return scan(path, ram_dir)
    except savevm.StreamError as exc:
        raise click.ClickException(f"{path}: {exc}") from None
    except OSError as exc:
        raise click.ClickException(f"{path}: {exc.strerror or exc}") from None


@click.group()
def stream() -> None:
    """Inspect or extract saved savevm v3 streams (QEMU's or livemig's)."""


@stream.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print everything (vmdesc included) as JSON.")
def inspect(path: str, as_json: bool) -> None:
    """Sections, versions, sizes, RAM blocks and the vmdesc trailer of the stream in PATH."""
    info = _scan(path, None)
    if as_json:
        click.echo(json.dumps(info.as_dict(), indent=1))
        return
    _print(info)


@stream.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--ram", "ram_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for one raw file per RAM block (named after the block; '/' as %2F).")
@click.option("--json", "as_json", is_flag=True, help="Print the files written as JSON.")
def extract(path: str, ram_dir: str, as_json: bool) -> None:
    """Write the RAM carried by the stream in PATH: the last content sent for
    each page of each RAM block (pages never sent are zero)."""
    info = _scan(path, ram_dir)
    files = [{"block": name, "size": size, "file": info.ram_files[name]} for name, size in info.ram_blocks]
    if as_json:
        click.echo(json.dumps({"ram_files": files, "ram_pages": info.ram_pages}))
        return
    for f in files:
        click.echo(f"{f['block']}: {f['size']} bytes -> {f['file']}")
    if not files:
        click.echo("the stream carries no RAM", err=True)
        sys.exit(1)


def _print(info: StreamInfo) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    config = info.configuration
    machine = config.get("machine", "(no configuration section)")
    extra = ", ".join(f"{k} {v}" for k, v in config.items() if k != "machine")
    console.print(f"[bold]{info.path}[/]: savevm v{savevm.VERSION}, {info.size} bytes, machine "
                  f"[bold]{machine}[/]{f' ({extra})' if extra else ''}")
    for c in info.commands:
        label = f"{c['name']} ({c['command']})"
        console.print(f"command at offset {c['offset']}: {label} ({c['length']} bytes of data)")

    table = Table(title="sections")
    numbers = {"id": 3, "inst": 4, "ver": 3, "offset": len(str(info.size)), "bytes": len(str(info.size))}
    for col in ("id", "section", "inst", "ver", "kind", "pieces", "offset", "bytes", "state"):
        table.add_column(col, justify="right" if col in numbers else "left", min_width=numbers.get(col),
                         overflow="fold")
    for s in info.sections:
        pieces = "+".join(k if v == 1 else f"{k}x{v}" for k, v in s.pieces.items())
        state = "" if s.state is None else json.dumps(s.state)
        if len(state) > 120:
            state = state[:117] + "..."
        table.add_row(str(s.section_id), s.name, str(s.instance), str(s.version), s.kind, pieces,
                      str(s.offset), str(s.bytes), state)
    console.print(table)

    blocks = Table(title="RAM blocks")
    blocks.add_column("block")
    blocks.add_column("bytes", justify="right")
    blocks.add_column("pages", justify="right")
    for name, size in info.ram_blocks:
        blocks.add_row(name, str(size), str(size // PAGE_SIZE))
    console.print(blocks)
    console.print(f"page records: {info.ram_pages.get('normal', 0)} normal, {info.ram_pages.get('zero', 0)} "
                  f"zero; EOF at offset {info.eof_offset}")
    if info.drives:
        console.print(f"block migration of drives: {', '.join(info.drives)}")

    if info.vmdesc is None:
        console.print("no vmdesc trailer")
        return
    desc = Table(title=f"vmdesc trailer at offset {info.vmdesc_offset} (page_size "
                       f"{info.vmdesc.get('page_size')})")
    for col in ("device", "inst", "ver", "fields", "field bytes", "subsections"):
        desc.add_column(col, no_wrap=col != "subsections")
    for d in info.vmdesc.get("devices", []):
        fields = d.get("fields", [])
        size = sum(int(f.get("size", 0)) * int(f.get("array_len", 1)) for f in fields)
        subs = ", ".join(s.get("vmsd_name", "?") for s in d.get("subsections", []))
        desc.add_row(str(d.get("name")), str(d.get("instance_id")), str(d.get("version")), str(len(fields)),
                     str(size), subs)
    console.print(desc)
    console.print("(livemig stream inspect --json prints the whole vmdesc)")
