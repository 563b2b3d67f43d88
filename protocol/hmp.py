"""Human monitor (HMP) commands, reached through QMP's human-monitor-command
and `livemig hmp 'LINE'`. Each command registers itself with its usage; its
docstring is its `help` line. Commands turn into QMP commands and print what
QEMU's human monitor prints, so scripts written against QEMU's text work."""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from livemig.machine.runstate import MIGRATION_END, MigrationStatus
from livemig.protocol import units
from livemig.protocol.parameters import CAPABILITIES, PARAMETERS
from livemig.protocol.rpc import ActorError

Execute = Callable[[str, dict], Awaitable]  # runs one QMP command; raises ActorError
POLL = 0.1  # s between query-migrate polls while `migrate` waits


class UsageError(Exception):
    """Bad arguments: printed with a pointer to `help`, as QEMU's monitor does
    (prefixed with the command's name unless `bare`)."""

    def __init__(self, text: str, bare: bool = False) -> None:
        super().__init__(text)
        self.bare = bare


@dataclass(frozen=True)
class HmpCommand:
    name: str
    usage: str  # e.g. "[-d] [-b] [-i] uri": flags, then positional arguments ([x] optional)
    run: Callable[[Execute, dict], Awaitable[str]]
    help: str

    def describe(self) -> str:
        names = "|".join([self.name, *(a for a, n in ALIASES.items() if n == self.name)])
        return f"{names} {self.usage} -- {self.help}\n"

    def parse(self, words: list[str]) -> dict:
        spec = self.usage.split()
        flags = {s.strip("[]") for s in spec if s.startswith("[-")}
        names = [s for s in spec if not s.startswith("[-")]
        args: dict = {f.lstrip("-"): False for f in flags}
        positional = []
        for w in words:
            if w in flags and not positional:
                args[w.lstrip("-")] = True
            else:
                positional.append(w)
        for name in names:
            optional = name.startswith("[")
            key = name.strip("[]")
            if positional:
                args[key] = positional.pop(0)
            elif optional:
                args[key] = None
            else:
                raise UsageError("string expected")
        if positional:
            raise UsageError("extraneous characters at the end of line")
        return args


HMP: dict[str, HmpCommand] = {}
ALIASES = {"c": "cont", "s": "stop", "q": "quit", "?": "help"}  # QEMU's


def hmp(name: str, usage: str = ""):
    """Register an HMP command; its docstring is its help line."""
    def wrap(fn: Callable[[Execute, dict], Awaitable[str]]):
        HMP[name] = HmpCommand(name, usage, fn, " ".join((fn.__doc__ or "").split()))
        return fn
    return wrap


async def run(line: str, execute: Execute) -> str:
    """Run one HMP command line; returns its output (errors included, as text) with
    CRLF line ends, as QEMU's human-monitor-command does."""
    return (await _run(line, execute)).replace("\n", "\r\n")


async def _run(line: str, execute: Execute) -> str:
    try:
        words = shlex.split(line)
    except ValueError as exc:
        return f"Error: {exc}\n"
    if not words:
        return ""
    name = ALIASES.get(words[0], words[0])
    rest = words[1:]
    if name == "info":
        if not rest:
            return "".join(HMP[n].describe() for n in sorted(HMP) if n.startswith("info "))
        name, rest = f"info {rest[0]}", rest[1:]
    cmd = HMP.get(name)
    if cmd is None:
        return f"unknown command: '{name}'\n"
    try:
        return await cmd.run(execute, cmd.parse(rest))
    except UsageError as exc:
        text = str(exc) if exc.bare else f"{name}: {exc}"
        return f"{text}\nTry \"help {name}\" for more information\n"
    except ActorError as exc:
        return f"Error: {exc.desc}\n"


def parse_size(text: str, default_shift: int = 0) -> int:
    try:
        return units.parse_size(text, default_shift)
    except ValueError:
        raise UsageError(f"invalid size '{text}'") from None


def on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise UsageError("Expected 'on' or 'off'", bare=True)
    return text == "on"


# formatting ---------------------------------------------------------------------------------------
def format_status(status: dict) -> str:
    if status["running"]:
        return "VM status: running\n"
    if status["status"] == "paused":
        return "VM status: paused\n"
    return f"VM status: paused ({status['status']})\n"


def format_migrate(info: dict) -> str:
    """QEMU's classic `info migrate` text (the layout of QEMU 2.x to 10.0, without the
    QEMU-internal `globals:` block); nothing before the first migration."""
    out = []
    if info.get("blocked-reasons"):
        out.append("Outgoing migration blocked:")
        out += [f"  {r}" for r in info["blocked-reasons"]]
    if "status" in info:
        line = f"Migration status: {info['status']}"
        if info["status"] == "failed" and info.get("error-desc"):
            line += f" ({info['error-desc']})"
        out.append(line)
        out.append(f"total time: {info.get('total-time', 0)} ms")
        for key, label in (("expected-downtime", "expected downtime"), ("downtime", "downtime"),
                           ("setup-time", "setup")):
            if key in info:
                out.append(f"{label}: {info[key]} ms")
    ram = info.get("ram")
    if ram is not None:
        r = {k: ram.get(k, 0) for k in ("transferred", "remaining", "total", "duplicate", "skipped",
                                        "normal", "normal-bytes", "dirty-sync-count", "page-size",
                                        "multifd-bytes", "pages-per-second", "dirty-pages-rate",
                                        "postcopy-requests", "precopy-bytes", "downtime-bytes",
                                        "postcopy-bytes", "mbps")}
        out += [f"transferred ram: {r['transferred'] >> 10} kbytes",
                f"throughput: {r['mbps']:0.2f} mbps",
                f"remaining ram: {r['remaining'] >> 10} kbytes",
                f"total ram: {r['total'] >> 10} kbytes",
                f"duplicate: {r['duplicate']} pages",
                f"skipped: {r['skipped']} pages",
                f"normal: {r['normal']} pages",
                f"normal bytes: {r['normal-bytes'] >> 10} kbytes",
                f"dirty sync count: {r['dirty-sync-count']}",
                f"page size: {r['page-size'] >> 10} kbytes",
                f"multifd bytes: {r['multifd-bytes'] >> 10} kbytes",
                f"pages-per-second: {r['pages-per-second']}"]
        # Lines QEMU prints only when non-zero.
        for key, text in (("dirty-pages-rate", "dirty pages rate: {} pages"),
                          ("postcopy-requests", "postcopy request count: {}")):
            if r[key]:
                out.append(text.format(r[key]))
        for key, label in (("precopy-bytes", "precopy ram"), ("downtime-bytes", "downtime ram"),
                           ("postcopy-bytes", "postcopy ram")):
            if r[key]:
                out.append(f"{label}: {r[key] >> 10} kbytes")
    disk = info.get("disk")
    if disk is not None:
        out += [f"transferred disk: {disk.get('transferred', 0) >> 10} kbytes",
                f"remaining disk: {disk.get('remaining', 0) >> 10} kbytes",
                f"total disk: {disk.get('total', 0) >> 10} kbytes"]
    cache = info.get("xbzrle-cache")
    if cache is not None:
        out += [f"cache size: {cache['cache-size']} bytes",
                f"xbzrle transferred: {cache['bytes'] >> 10} kbytes",
                f"xbzrle pages: {cache['pages']} pages",
                f"xbzrle cache miss: {cache['cache-miss']} pages",
                f"xbzrle cache miss rate: {cache['cache-miss-rate']:0.2f}",
                f"xbzrle encoding rate: {cache['encoding-rate']:0.2f}",
                f"xbzrle overflow: {cache['overflow']}"]
    if "cpu-throttle-percentage" in info:
        out.append(f"cpu throttle percentage: {info['cpu-throttle-percentage']}")
    if "dirty-limit-throttle-time-per-round" in info:
        out.append(f"dirty-limit throttle time: {info['dirty-limit-throttle-time-per-round']} us")
    if stalled := info.get("x-stalled"):  # livemig's verdict: not converging
        out.append(f"not converging: dirty rate {stalled['dirty-rate'] >> 10} kbytes/s, bandwidth "
                   f"{stalled['bandwidth'] >> 10} kbytes/s, expected downtime {stalled['expected-downtime']} ms "
                   f"(limit {stalled['downtime-limit']} ms)")
    return "".join(f"{line}\n" for line in out)


def format_dirty_rate(info: dict) -> str:
    """QEMU's `info dirty_rate` text."""
    out = [f"Status: {info['status']}", f"Start Time: {info['start-time']} (ms)"]
    if info["mode"] == "page-sampling":
        out.append(f"Sample Pages: {info['sample-pages']} (per GB)")
    out += [f"Period: {info['calc-time']} (sec)", f"Mode: {info['mode']}"]
    if "dirty-rate" in info:
        out.append(f"Dirty rate: {info['dirty-rate']} (MB/s)")
        out += [f"vcpu[{v['id']}], Dirty rate: {v['dirty-rate']} (MB/s)" for v in info.get("vcpu-dirty-rate", [])]
    else:
        out.append("Dirty rate: (not ready)")
    return "".join(f"{line}\n" for line in out)


def format_parameter(name: str, value) -> str:
    if isinstance(value, bool):
        text = "on" if value else "off"
    elif isinstance(value, str):
        text = value if name in PARAMETERS and PARAMETERS[name].choices else f"'{value}'"
    else:
        text = f"{value}{PARAMETERS[name].unit if name in PARAMETERS else ''}"
    return f"{name}: {text}\n"


def format_parameters(params: dict) -> str:
    names = [n for n in PARAMETERS if n in params] + [n for n in params if n not in PARAMETERS]
    return "".join(format_parameter(n, params[n]) for n in names)


# commands -----------------------------------------------------------------------------------------
@hmp("help", "[command]")
async def hmp_help(q: Execute, a: dict) -> str:
    """show the help of every command, or of one"""
    names = sorted(HMP) if a["command"] is None else [ALIASES.get(a["command"], a["command"])]
    out = []
    for name in names:
        cmd = HMP.get(name) or HMP.get(f"info {name}")
        if cmd is None:
            raise UsageError(f"unknown command '{name}'")
        out.append(cmd.describe())
    return "".join(out)


@hmp("info status")
async def hmp_info_status(q: Execute, a: dict) -> str:
    """show the current VM status (running|paused)"""
    return format_status(await q("query-status", {}))


@hmp("info migrate")
async def hmp_info_migrate(q: Execute, a: dict) -> str:
    """show migration status"""
    return format_migrate(await q("query-migrate", {}))


@hmp("info migrate_parameters")
async def hmp_info_parameters(q: Execute, a: dict) -> str:
    """show current migration parameters"""
    return format_parameters(await q("query-migrate-parameters", {}))


@hmp("info migrate_capabilities")
async def hmp_info_capabilities(q: Execute, a: dict) -> str:
    """show current migration capabilities"""
    caps = await q("query-migrate-capabilities", {})
    return "".join(f"{c['capability']}: {'on' if c['state'] else 'off'}\n" for c in caps)


@hmp("migrate", "[-d] [-b] [-i] uri")
async def hmp_migrate(q: Execute, a: dict) -> str:
    """migrate to URI; without -d, return only once the migration has ended; -b copies whole
    disks, -i only what the top image allocates over a shared base"""
    args = {"uri": a["uri"]}
    if a["b"]:
        args["blk"] = True
    if a["i"]:
        args["inc"] = True
    await q("migrate", args)
    if a["d"]:
        return ""
    # Suspend only this client (its session runs one command at a time): poll from here,
    # so that the coordinator is never held by a request that lasts as long as the migration.
    while (info := await q("query-migrate", {})).get("status") not in MIGRATION_END:
        await asyncio.sleep(POLL)
    return f"{info['error-desc']}\n" if info["status"] != "completed" and info.get("error-desc") else ""


@hmp("calc_dirty_rate", "[-r] [-b] second [sample_pages_per_GB]")
async def hmp_calc_dirty_rate(q: Execute, a: dict) -> str:
    """start measuring the dirty rate over SECOND seconds: by page sampling, or with -b every
    vCPU's exact count of the pages it writes (-r: the same, per vCPU)"""
    if a["r"] and a["b"]:
        raise UsageError("Either -r or -b option can be specified", bare=True)
    try:
        args: dict = {"calc-time": int(a["second"])}
        if a["sample_pages_per_GB"] is not None:
            args["sample-pages"] = int(a["sample_pages_per_GB"])
    except ValueError:
        raise UsageError("invalid integer") from None
    args["mode"] = "dirty-ring" if a["r"] else "dirty-bitmap" if a["b"] else "page-sampling"
    await q("calc-dirty-rate", args)
    return (f"Starting dirty rate measurement with calc time {args['calc-time']} s\n"
            "[Please use 'info dirty_rate' to check results]\n")


@hmp("info dirty_rate")
async def hmp_info_dirty_rate(q: Execute, a: dict) -> str:
    """show dirty rate information"""
    return format_dirty_rate(await q("query-dirty-rate", {}))


@hmp("set_vcpu_dirty_limit", "dirty_rate [cpu_index]")
async def hmp_set_vcpu_dirty_limit(q: Execute, a: dict) -> str:
    """hold a vCPU's (every vCPU's) page-dirtying rate at DIRTY_RATE MB/s"""
    try:
        args = {"dirty-rate": int(a["dirty_rate"])}
        if a["cpu_index"] is not None:
            args["cpu-index"] = int(a["cpu_index"])
    except ValueError:
        raise UsageError("invalid integer") from None
    await q("set-vcpu-dirty-limit", args)
    return ""


@hmp("cancel_vcpu_dirty_limit", "[cpu_index]")
async def hmp_cancel_vcpu_dirty_limit(q: Execute, a: dict) -> str:
    """lift the dirty limit of a vCPU (of every vCPU)"""
    try:
        args = {} if a["cpu_index"] is None else {"cpu-index": int(a["cpu_index"])}
    except ValueError:
        raise UsageError("invalid integer") from None
    await q("cancel-vcpu-dirty-limit", args)
    return ""


@hmp("info vcpu_dirty_limit")
async def hmp_info_vcpu_dirty_limit(q: Execute, a: dict) -> str:
    """show the dirty limit of every limited vCPU"""
    limits = await q("query-vcpu-dirty-limit", {})
    if not limits:
        return "Dirty page limit not enabled!\n"
    return "".join(f"vcpu[{v['cpu-index']}], limit rate {v['limit-rate']} (MB/s), current rate "
                   f"{v['current-rate']} (MB/s)\n" for v in limits)


@hmp("migrate_cancel")
async def hmp_migrate_cancel(q: Execute, a: dict) -> str:
    """cancel the current VM migration"""
    await q("migrate_cancel", {})
    return ""


@hmp("x_migrate_resolve")
async def hmp_x_migrate_resolve(q: Execute, a: dict) -> str:
    """run the guest here if this host holds its last state after a lost hand-over; refuse if not"""
    result = await q("x-migrate-resolve", {})
    return f"the guest runs on the {result['holder']}\n"


@hmp("migrate_incoming", "uri")
async def hmp_migrate_incoming(q: Execute, a: dict) -> str:
    """wait for an incoming migration on URI (host started with --incoming defer)"""
    await q("migrate-incoming", {"uri": a["uri"]})
    return ""


@hmp("migrate_continue", "state")
async def hmp_migrate_continue(q: Execute, a: dict) -> str:
    """let a migration paused in STATE (pre-switchover) continue"""
    if a["state"] not in set(MigrationStatus):
        raise ActorError(f"invalid parameter value: {a['state']}")
    await q("migrate-continue", {"state": a["state"]})
    return ""


@hmp("migrate_set_parameter", "parameter value")
async def hmp_migrate_set_parameter(q: Execute, a: dict) -> str:
    """set a migration parameter (sizes take B/K/M/G/T suffixes, max-bandwidth is in MB
    without one; switches are on|off)"""
    name, text = a["parameter"], a["value"]
    row = PARAMETERS.get(name)  # one livemig lacks is refused by migrate-set-parameters
    if row is None:
        raise ActorError(f"invalid parameter value: {name}")
    if row.type is bool:
        value: object = on_off(text)
    elif row.type is int:
        try:
            shift = row.size_shift
            value = parse_size(text, shift) if shift is not None else int(text, 0)
        except ValueError:
            raise UsageError(f"invalid integer '{text}'") from None
    else:
        value = text
    await q("migrate-set-parameters", {name: value})
    return ""


@hmp("migrate_set_capability", "capability state")
async def hmp_migrate_set_capability(q: Execute, a: dict) -> str:
    """turn a migration capability on or off"""
    if a["capability"] not in CAPABILITIES:  # one livemig lacks is refused by migrate-set-capabilities
        raise ActorError(f"invalid parameter value: {a['capability']}")
    await q("migrate-set-capabilities",
            {"capabilities": [{"capability": a["capability"], "state": on_off(a["state"])}]})
    return ""


@hmp("stop")
async def hmp_stop(q: Execute, a: dict) -> str:
    """stop emulation"""
    await q("stop", {})
    return ""


@hmp("quit")
async def hmp_quit(q: Execute, a: dict) -> str:
    """quit the emulator"""
    await q("quit", {})
    return ""


@hmp("cont")
async def hmp_cont(q: Execute, a: dict) -> str:
    """resume emulation"""
    await q("cont", {})
    return ""
