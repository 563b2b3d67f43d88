"""TLS with QEMU 7.2 on the other end, both directions, over tcp and over
unix with tls-hostname: QEMU's own -object tls-creds-x509 and authz-simple,
the same certificate files, RAM compared byte for byte."""

from __future__ import annotations

import numpy as np
import pytest

from livemig.machine.ram import fill_ram
from livemig.tools.tls_certs import make_pki
from tests.test_qemu_interop import FAST, needs_qemu, qemu, scratch, uri_for  # noqa: F401

RAM = "64M"
RAM_BYTES = 64 << 20
QEMU_AUTHZ = "authz-simple,id=auth0,identity=O=livemig,,CN=client"  # QEMU's -object escapes commas too


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_params(uri: str) -> dict:
    params = {"tls-creds": "tls0"}
    if uri.startswith("unix:"):
        params["tls-hostname"] = "localhost"
    return params


def qemu_ram(q, path) -> np.ndarray:
    q.cmd("pmemsave", val=0, size=RAM_BYTES, filename=str(path))
    return np.fromfile(path, np.uint8)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
@needs_qemu
def test_qemu_to_livemig_over_tls(hosts, qemu, scratch, tmp_path, pki, transport):  # noqa: F811
    mem = scratch / "qemu.ram"
    data = np.random.default_rng(5).integers(0, 256, RAM_BYTES, np.uint8)
    data.tofile(mem)
    uri = uri_for(transport, tmp_path)
    dst = hosts.start("dst", "--machine", "none", "--ram", RAM, "--incoming", "defer",
                      "--object", f"tls-creds-x509,id=tls0,dir={pki.server},endpoint=server",
                      "--object", "authz-simple,id=auth0,identity=O=livemig,,CN=client")
    dst.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "tls-authz": "auth0"})
    dst.cmd("migrate-incoming", uri=uri)
    src = qemu("-M", "none", "-m", RAM, "-S",
               "-object", f"memory-backend-file,id=ram,size={RAM},mem-path={mem},share=off",
               "-machine", "memory-backend=ram",
               "-object", f"tls-creds-x509,id=tls0,dir={pki.client},endpoint=client")
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "return-path", "state": True}])
    src.cmd("migrate-set-parameters", **{"max-bandwidth": FAST, **tls_params(uri)})
    src.cmd("migrate", uri=uri)
    assert src.wait_migration(120)["status"] == "completed"
    got = dst.wait_migration(60)
    assert got["status"] == "completed", got
    assert got["x-tls"]["peer"] == "O=livemig,CN=client", got
    dump = scratch / "dst.ram"
    dst.cmd("pmemsave", val=0, size=RAM_BYTES, filename=str(dump))
    assert np.array_equal(np.fromfile(dump, np.uint8), data)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
@needs_qemu
def test_livemig_to_qemu_over_tls(hosts, qemu, scratch, tmp_path, pki, transport):  # noqa: F811
    uri = uri_for(transport, tmp_path)
    dst = qemu("-M", "none", "-m", RAM, "-incoming", "defer",
               "-object", f"tls-creds-x509,id=tls0,dir={pki.server},endpoint=server,verify-peer=on",
               "-object", QEMU_AUTHZ)
    dst.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "tls-authz": "auth0"})
    dst.cmd("migrate-incoming", uri=uri)
    src = hosts.start("src", "--machine", "none", "--ram", RAM, "--fill", "random", "--seed", "11",
                      "--object", f"tls-creds-x509,id=tls0,dir={pki.client},endpoint=client")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0, **tls_params(uri)})
    src.cmd("migrate", uri=uri)
    info = src.wait_migration(120)
    assert info["status"] == "completed", info
    assert "x-guest-downtime" in info, info  # QEMU answered on the return path, inside the session
    assert info["x-tls"]["version"] == "TLSv1.3", info
    assert dst.wait_migration(30)["status"] == "completed"
    expected = np.zeros(RAM_BYTES, np.uint8)
    fill_ram(expected, "random", 11)
    assert np.array_equal(qemu_ram(dst, scratch / "qemu-dst.ram"), expected)


@needs_qemu
def test_qemu_destination_denies_a_livemig_source_by_dn(hosts, qemu, scratch, tmp_path, pki):  # noqa: F811
    """QEMU's authz denies the DN; the livemig source fails and runs on, QEMU still listens."""
    uri = uri_for("tcp", tmp_path)
    dst = qemu("-M", "none", "-m", RAM, "-incoming", "defer",
               "-object", f"tls-creds-x509,id=tls0,dir={pki.server},endpoint=server,verify-peer=on",
               "-object", QEMU_AUTHZ)
    dst.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "tls-authz": "auth0"})
    dst.cmd("migrate-incoming", uri=uri)
    src = hosts.start("src", "--machine", "none", "--ram", RAM,
                      "--object", f"tls-creds-x509,id=tls0,dir={pki.client_other},endpoint=client")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0, "tls-creds": "tls0"})
    src.cmd("migrate", uri=uri)
    info = src.wait_migration(60)
    assert info["status"] == "failed", info
    assert "the destination closed the TLS session" in info["error-desc"], info
    assert dst.cmd("query-status")["status"] == "inmigrate"
