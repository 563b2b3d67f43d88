"""Certificates for TLS tests and the bench, made with the openssl command: a CA, a server
and clients under QEMU's file names, one directory per tls-creds-x509, and
the bad cases (another CA, an expired certificate, a name not allowed)."""

from __future__ import annotations

import itertools
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SERVER_NAMES = "DNS:localhost,DNS:migration.test,IP:127.0.0.1"
CLIENT_DN = "O=livemig,CN=client"
_serial = itertools.count(1000)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", str(path))


def _subject(dn: str) -> str:
    return "/" + "/".join(dn.split(","))


@dataclass
class Ca:
    cert: Path
    key: Path


def make_ca(root: Path, name: str) -> Ca:
    root.mkdir(parents=True, exist_ok=True)
    key, cert = root / f"{name}-key.pem", root / f"{name}-cert.pem"
    _key(key)
    _openssl("req", "-x509", "-new", "-key", str(key), "-out", str(cert), "-days", "30",
             "-subj", _subject(f"O=livemig,CN={name}"),
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return Ca(cert, key)


def issue(ca: Ca, key: Path, cert: Path, dn: str, server: bool, days: int = 30) -> None:
    """A certificate for `dn` signed by `ca`; days < 0 makes one already expired."""
    _key(key)
    csr = cert.with_suffix(".csr")
    ext = cert.with_suffix(".ext")
    ext.write_text("basicConstraints=critical,CA:FALSE\n"
                   "keyUsage=digitalSignature,keyEncipherment\n"
                   + ("extendedKeyUsage=serverAuth\n" f"subjectAltName={SERVER_NAMES}\n" if server
                      else "extendedKeyUsage=clientAuth\n"))
    _openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", _subject(dn))
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
             "-set_serial", str(next(_serial)), "-days", str(days), "-extfile", str(ext), "-out", str(cert))
    csr.unlink()
    ext.unlink()


def creds_dir(path: Path, trust: Ca, role: str, signer: Ca | None = None, dn: str = "",
              days: int = 30) -> Path:
    """A tls-creds-x509 dir: ca-cert.pem from `trust`; for role server or
    client a certificate and key signed by `signer` (default `trust`)."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(trust.cert, path / "ca-cert.pem")
    if role in ("server", "client"):
        issue(signer or trust, path / f"{role}-key.pem", path / f"{role}-cert.pem",
              dn or ("O=livemig,CN=server" if role == "server" else CLIENT_DN), role == "server", days)
    return path


@dataclass
class Pki:
    server: Path  # endpoint=server, certificate for localhost / 127.0.0.1 / migration.test
    client: Path  # endpoint=client with a certificate for O=livemig,CN=client
    client_nocert: Path  # endpoint=client, only the CA
    client_other: Path  # right CA, DN O=livemig,CN=intruder
    client_rogue: Path  # the client's DN, but signed by another CA
    server_rogue: Path  # a server certificate from another CA
    server_expired: Path  # right CA, expired yesterday
    client_wrong_ca: Path  # trusts only the other CA


def make_pki(root: Path) -> Pki:
    ca, rogue = make_ca(root / "ca", "livemig-ca"), make_ca(root / "rogue-ca", "rogue-ca")
    return Pki(
        server=creds_dir(root / "server", ca, "server"),
        client=creds_dir(root / "client", ca, "client"),
        client_nocert=creds_dir(root / "client-nocert", ca, "none"),
        client_other=creds_dir(root / "client-other", ca, "client", dn="O=livemig,CN=intruder"),
        client_rogue=creds_dir(root / "client-rogue", ca, "client", signer=rogue),
        server_rogue=creds_dir(root / "server-rogue", ca, "server", signer=rogue),
        server_expired=creds_dir(root / "server-expired", ca, "server", days=-1),
        client_wrong_ca=creds_dir(root / "client-wrong-ca", rogue, "client"),
    )
