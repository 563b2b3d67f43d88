"""`livemig stream`: look inside saved migration streams (QEMU's or livemig's),
e.g. one written by `migrate exec:cat > FILE` or `migrate file:FILE`."""

from __future__ import annotations

import json
import shutil
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


def _table(rows: list[tuple], right: set[int]) -> list[str]:
    """Plain aligned columns (a header row first): no borders to wrap, no cell split."""
    cells = [[_text(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths,
                                                                                           strict=True))).rstrip()
            for r in cells]


def _text(value) -> str:
    return "-" if value is None or value == "" else str(value)


def _clip(line: str, width: int) -> str:
    return line if len(line) <= width else line[:width - 3] + "..."


def _print(info: StreamInfo) -> None:
    width = shutil.get_terminal_size().columns
    echo = click.echo
    config = info.configuration
    machine = config.get("machine", "(no configuration section)")
    extra = ", ".join(f"{k} {v}" for k, v in config.items() if k != "machine")
    echo(f"{info.path}:")
    echo(f"  savevm v{savevm.VERSION}, {info.size} bytes, machine {machine}" + (f" ({extra})" if extra else ""))
    for c in info.commands:
        echo(f"command at offset {c['offset']}: {c['name']} ({c['command']}), {c['length']} bytes of data")

    echo("\nsections:")
    rows: list[tuple] = [("id", "section", "inst", "ver", "kind", "pieces", "offset", "bytes")]
    for sec in info.sections:
        pieces = "+".join(k if v == 1 else f"{k}x{v}" for k, v in sec.pieces.items())
        rows.append((sec.section_id, sec.name, sec.instance, sec.version, sec.kind, pieces, sec.offset, sec.bytes))
    for line in _table(rows, {0, 2, 3, 6, 7}):
        echo(f"  {line}")
    states = [(sec.name, sec.instance, sec.state) for sec in info.sections if sec.state is not None]
    if states:
        echo("\nsection state (--json has all of it):")
        for name, inst, state in states:
            echo(_clip(f"  {name} {inst}: {json.dumps(state)}", width))

    echo("\nRAM blocks:")
    rows = [("block", "bytes", "pages")] + [(n, size, size // PAGE_SIZE) for n, size in info.ram_blocks]
    for line in _table(rows, {1, 2}):
        echo(f"  {line}")
    echo(f"page records: {info.ram_pages.get('normal', 0)} normal, {info.ram_pages.get('zero', 0)} zero; "
         f"EOF at offset {info.eof_offset}")
    if info.drives:
        echo(f"block migration of drives: {', '.join(info.drives)}")

    if info.vmdesc is None:
        echo("no vmdesc trailer")
        return
    echo(f"\nvmdesc trailer at offset {info.vmdesc_offset} (page size {_text(info.vmdesc.get('page_size'))}):")
    rows = [("device", "inst", "ver", "fields", "field bytes", "subsections")]
    for d in info.vmdesc.get("devices", []):
        fields = d.get("fields", [])
        size = sum(int(f.get("size", 0)) * int(f.get("array_len", 1)) for f in fields)
        subs = ", ".join(sub.get("vmsd_name", "?") for sub in d.get("subsections", []))
        rows.append((d.get("name"), d.get("instance_id"), d.get("version"), len(fields), size, subs))
    for line in _table(rows, {1, 2, 3, 4}):
        echo(_clip(f"  {line}", width))
    echo("(livemig stream inspect --json prints the whole vmdesc)")
