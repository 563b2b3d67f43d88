"""QEMU's TLS credential and authorization objects: `tls-creds-x509` (QEMU's
file names in its `dir`, the ssl context they make), `authz-simple` and
`authz-list`, and the peer's distinguished name in QEMU's format
("O=livemig,CN=client": the subject's RDNs in certificate order).
Sessions over channels are in protocol/tls.py."""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass
from typing import Any

from livemig.protocol.transport import TransportError

CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"
DH_PARAMS = "dh-params.pem"



class TlsError(TransportError):
    """Credentials that cannot be used, or a TLS session that failed."""


# objects -----------------------------------------------------------------

def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    words = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}
    if isinstance(value, str) and value.lower() in words:
        return words[value.lower()]
    raise TlsError(f"property {name!r} must be on or off, not {value!r}")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise TlsError(f"property {name!r} must be one of {', '.join(choices)}, not {value!r}")
    return value


def _string(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TlsError(f"property {name!r} must be a non-empty string")
    return value


@dataclass(frozen=True)
class X509Creds:
    """QEMU's tls-creds-x509: certificates in `dir` under QEMU's file names."""

    id: str
    dir: str
    endpoint: str = "client"
    verify_peer: bool = True
    sanity_check: bool = True

    qom_type = "tls-creds-x509"

    @classmethod
    def from_props(cls, oid: str, props: dict[str, Any]) -> X509Creds:
        unsupported = {"priority": "gnutls priority strings", "passwordid": "encrypted private keys"}
        for name in props:
            if name in unsupported:
                raise TlsError(f"tls-creds-x509 property {name!r} ({unsupported[name]}) is not supported")
            if name not in ("dir", "endpoint", "verify-peer", "sanity-check"):
                raise TlsError(f"tls-creds-x509 has no property {name!r}")
        if "dir" not in props:
            raise TlsError("tls-creds-x509 needs a 'dir' holding its certificates")
        creds = cls(oid, _string("dir", props["dir"]),
                    _choice("endpoint", props.get("endpoint", "client"), ("client", "server")),
                    _bool("verify-peer", props.get("verify-peer", True)),
                    _bool("sanity-check", props.get("sanity-check", True)))
        creds.context()  # every file readable and consistent now, not at the first migration
        if creds.sanity_check:
            creds.check()
        return creds

    def props(self) -> dict[str, Any]:
        return {"dir": self.dir, "endpoint": self.endpoint, "verify-peer": self.verify_peer,
                "sanity-check": self.sanity_check}

    def path(self, name: str, required: bool) -> str | None:
        path = os.path.join(self.dir, name)
        if os.path.exists(path):
            if not os.access(path, os.R_OK):
                raise TlsError(f"tls-creds-x509 {self.id!r}: cannot read {path}")
            return path
        if required:
            raise TlsError(f"tls-creds-x509 {self.id!r}: missing {path}")
        return None

    def own_pair(self) -> tuple[str, str] | None:
        """This endpoint's certificate and key; optional for a client."""
        server = self.endpoint == "server"
        cert = self.path(SERVER_CERT if server else CLIENT_CERT, server)
        key = self.path(SERVER_KEY if server else CLIENT_KEY, server)
        if (cert is None) != (key is None):
            raise TlsError(f"tls-creds-x509 {self.id!r}: {CLIENT_CERT} and {CLIENT_KEY} go together")
        return (cert, key) if cert and key else None

    def context(self) -> ssl.SSLContext:
        server = self.endpoint == "server"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_verify_locations(cafile=self.path(CA_CERT, True))
            crl = self.path(CA_CRL, False)
            if crl:
                ctx.load_verify_locations(cafile=crl)
                ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
            pair = self.own_pair()
            if pair:
                ctx.load_cert_chain(*pair)
            dh = self.path(DH_PARAMS, False)
            if server and dh:
                ctx.load_dh_params(dh)
        except ssl.SSLError as exc:
            raise TlsError(f"tls-creds-x509 {self.id!r}: bad certificate or key in {self.dir}: "
                           f"{exc.reason or exc}") from None
        if server:
            # QEMU never reads session tickets and never sends close_notify:
            # unread tickets made the end of its stream get lost.
            ctx.num_tickets = 0
            ctx.verify_mode = ssl.CERT_REQUIRED if self.verify_peer else ssl.CERT_NONE
        elif not self.verify_peer:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def check(self) -> None:
        """QEMU's sanity-check: this endpoint's own certificate (if any) must
        verify against ca-cert.pem now (dates, signature, CA constraints).
        Done as a handshake in memory with a peer that trusts only the CA."""
        pair = self.own_pair()
        if pair is None:
            return
        own = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        own.load_cert_chain(*pair)
        judge = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT if self.endpoint == "server" else ssl.PROTOCOL_TLS_SERVER)
        judge.load_verify_locations(cafile=self.path(CA_CERT, True))
        judge.check_hostname = False
        judge.verify_mode = ssl.CERT_REQUIRED
        if self.endpoint == "server":
            client, server = judge, own
        else:  # the judge plays the server and asks for the client's certificate
            own_client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            own_client.check_hostname = False
            own_client.verify_mode = ssl.CERT_NONE
            own_client.load_cert_chain(*pair)
            judge.load_cert_chain(*pair)
            client, server = own_client, judge
        try:
            _memory_handshake(client, server)
        except ssl.SSLCertVerificationError as exc:
            name = SERVER_CERT if self.endpoint == "server" else CLIENT_CERT
            raise TlsError(f"tls-creds-x509 {self.id!r}: {name} fails against {CA_CERT}: "
                           f"{exc.verify_message}") from None


def _memory_handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> None:
    bios = [ssl.MemoryBIO() for _ in range(4)]
    client = client_ctx.wrap_bio(bios[0], bios[1], server_side=False)
    server = server_ctx.wrap_bio(bios[2], bios[3], server_side=True)
    done = [False, False]
    for _ in range(10):
        for i, end in enumerate((client, server)):
            if not done[i]:
                try:
                    end.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
        bios[2].write(bios[1].read())
        bios[0].write(bios[3].read())
        if all(done):
            # Under TLS 1.3 the server judges the client's certificate last.
            try:
                server.read(1)
            except ssl.SSLWantReadError:
                pass
            return
    raise TlsError("certificate check did not finish")


@dataclass(frozen=True)
class AuthzRule:
    match: str
    policy: str = "deny"
    format: str = "exact"

    def matches(self, identity: str) -> bool:
        if self.format == "exact":
            return identity == self.match
        # QEMU's glob: only * and ? are special.
        pattern = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in self.match)
        return re.fullmatch(pattern, identity, re.S) is not None


@dataclass(frozen=True)
class Authz:
    """authz-simple (one identity allowed) or authz-list (first matching rule
    wins, else the default policy, deny unless set)."""

    id: str
    qom_type: str
    rules: tuple[AuthzRule, ...] = ()
    policy: str = "deny"

    @classmethod
    def from_props(cls, qom_type: str, oid: str, props: dict[str, Any]) -> Authz:
        if qom_type == "authz-simple":
            if set(props) != {"identity"}:
                extra = sorted(set(props) - {"identity"})
                raise TlsError(f"authz-simple has no property {extra[0]!r}" if extra
                               else "authz-simple needs an 'identity' (a DN such as O=livemig,CN=client)")
            return cls(oid, qom_type, (AuthzRule(_string("identity", props["identity"]), "allow"),))
        extra = sorted(set(props) - {"rules", "policy"})
        if extra:
            raise TlsError(f"authz-list has no property {extra[0]!r}")
        rules = props.get("rules", [])
        if not isinstance(rules, list):
            raise TlsError("authz-list 'rules' must be a list of {match, policy, format}")
        return cls(oid, qom_type, tuple(_rule(i, r) for i, r in enumerate(rules)),
                   _choice("policy", props.get("policy", "deny"), ("allow", "deny")))

    def props(self) -> dict[str, Any]:
        if self.qom_type == "authz-simple":
            return {"identity": self.rules[0].match}
        return {"policy": self.policy,
                "rules": [{"match": r.match, "policy": r.policy, "format": r.format} for r in self.rules]}

    def allows(self, identity: str) -> bool:
        for rule in self.rules:
            if rule.matches(identity):
                return rule.policy == "allow"
        return self.policy == "allow"


def _rule(i: int, rule: Any) -> AuthzRule:
    if not isinstance(rule, dict):
        raise TlsError(f"authz-list rule {i} must be an object with match, policy and format")
    extra = sorted(set(rule) - {"match", "policy", "format"})
    if extra:
        raise TlsError(f"authz-list rule {i} has no field {extra[0]!r}")
    if "match" not in rule:
        raise TlsError(f"authz-list rule {i} needs a 'match'")
    return AuthzRule(_string(f"rules.{i}.match", rule["match"]),
                     _choice(f"rules.{i}.policy", rule.get("policy", "deny"), ("allow", "deny")),
                     _choice(f"rules.{i}.format", rule.get("format", "exact"), ("exact", "glob")))


# the peer's name ------------------------------------------------------------

_DN_KEYS = {"countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
            "organizationName": "O", "organizationalUnitName": "OU", "commonName": "CN",
            "domainComponent": "DC", "userId": "UID", "streetAddress": "STREET",
            "emailAddress": "EMAIL"}


def _dn_value(value: str) -> str:
    value = re.sub(r'([,+"\\<>;=])', r"\\\1", value)
    if value[:1] in ("#", " "):
        value = "\\" + value
    if value.endswith(" "):
        value = value[:-1] + "\\ "
    return value


def peer_dn(cert: dict) -> str:
    """A decoded certificate's subject as QEMU prints it: RDNs in certificate
    order, joined by commas ("O=livemig,CN=client")."""
    return ",".join("+".join(f"{_DN_KEYS.get(k, k)}={_dn_value(v)}" for k, v in rdn)
                    for rdn in cert.get("subject", ()))
