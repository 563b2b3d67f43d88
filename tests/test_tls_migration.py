"""Migrations over TLS between real hosts on loopback, checked by replay:
QEMU's objects and parameters, client certificates and tls-authz, the
refusals (each naming its cause, nothing started, the destination still
ready), and one connection with one deadline."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import livemig.protocol
from livemig.tools.tls_certs import make_pki
from tests.conftest import guest_args, replay_matches

RUNNING = guest_args(workload="memtouch:rate=4M,wss=8M")
AUTHZ = "authz-simple,id=auth0,identity=O=livemig,,CN=client"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def x509(path, endpoint: str, *extra: str) -> tuple[str, str]:
    return ("--object", ",".join([f"tls-creds-x509,id=tls0,dir={path},endpoint={endpoint}", *extra]))


def uri_for(transport: str, tmp_path, port: int) -> str:
    return f"tcp:127.0.0.1:{port}" if transport == "tcp" else f"unix:{tmp_path}/mig-{time.monotonic_ns()}.sock"


def tls_destination(hosts, pki, uri: str, authz: bool = True, timeout: int | None = None):
    dst = hosts.start("dst", *RUNNING, "--incoming", "defer", *x509(pki.server, "server"),
                      *(("--object", AUTHZ) if authz else ()))
    params = {"tls-creds": "tls0", **({"tls-authz": "auth0"} if authz else {})}
    if timeout:
        params["x-transport-timeout"] = timeout
    dst.cmd("migrate-set-parameters", **params)
    dst.cmd("migrate-incoming", uri=uri)
    return dst


def tls_source(hosts, creds_dir, uri: str, name: str = "src", *extra: str):
    src = hosts.start(name, *RUNNING, *x509(creds_dir, "client", *extra))
    params = {"tls-creds": "tls0", "max-bandwidth": 0}
    if uri.startswith("unix:"):
        params["tls-hostname"] = "localhost"  # a unix socket has no host name to check
    src.cmd("migrate-set-parameters", **params)
    return src


def completes(src, dst, tmp_path, uri: str) -> dict:
    src.cmd("migrate", uri=uri)
    info = src.wait_migration(120)
    assert info["status"] == "completed", info
    got = dst.wait_migration(60)
    assert got["status"] == "completed", got
    dst.wait_status("running", 30)
    result = replay_matches(dst, tmp_path)
    assert result["ram_equal"] and result["vcpu_equal"], result
    return got


def fails_and_runs_on(src, uri: str) -> str:
    """The source's migration fails, and its guest runs on."""
    src.cmd("migrate", uri=uri)
    info = src.wait_migration(60)
    assert info["status"] == "failed", info
    src.wait_status("running", 30)
    return info["error-desc"]


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_running_guest_over_tls(hosts, pki, tmp_path, port, transport):
    uri = uri_for(transport, tmp_path, port)
    dst = tls_destination(hosts, pki, uri)
    src = tls_source(hosts, pki.client, uri)
    got = completes(src, dst, tmp_path, uri)
    assert got["x-tls"]["peer"] == "O=livemig,CN=client"
    assert got["x-tls"]["version"] == "TLSv1.3" and got["x-tls"]["cipher"].startswith("TLS_AES_")
    assert src.cmd("query-migrate")["x-tls"]["cipher"] == got["x-tls"]["cipher"]


def test_postcopy_over_tls(hosts, pki, tmp_path, port):
    """Page requests come back inside the session while the writer sends:
    the return-path thread reads through the channel's engine lock."""
    uri = f"tcp:127.0.0.1:{port}"
    guest = guest_args(ram="32M", workload="memtouch:rate=16M,wss=24M")
    dst = hosts.start("dst", *guest, "--incoming", "defer", *x509(pki.server, "server"))
    src = hosts.start("src", *guest, *x509(pki.client, "client"))
    for h in (src, dst):
        h.cmd("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": True}])
    dst.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
    dst.cmd("migrate-incoming", uri=uri)
    src.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "max-bandwidth": 16 << 20,
                                         "x-postcopy-after-passes": 2})
    got = completes(src, dst, tmp_path, uri)
    assert got["x-tls"]["version"] == "TLSv1.3"
    assert src.cmd("query-migrate")["ram"]["postcopy-bytes"] > 0


def test_denied_dn_is_refused_then_the_right_source_migrates(hosts, pki, tmp_path, port):
    uri = f"tcp:127.0.0.1:{port}"
    dst = tls_destination(hosts, pki, uri)
    intruder = tls_source(hosts, pki.client_other, uri, "intruder")
    desc = fails_and_runs_on(intruder, uri)
    # Under TLS 1.3 the source only sees the door shut after its handshake.
    assert "the destination closed the TLS session" in desc, desc
    info = dst.cmd("query-migrate")
    assert info["status"] == "setup", info  # still listening; nothing loaded, nothing runs
    assert info["x-refused"] == ["TLS client 'O=livemig,CN=intruder' is not allowed by authz-simple 'auth0'"]
    assert dst.cmd("query-status")["status"] == "inmigrate"
    completes(tls_source(hosts, pki.client, uri), dst, tmp_path, uri)


def test_rogue_plaintext_and_rogue_certificate_first(hosts, pki, tmp_path, port):
    """Both connect before the real source; both are refused, each with its
    cause, and the real migration then completes."""
    uri = f"tcp:127.0.0.1:{port}"
    dst = tls_destination(hosts, pki, uri, authz=False)
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.sendall(b"QEVM\0\0\0\x03")  # a plaintext stream
        deadline = time.monotonic() + 10
        while not dst.cmd("query-migrate").get("x-refused"):
            assert time.monotonic() < deadline, "the plaintext connection was not refused"
            time.sleep(0.05)
    rogue = tls_source(hosts, pki.client_rogue, uri, "rogue", "sanity-check=off")
    fails_and_runs_on(rogue, uri)
    refused = dst.cmd("query-migrate")["x-refused"]
    assert refused[0] == "TLS handshake failed: the source does not speak TLS (a plaintext migration?)"
    assert refused[1] == ("TLS handshake failed: the source's client certificate was refused: "
                          "unable to get local issuer certificate")
    completes(tls_source(hosts, pki.client, uri), dst, tmp_path, uri)


@pytest.mark.parametrize("side, creds, error", [
    ("source", "client_wrong_ca", "the destination's certificate was refused: self-signed certificate in certificate chain"),
    ("source", "hostname", "Hostname mismatch, certificate is not valid for 'other.example'"),
    ("source", "plaintext-destination", "the destination closed the connection during the TLS handshake"),
    ("destination", "server_expired", "the destination's certificate was refused: certificate has expired"),
])
def test_refusals_name_the_cause_and_leave_both_sides_ready(hosts, pki, tmp_path, port, side, creds, error):
    uri = f"tcp:127.0.0.1:{port}"
    if creds == "plaintext-destination":
        dst = hosts.start("dst", *RUNNING, "--incoming", uri)
    elif creds == "server_expired":
        dst = hosts.start("dst", *RUNNING, "--incoming", "defer",
                          *x509(pki.server_expired, "server", "sanity-check=off"))
        dst.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
        dst.cmd("migrate-incoming", uri=uri)
    else:
        dst = tls_destination(hosts, pki, uri, authz=False)
    src = tls_source(hosts, pki.client if creds in ("hostname", "plaintext-destination", "server_expired")
                     else getattr(pki, creds), uri)
    if creds == "hostname":
        src.cmd("migrate-set-parameters", **{"tls-hostname": "other.example"})
    assert error in fails_and_runs_on(src, uri)
    # Nothing started on the destination, which waits on (or, for a plaintext one
    # fed a ClientHello, has failed and takes a new migrate-incoming).
    assert dst.cmd("query-status")["status"] == "inmigrate"
    if creds != "plaintext-destination":
        assert dst.cmd("query-migrate")["status"] == "setup"


def test_configuration_mistakes_are_refused_before_anything_starts(hosts, pki, tmp_path):
    src = hosts.start("src", *RUNNING, *x509(pki.client, "client"))
    src.cmd("migrate-set-parameters", **{"tls-creds": "nosuch"})
    with pytest.raises(RuntimeError, match="No TLS credentials with id 'nosuch'"):
        src.cmd("migrate", uri="tcp:127.0.0.1:1")
    src.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
    with pytest.raises(RuntimeError, match="No hostname for certificate validation"):
        src.cmd("migrate", uri=f"unix:{tmp_path}/x.sock")
    with pytest.raises(RuntimeError, match="TLS does not apply to file: migrations"):
        src.cmd("migrate", uri=f"file:{tmp_path}/x.stream")
    assert src.cmd("query-migrate") == {}  # nothing started
    src.wait_status("running", 10)
    src.cmd("object-del", id="tls0")
    src.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(pki.server),
                             "endpoint": "server"})
    with pytest.raises(RuntimeError, match="a migration source needs endpoint=client"):
        src.cmd("migrate", uri="tcp:127.0.0.1:1")
    assert [o["id"] for o in src.cmd("x-query-objects")] == ["tls0"]
    with pytest.raises(RuntimeError, match="not supported: it needs Python >= 3.13"):
        src.cmd("object-add", **{"qom-type": "tls-creds-psk", "id": "psk0", "dir": str(tmp_path),
                                 "endpoint": "client"})


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_byte_drip_is_cut_off(hosts, pki, tmp_path, port, tls):
    """A peer that sends a byte every 0.5 s is cut off x-transport-timeout
    after it connected, and the destination takes a new migrate-incoming."""
    uri = f"tcp:127.0.0.1:{port}"
    if tls:
        dst = tls_destination(hosts, pki, uri, authz=False, timeout=3000)
    else:
        dst = hosts.start("dst", *RUNNING, "--incoming", "defer")
        dst.cmd("migrate-set-parameters", **{"x-transport-timeout": 3000})
        dst.cmd("migrate-incoming", uri=uri)
    stream = (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" if tls  # the start of a ClientHello
              else b"QEVM\0\0\0\x03\x07\0\0\0\x02pc") + b"\x01" * 100
    with socket.create_connection(("127.0.0.1", port)) as drip:
        t0 = time.monotonic()
        for b in stream:
            info = dst.cmd("query-migrate")
            if info["status"] == "failed" or info.get("x-refused") or time.monotonic() - t0 > 10:
                break
            try:
                drip.send(bytes([b]))
            except OSError:
                pass
            time.sleep(0.5)
        cut = time.monotonic() - t0
    if tls:  # the handshake never finished: refused, and still listening
        assert info["status"] == "setup" and "did not complete it within 3 s" in info["x-refused"][0], info
    else:
        assert info["status"] == "failed" and "no progress for 3 s (x-transport-timeout)" in info["error-desc"], info
    print(f"byte drip ({'tls' if tls else 'plaintext'}) cut off after {cut:.2f} s")
    assert 3 <= cut < 3 + 1 + 0.6, cut  # one drip period of slack for noticing
    assert dst.cmd("query-status")["status"] == "inmigrate"
    if not tls:
        dst.cmd("migrate-incoming", uri=uri)  # ready for the next one


def test_fd_socketpair_over_tls(hosts, pki, tmp_path):
    """fd: has no host name either: tls-hostname names the certificate to expect."""
    a, b = socket.socketpair()
    try:
        dst = hosts.start("dst", *RUNNING, "--incoming", "defer", "--fd", str(b.fileno()),
                          *x509(pki.server, "server"), "--object", AUTHZ, pass_fds=(b.fileno(),))
        dst.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "tls-authz": "auth0"})
        dst.cmd("migrate-incoming", uri=f"fd:{b.fileno()}")
        src = hosts.start("src", *RUNNING, "--fd", str(a.fileno()), *x509(pki.client, "client"),
                          pass_fds=(a.fileno(),))
        uri = f"fd:{a.fileno()}"
        with pytest.raises(RuntimeError, match="No hostname for certificate validation"):
            src.cmd("migrate-set-parameters", **{"tls-creds": "tls0"}) or src.cmd("migrate", uri=uri)
        src.cmd("migrate-set-parameters", **{"tls-hostname": "migration.test", "max-bandwidth": 0})
        got = completes(src, dst, tmp_path, uri)
        assert got["x-tls"]["peer"] == "O=livemig,CN=client"
    finally:
        a.close()
        b.close()


def test_objects_survive_a_coordinator_restart(hosts, pki, tmp_path, port):
    """Objects made by object-add outlive their coordinator: kill -9 it on
    both hosts, and x-query-objects still lists them and a TLS migration with
    a client certificate and tls-authz uses them."""
    from tests.test_handover import answers_within, coordinator_pid

    uri = f"tcp:127.0.0.1:{port}"
    dst = hosts.start("dst", *RUNNING, "--incoming", "defer")
    src = hosts.start("src", *RUNNING)
    dst.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(pki.server),
                             "endpoint": "server"})
    dst.cmd("object-add", **{"qom-type": "authz-simple", "id": "auth0", "identity": "O=livemig,CN=client"})
    dst.cmd("object-add", **{"qom-type": "authz-simple", "id": "gone", "identity": "O=x"})
    dst.cmd("object-del", id="gone")
    src.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(pki.client),
                             "endpoint": "client"})
    dst.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "tls-authz": "auth0"})
    src.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "max-bandwidth": 0})
    before = {h.name: h.cmd("x-query-objects") for h in (src, dst)}
    assert [o["id"] for o in before[dst.name]] == ["tls0", "auth0"]
    time.sleep(0.3)  # the coordinator writes its state every 50 ms
    for h in (src, dst):
        old = coordinator_pid(h)
        os.kill(old, signal.SIGKILL)
        time.sleep(0.1)
        answers_within(h, 30)
        assert coordinator_pid(h) != old
        assert h.cmd("x-query-objects") == before[h.name]
    dst.cmd("migrate-incoming", uri=uri)
    got = completes(src, dst, tmp_path, uri)
    assert got["x-tls"]["peer"] == "O=livemig,CN=client"


NOBODY = 65534


def _runs_as_nobody(exe: str, env: dict) -> bool:
    probe = subprocess.run(["runuser", "-u", "nobody", "--", exe, "-P", "-c", "import livemig.actors.host, numpy, zmq"],
                           env={**os.environ, **env}, capture_output=True, timeout=60)
    return probe.returncode == 0


def unprivileged_python(shim: Path) -> tuple[str, dict]:
    """An interpreter user nobody can run, with this checkout importable:
    this one, or (when it lives under root's private home, as pyenv's does)
    the system's Python of the same version over this one's site-packages."""
    if _runs_as_nobody(sys.executable, {}):
        return sys.executable, {}
    (shim / "livemig").symlink_to(Path(livemig.protocol.__file__).resolve().parents[1])  # the checkout
    paths = [str(shim), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
    exe = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin:/bin")
    if exe is None or not _runs_as_nobody(exe, env):
        pytest.skip(f"no Python {sys.version_info.major}.{sys.version_info.minor} that user nobody may run")
    return exe, env


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runuser"), reason="needs root to run hosts as nobody")
def test_tls_migration_as_an_unprivileged_user(hosts, port):
    """Both hosts run as user nobody, with their own private run directory
    and certificates only nobody can read: a running guest migrates over
    TLS with a client certificate and tls-authz, verified by replay."""
    from livemig.tools.bench.accounting import actor_pids
    from livemig.tools.launch import HostProcess

    base = Path(tempfile.mkdtemp(prefix="livemig-nobody-"))
    try:
        os.chmod(base, 0o755)
        shim = base / "shim"
        shim.mkdir()
        exe, env = unprivileged_python(shim)
        pki = make_pki(base / "pki")
        run, dump = base / "run", base / "dump"
        run.mkdir(mode=0o700)
        dump.mkdir(mode=0o700)
        for path in [base / "pki", *(base / "pki").rglob("*"), run, dump]:
            os.chown(path, NOBODY, NOBODY)
        env.update({"LIVEMIG_TEST_TAG": hosts.tag, "LIVEMIG_RUNDIR": str(run), "HOME": str(base)})
        # HostProcess runs sys.executable after the prefix: the shell swaps in `exe`.
        prefix = ("runuser", "-u", "nobody", "--", "/bin/sh", "-c", f'shift; exec {shlex.quote(exe)} "$@"', "sh")

        def start(name: str, *args: str) -> HostProcess:
            h = HostProcess(f"{name}-{uuid.uuid4().hex[:6]}", *RUNNING, *args, env=env, prefix=prefix, timeout=120)
            hosts.started.append(h)
            return h

        uri = f"tcp:127.0.0.1:{port}"
        dst = start("dst", "--incoming", "defer", *x509(pki.server, "server"), "--object", AUTHZ)
        src = start("src", *x509(pki.client, "client"))
        for h in (src, dst):
            coordinator = actor_pids(host_under(h.proc.pid))["coordinator"]
            assert os.stat(f"/proc/{coordinator}").st_uid == NOBODY
        dst.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "tls-authz": "auth0"})
        dst.cmd("migrate-incoming", uri=uri)
        src.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "max-bandwidth": 0})
        got = completes(src, dst, dump, uri)
        assert got["x-tls"]["peer"] == "O=livemig,CN=client"
        assert not [p for p in base.rglob("*") if p.stat().st_uid not in (0, NOBODY)]
    finally:
        for h in hosts.started:
            h.close()
        shutil.rmtree(base, ignore_errors=True)


def host_under(pid: int) -> int:
    """The `livemig host` process under runuser: the one descendant whose
    command line runs livemig.cli.main."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"livemig.cli.main" in argv and ppid in (pid, *_children(pid)):
            return int(entry)
    raise AssertionError(f"no livemig host under process {pid}")


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return out
