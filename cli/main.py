"""The `livemig` command line. Every command that talks to a running host
speaks QMP to its monitor, the same path any QMP client takes."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import click

from livemig.actors.host import HostSpec, default_qmp, host_dir, run_host, runtime_root
from livemig.cli.progress import follow, print_summary
from livemig.cli.qmp_client import Qmp, connect
from livemig.cli.stream import stream
from livemig.machine.disk import DriveSpec
from livemig.machine.profile import PROFILES, profile
from livemig.machine.ram import FILLS
from livemig.machine.workload import WorkloadSpec
from livemig.protocol import units
from livemig.protocol.objects import ObjectError, ObjectStore, parse_option
from livemig.protocol.units import parse_size


def monitor_option(fn):
    fn = click.option("--qmp", "qmp", metavar="ADDR",
                      help="The host's QMP socket: unix:PATH, tcp:HOST:PORT or a path. "
                           "Default: the socket of the host named by --host.")(fn)
    fn = click.option("-H", "--host", "host", default=lambda: os.environ.get("LIVEMIG_HOST", "default"),
                      show_default="$LIVEMIG_HOST or 'default'", help="Name of a local host.")(fn)
    return fn


def size_arg(_ctx, _param, value):
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def object_arg(_ctx, _param, values):
    """--object as QEMU's -object, each checked as object-add would."""
    store = ObjectStore()
    try:
        for value in values:
            store.add(parse_option(value))
    except ObjectError as exc:
        raise click.BadParameter(str(exc)) from None
    return store.query()


def device_arg(_ctx, _param, values):
    from livemig.actors.coordinator.commands import parse_device

    try:
        devices = [parse_device(v) for v in values]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    ids = [d["id"] for d in devices]
    if len(set(ids)) != len(ids):
        raise click.BadParameter("device ids must be unique")
    return devices


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="livemig", message="livemig %(version)s (QEMU savevm stream v3)")
@click.option("-v", "--verbose", count=True,
              help="More log output: -v for INFO, -vv for DEBUG (hosts started from here too).")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False),
              help="Log level of this command and of the hosts it starts (default: $LIVEMIG_LOG or WARNING).")
def main(verbose: int, log_level: str | None) -> None:
    """livemig: live migration of running VM-like guests between hosts.

    Start a host with `livemig host`, migrate its guest with `livemig migrate`,
    or see the whole thing with `livemig demo`. Environment: LIVEMIG_HOST (the
    default -H), LIVEMIG_RUNDIR (where hosts keep their sockets), LIVEMIG_LOG
    (log level).
    """
    level = log_level or (LOG_LEVELS[max(0, 2 - verbose)] if verbose else os.environ.get("LIVEMIG_LOG"))
    if level:
        os.environ["LIVEMIG_LOG"] = level.upper()  # the actors of a host read it
    level = (level or "WARNING").upper()
    logging.basicConfig(level=level, format="%(levelname)s %(message)s")
    if level != "DEBUG":  # qemu.qmp logs every refused connection; our errors say it once
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


@main.command()
@click.option("--name", default=lambda: os.environ.get("LIVEMIG_HOST", "default"),
              show_default="$LIVEMIG_HOST or 'default'", help="Host name; other commands find it by -H NAME.")
@click.option("--machine", type=click.Choice(sorted(PROFILES)), default="pc", show_default=True,
              help="Machine type: pc (livemig vCPUs) or none (QEMU's -M none: RAM only, no vCPU).")
@click.option("--ram", "ram", default="256M", show_default=True, callback=size_arg,
              help="Size of the RAM block (K/M/G suffixes).")
@click.option("--ram-block", "ram_block", show_default="pc.ram for pc, ram for none",
              help="Name of the RAM block (QEMU names it after its memory backend's id).")
@click.option("--fill", type=click.Choice(FILLS), default="zero", show_default=True,
              help="Initial RAM: zero, random (incompressible) or half (odd pages zero).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the fill and the workload.")
@click.option("--vcpus", type=click.IntRange(0, 64), show_default="1; none has no vCPU",
              help="Number of vCPU processes running the workload (0 only with --machine none).")
@click.option("--workload", show_default="idle",
              help="idle | memtouch:rate=R,wss=S | stream:rate=R | diskwrite:iops=N,size=S | kv:rate=N "
                   "(R in bytes/s, kv's in steps/s; S in bytes; diskwrite and kv need --drive).")
@click.option("--incoming", metavar="URI|defer", help="Wait for an incoming migration on URI.")
@click.option("-S", "paused", is_flag=True, help="Do not start the guest (stay in prelaunch).")
@click.option("--qmp", "qmp", multiple=True, metavar="unix:PATH|tcp:HOST:PORT",
              help="QMP socket(s). Default: a private UNIX socket in the host's run directory.")
@click.option("--events", metavar="ENDPOINT", help="ZeroMQ PUB endpoint for events (default: ipc in the run dir).")
@click.option("--fd", "fds", type=int, multiple=True, help="An inherited descriptor that fd:N URIs may use.")
@click.option("--drive", "drives", multiple=True, metavar="file=PATH,format=qcow2|raw,id=NAME[,size=S]",
              help="A guest disk (repeatable); size= creates the image if it does not exist.")
@click.option("--device", "devices", multiple=True, metavar="DRIVER,id=ID", callback=device_arg,
              help="A guest device; no-migrate,id=X cannot be migrated and blocks migration "
                   "until device_del X.")
@click.option("--object", "objects", multiple=True, callback=object_arg,
              metavar="TYPE,id=ID[,PROP=VALUE...]|JSON",
              help="An object as QEMU's -object: tls-creds-x509,id=tls0,dir=DIR,endpoint=server "
                   "(or client), authz-simple,id=auth0,identity=O=livemig,,CN=client, authz-list "
                   "(JSON, or rules.0.match=...); see docs/security.md.")
@click.option("--json", "as_json", is_flag=True, help="Announce readiness as one JSON line.")
def host(name, machine, ram, ram_block, fill, seed, vcpus, workload, incoming, paused, qmp, events, fds,
         drives, devices, objects, as_json) -> None:
    """Run a host with one guest until it is told to quit (or Ctrl-C)."""
    machine_profile = profile(machine)
    if not machine_profile.has_vcpus:
        # A `none` guest is RAM only on the wire, like QEMU's -M none. vCPUs may
        # still run a workload on its RAM; their state stays on this host.
        if workload is not None and not vcpus:
            raise click.BadParameter(f"machine {machine!r} runs a workload only with --vcpus N "
                                     "(whose state is not migrated)", param_hint="--workload")
        if drives:
            raise click.BadParameter(f"machine {machine!r} has no disks (its vCPUs would drive them)",
                                     param_hint="--drive")
        vcpus = vcpus or 0
    elif vcpus == 0:
        raise click.BadParameter(f"machine {machine!r} needs at least one vCPU", param_hint="--vcpus")
    vcpus = 1 if vcpus is None else vcpus
    workload = workload or "idle"
    ram_block = ram_block or machine_profile.ram_block
    try:
        WorkloadSpec.parse(workload)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--workload") from None
    try:
        drive_specs = [DriveSpec.parse(d, i).to_dict() for i, d in enumerate(drives)]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--drive") from None
    spec = HostSpec(name=name, machine=machine, blocks=[(ram_block, ram)], fill=fill, seed=seed,
                    vcpus=vcpus, workload=workload, incoming=incoming, autostart=not paused,
                    qmp=list(qmp), events=events, fds=list(fds), drives=drive_specs, devices=devices,
                    objects=objects)

    def announce(cfg: dict) -> None:
        info = {"name": name, "qmp": cfg["qmp"][0], "events": cfg["events"], "pid": os.getpid()}
        if as_json:
            print(json.dumps(info), flush=True)
        else:
            click.echo(f"livemig host {name} ready: QMP {info['qmp']}, events {info['events']}")
    try:
        code = run_host(spec, announce)
    except (ValueError, OSError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


def speed_value(text: str) -> int:
    """SPEED as set-speed and migrate --bandwidth take it: bytes/s, K/M/G suffixes, 0 = unlimited."""
    try:
        value = parse_size(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if value == 0 and parse_size(text, 10) != 0:  # '0.5' is not 0: refuse it rather than unlimit
        raise click.BadParameter(f"{text!r} is less than one byte/s (0 means unlimited; "
                                 "suffixes K, M, G)")
    return value


def downtime_value(text: str) -> int:
    """DOWNTIME in ms: a bare number is ms, as virsh's migrate-setmaxdowntime takes it;
    or with a unit, as QEMU's HMP takes it: 300ms, 0.3s, 300000us."""
    t = text.strip().lower()
    try:
        seconds = units.parse_seconds(t) if t[-1:].isalpha() else float(t) / 1000
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if seconds < 0 or seconds != seconds:
        raise click.BadParameter(f"downtime must not be negative: {text!r}")
    ms = seconds * 1000
    if abs(ms - round(ms)) > 1e-6:
        raise click.BadParameter(f"{text!r} is not a whole number of milliseconds")
    return int(round(ms))


SPEED_HELP = "bytes/s with K/M/G suffixes (a bare number is bytes/s); 0 = unlimited"
DOWNTIME_HELP = "a bare number is milliseconds (as virsh's migrate-setmaxdowntime); or 300ms, 0.3s"


# virsh migrate's flags: each turns a capability on (first) on the source.
CAPABILITY_FLAGS = {"auto_converge": ("--auto-converge", "auto-converge"),
                    "postcopy": ("--postcopy", "postcopy-ram"), "parallel": ("--parallel", "multifd")}


def tls_creds_id(mon: Qmp) -> str:
    """--tls: the id of the host's one client tls-creds-x509 object."""
    ids = [o["id"] for o in mon("x-query-objects")
           if o["qom-type"] == "tls-creds-x509" and o.get("endpoint") == "client"]
    if len(ids) != 1:
        raise click.ClickException(
            f"--tls needs exactly one tls-creds-x509 object with endpoint=client on the host; it has "
            f"{len(ids)} (livemig host --object tls-creds-x509,id=tls0,dir=DIR,endpoint=client)")
    return ids[0]


def migration_settings(mon: Qmp, flags: dict, params: dict) -> tuple[list[dict], dict]:
    """The capabilities virsh's flags ask for, refused in one line if the host lacks one,
    and the parameters that go with them. return-path is always on, as libvirt turns it
    on for every migration it runs (QEMU's default, off, leaves a source blind to a
    destination that failed)."""
    have = {c["capability"] for c in mon("query-migrate-capabilities")}
    caps = [{"capability": "return-path", "state": True}]
    for key, (flag, cap) in CAPABILITY_FLAGS.items():
        if flags[key]:
            if cap not in have:
                raise click.ClickException(f"{flag} needs capability {cap}, which this livemig host lacks")
            caps.append({"capability": cap, "state": True})
    if flags["tls"]:
        params["tls-creds"] = tls_creds_id(mon)
    return caps, params


def requires(flag: str, needs: str):
    """A click callback: FLAG's value is only taken together with NEEDS."""
    def check(ctx, _param, value):
        if value not in (None, False) and not ctx.params.get(needs.lstrip("-").replace("-", "_")):
            raise click.UsageError(f"--{flag} needs {needs}")
        return value
    return check


@main.command()
@click.argument("uri")
@click.option("-d", "--detach", is_flag=True, help="Return at once instead of showing progress.")
@click.option("--json", "as_json", is_flag=True, help="Print the final query-migrate as JSON.")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=3600, show_default=True,
              metavar="SECONDS", help="Give up waiting after this many seconds (the migration goes on).")
@click.option("--blk", is_flag=True, help="Block migration: copy whole disks with the RAM (QMP blk).")
@click.option("--inc", is_flag=True,
              help="Incremental block migration: copy only what the top image allocates over a "
                   "shared backing file (QMP inc).")
@click.option("--bandwidth", metavar="SPEED", help=f"Set max-bandwidth first: {SPEED_HELP}.")
@click.option("--downtime", metavar="DOWNTIME", help=f"Set downtime-limit first: {DOWNTIME_HELP}.")
@click.option("--auto-converge", "auto_converge", is_flag=True, is_eager=True,
              help="Throttle the vCPUs when they dirty RAM faster than it goes (capability auto-converge).")
@click.option("--auto-converge-initial", type=click.IntRange(1, 99), metavar="PERCENT",
              callback=requires("auto-converge-initial", "--auto-converge"),
              help="The first throttle, in % (cpu-throttle-initial; default 20).")
@click.option("--auto-converge-increment", type=click.IntRange(1, 99), metavar="PERCENT",
              callback=requires("auto-converge-increment", "--auto-converge"),
              help="Each further step, in % (cpu-throttle-increment; default 10).")
@click.option("--postcopy", is_flag=True, is_eager=True,
              help="Allow post-copy (capability postcopy-ram; the destination needs it too): "
                   "switch with `livemig hmp migrate_start_postcopy` or --postcopy-after-precopy.")
@click.option("--postcopy-after-precopy", "after_precopy", is_flag=True,
              callback=requires("postcopy-after-precopy", "--postcopy"),
              help="Switch to post-copy by itself after the first pass (x-postcopy-after-passes 1).")
@click.option("--tls", is_flag=True, is_eager=True,
              help="Encrypt with the host's client tls-creds-x509 object (parameter tls-creds).")
@click.option("--tls-destination", metavar="NAME", callback=requires("tls-destination", "--tls"),
              help="The name the destination's certificate must carry (tls-hostname; default: the tcp host).")
@click.option("--parallel", is_flag=True, is_eager=True,
              help="Send pages over several connections (capability multifd).")
@click.option("--parallel-connections", type=click.IntRange(1, 255), metavar="N",
              callback=requires("parallel-connections", "--parallel"),
              help="How many (multifd-channels; default 2).")
@monitor_option
def migrate(uri, detach, as_json, timeout, blk, inc, bandwidth, downtime, auto_converge, auto_converge_initial,
            auto_converge_increment, postcopy, after_precopy, tls, tls_destination, parallel,
            parallel_connections, host, qmp) -> None:
    """Migrate the host's guest to URI: tcp:HOST:PORT, unix:PATH, exec:CMD, fd:N, file:PATH.
    The flags are virsh migrate's; what they set stays set on the host."""
    params = {}
    if bandwidth is not None:
        params["max-bandwidth"] = speed_value(bandwidth)
    if downtime is not None:
        params["downtime-limit"] = downtime_value(downtime)
    for key, value in (("cpu-throttle-initial", auto_converge_initial),
                       ("cpu-throttle-increment", auto_converge_increment),
                       ("x-postcopy-after-passes", 1 if after_precopy else None),
                       ("tls-hostname", tls_destination), ("multifd-channels", parallel_connections)):
        if value is not None:
            params[key] = value
    args = {"uri": uri, **({"blk": True} if blk else {}), **({"inc": True} if inc else {})}
    flags = {"auto_converge": auto_converge, "postcopy": postcopy, "parallel": parallel, "tls": tls}
    mon = connect(host, qmp)
    try:
        caps, params = migration_settings(mon, flags, params)
        mon("migrate-set-capabilities", capabilities=caps)
        if params:
            mon("migrate-set-parameters", **params)
        mon("migrate", **args)
        if detach:
            click.echo(f"migration to {uri} started; `livemig info -H {host}` follows it")
            return
        info = follow(mon, timeout, quiet=as_json)
    finally:
        mon.close()
    if as_json:
        click.echo(json.dumps(info))
    else:
        print_summary(info)
    if info.get("status") != "completed":
        sys.exit(1)


@main.command()
@click.option("--json", "as_json", is_flag=True,
              help="Print query-status, query-migrate, query-migrate-parameters and the capabilities "
                   "as one JSON object.")
@monitor_option
def info(as_json, host, qmp) -> None:
    """Run state, migration status and statistics, parameters."""
    mon = connect(host, qmp)
    try:
        out = {"status": mon("query-status"), "migration": mon("query-migrate"),
               "parameters": mon("query-migrate-parameters"),
               "capabilities": {c["capability"]: c["state"] for c in mon("query-migrate-capabilities")}}
    finally:
        mon.close()
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"guest: {out['status']['status']}")
    mig = out["migration"]
    if mig:
        print_summary(mig)
    else:
        click.echo("migration: none yet")
    params = out["parameters"]
    click.echo(f"max-bandwidth: {params['max-bandwidth']} bytes/s, downtime-limit: {params['downtime-limit']} ms")


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per host, in a list.")
def list_hosts(as_json) -> None:
    """The hosts in the run directory: name, guest, run state, migration status."""
    rows = [host_row(name) for name in sorted(os.listdir(runtime_root()))
            if os.path.isdir(host_dir(name))] if os.path.isdir(runtime_root()) else []
    if as_json:
        click.echo(json.dumps(rows))
        return
    if not rows:
        click.echo(f"no hosts in {runtime_root()}")
        return
    width = {k: max(len(k), *(len(r[k]) for r in rows)) for k in ("name", "state", "migration")}
    for r in [{k: k.upper() for k in (*width, "guest")}, *rows]:
        click.echo(" ".join(f"{r[k]:<{w}}" for k, w in width.items()) + f" {r['guest']}")


def host_row(name: str) -> dict:
    """One host of `livemig list`; a host that does not answer is shown as such."""
    try:
        mon = Qmp(default_qmp(name), timeout=2)
    except click.ClickException:
        return {"name": name, "state": "not running", "migration": "-", "guest": "-"}
    try:
        guest = mon("x-query-host")["guest"]
        state = mon("query-status")["status"]
        migration = mon("query-migrate").get("status", "none")
    finally:
        mon.close()
    ram = sum(size for _block, size in guest["blocks"])
    desc = f"{ram >> 20} MiB, {guest['vcpus']} vCPU, {guest['workload']}"
    return {"name": name, "state": state, "migration": migration, "guest": desc}


@main.command("quit")
@monitor_option
def quit_host(host, qmp) -> None:
    """Stop the host and its guest (QMP quit)."""
    mon = connect(host, qmp)
    try:
        mon("quit")
    finally:
        mon.close()
    click.echo(f"host {host if qmp is None else qmp} quits")


@main.command()
@monitor_option
def cancel(host, qmp) -> None:
    """Cancel the migration in progress (harmless when none runs)."""
    mon = connect(host, qmp)
    try:
        before = mon("query-migrate").get("status")
        mon("migrate_cancel")
    finally:
        mon.close()
    if before in ("setup", "active", "pre-switchover", "device", "postcopy-active"):
        click.echo(f"migration cancel requested (it was {before})")
    else:
        click.echo("no migration in progress: nothing to cancel")


@main.command("set-speed", context_settings={"ignore_unknown_options": True})
@click.argument("speed")
@monitor_option
def set_speed(speed, host, qmp) -> None:
    """Limit migration bandwidth to SPEED: bytes/s with K/M/G suffixes
    (a bare number is bytes/s, 1M = 1 MiB/s); 0 = unlimited."""
    value = speed_value(speed)
    mon = connect(host, qmp)
    try:
        mon("migrate-set-parameters", **{"max-bandwidth": value})
    finally:
        mon.close()
    click.echo(f"max-bandwidth: {value} bytes/s" + (" (unlimited)" if value == 0 else ""))


@main.command("set-downtime", context_settings={"ignore_unknown_options": True})
@click.argument("downtime")
@monitor_option
def set_downtime(downtime, host, qmp) -> None:
    """Allow the guest to be paused at most DOWNTIME at switchover: a bare number
    is milliseconds (as virsh's migrate-setmaxdowntime takes it); or with a unit,
    as QEMU's HMP takes it: 300ms, 0.3s."""
    value = downtime_value(downtime)
    mon = connect(host, qmp)
    try:
        mon("migrate-set-parameters", **{"downtime-limit": value})
    finally:
        mon.close()
    click.echo(f"downtime-limit: {value} ms")


# What QEMU's human monitor prints when a command failed (it exits 0; we do not).
HMP_ERRORS = ("unknown command:", "Error:")


@main.command()
@click.argument("line")
@monitor_option
def hmp(line, host, qmp) -> None:
    """Run one human monitor (HMP) command LINE, such as 'info migrate'.

    'help' lists the commands. Without -d, 'migrate URI' returns only when the
    migration has ended, as QEMU's monitor does. Exits 1 when the command
    failed (unknown command, bad arguments, an error)."""
    mon = connect(host, qmp)
    try:
        out = mon("human-monitor-command", **{"command-line": line})
    finally:
        mon.close()
    failed = out.startswith(HMP_ERRORS) or 'Try "help' in out
    click.echo(out.replace("\r\n", "\n"), nl=False, err=failed)
    if failed:
        sys.exit(1)


@main.command()
@click.argument("endpoint", required=False)
@click.option("--count", type=int, default=0, help="Stop after this many events (0: never).")
@click.option("--timeout", type=float, default=0, metavar="SECONDS",
              help="Stop after this many seconds (0: never).")
@monitor_option
def events(endpoint, count, timeout, host, qmp) -> None:
    """Print a host's events as JSON lines (ENDPOINT: its ZeroMQ PUB socket)."""
    import zmq

    from livemig.protocol.events import decode

    if endpoint is None:
        mon = connect(host, qmp)
        try:
            endpoint = mon("x-query-host")["events"]
        finally:
            mon.close()
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(endpoint)
    seen = 0
    deadline = time.monotonic() + timeout if timeout else None
    try:
        while not count or seen < count:
            wait = 1000 if deadline is None else int(max(0, deadline - time.monotonic()) * 1000)
            if deadline is not None and wait == 0:
                break
            if sub.poll(wait):
                body = decode(sub.recv_multipart())
                body.pop("qmp", None)
                click.echo(json.dumps(body), nl=True)
                sys.stdout.flush()
                seen += 1
    except KeyboardInterrupt:
        pass
    finally:
        ctx.destroy(linger=0)


@main.command()
@click.option("--ram", default="256M", show_default=True, callback=size_arg, help="Guest RAM size.")
@click.option("--workload", default=None, help="Workload spec (default: memtouch that converges).")
@click.option("--uri", default=None, help="Migration URI (default: tcp on a free loopback port).")
@click.option("--seed", type=int, default=42, show_default=True,
              help="Seed of the guest's fill and workload (the replay uses the same).")
@click.option("--vcpus", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Number of vCPU processes running the workload.")
@click.option("--disk", is_flag=True, help="Give the guest a shared qcow2 disk and a diskwrite workload.")
@click.option("--keep", type=click.Path(file_okay=False), help="Leave the disk and its replay image in this directory.")
@click.option("--postcopy", is_flag=True,
              help="A guest dirtying 4x a 16 MB/s link, moved by post-copy (after two pre-copy passes).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def demo(ram, workload, uri, seed, vcpus, disk, keep, postcopy, as_json) -> None:
    """Migrate a running guest between two local hosts and verify it by replay."""
    from livemig.tools.demo import run_demo

    result = run_demo(ram=ram, workload=workload, uri=uri, seed=seed, vcpus=vcpus, quiet=as_json,
                      disk=disk or keep is not None, keep=keep, postcopy=postcopy)
    if as_json:
        click.echo(json.dumps(result))
    v = result["verify"]
    ok = result["status"] == "completed" and v["ram-equal"] and v["vcpu-equal"] and v.get("disk-equal", True)
    sys.exit(0 if ok else 1)


@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("scenario")
@click.argument("results_dir", required=False)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Results directory (default: rig-results/NAME-TIME).")
@click.option("--loopback", is_flag=True, help="No namespaces: hosts share loopback, links are not shaped.")
def rig(scenario, results_dir, out_dir, loopback) -> None:
    """Run SCENARIO.toml: hosts in network namespaces joined by shaped links,
    guests, migrations (sequential, evacuations, a parameter matrix), events
    collected, a report with plots. `livemig rig report DIR` rebuilds a report."""
    from livemig.tools.rig import Rig, RigError, Scenario
    from livemig.tools.rig_report import PLOTS_MISSING, plots_available, report

    if scenario == "report":
        if not results_dir:
            raise click.UsageError("livemig rig report RESULTS_DIR")
        if not os.path.isfile(os.path.join(results_dir, "summary.json")):
            raise click.ClickException(f"{results_dir}: not a rig results directory (no summary.json)")
        click.echo(f"report: {report(results_dir)}")
        if not plots_available():
            click.echo(PLOTS_MISSING, err=True)
        return
    try:
        spec = Scenario.load(scenario)
    except OSError as exc:
        raise click.ClickException(f"{scenario}: {exc.strerror or exc}") from None
    except (RigError, ValueError) as exc:
        raise click.ClickException(f"{scenario}: {exc}") from None
    try:
        out = out_dir or os.path.join("rig-results", f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        results = Rig(spec, out, loopback=loopback).execute()
    except (RigError, OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    path = report(out)
    for r in results:
        click.echo(rig_line(r))
    click.echo(f"report: {path}")
    if not plots_available():
        click.echo(PLOTS_MISSING, err=True)


def rig_line(r: dict) -> str:
    """One migration of a rig run, in a line: its verdict first."""
    if not r["converged"] and r["status"] in ("cancelled", "completed"):
        note = f"not converged in time{', stalled' if r.get('x-stalled') else ''}, expected downtime " \
               f"{r.get('expected-downtime', '-')} ms"
        if "cancel-time" in r:
            note += f", cancelled in {r['cancel-time']} ms"
    elif r["status"] == "completed":
        note = f"downtime {r.get('downtime', '-')} ms" + (", verified" if r.get("verified") else "")
        if r.get("downtime-limit") is not None and r.get("downtime", 0) > r["downtime-limit"]:
            note += f", over the {r['downtime-limit']} ms limit"
    else:
        note = r.get("error-desc") or ""
    if "peak-cpu-throttle-percentage" in r:
        note += f", cpu throttle up to {r['peak-cpu-throttle-percentage']} %"
    rate = f", {r['mbps']:.0f} Mbit/s" if r.get("mbps") else ""
    return f"{r['run']} {r['guest']} {r['from']}->{r['to']}: {r['status']} ({note}){rate}"


main.add_command(stream)


@main.command()
@click.option("--quick", is_flag=True,
              help="Only the raw tcp baseline and the stopped 1 GiB guest over tcp (under a minute); "
                   "the last line is the throughput ratio.")
@click.option("--out", default="bench", show_default=True, help="Directory for results.json, summary.md, PNGs.")
@click.option("--repeat", type=click.IntRange(1, 20), default=3, show_default=True,
              help="Runs per figure; medians are reported.")
@click.option("--only", "sections", multiple=True,
              type=click.Choice(["stopped", "zero", "running", "scaling", "qcow2", "tls", "converge",
                                 "postcopy", "xbzrle", "multifd"]),
              help="Run only these sections of the full benchmark (repeatable).")
def bench(quick, out, repeat, sections) -> None:
    """Measure migration throughput and downtime against raw sockets, side by side."""
    from livemig.tools.bench.cli import run_bench

    try:
        run_bench(out=out, quick=quick, repeat=repeat, sections=tuple(sections))
    except (RuntimeError, TimeoutError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


if __name__ == "__main__":
    main(prog_name="livemig")
