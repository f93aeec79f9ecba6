"""What the security tests and bench/bench_auth.py make for themselves: a CA with server and client
certificates (the ``cryptography`` package), nkeys and NATS JWTs (operator, account, user; the ``nkeys``
package that nats-py uses), ``.creds`` files, and nats-server config snippets for each kind of login."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# ---------------------------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed none of these: a client trusting only it must refuse the server


def _key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return key


def _cert(subject: str, key: Any, issuer: x509.Certificate | None, issuer_key: Any, *, ca: bool = False,
          server: bool = False, rfc5280: bool = True) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer.subject if issuer else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if rfc5280:
        # Python 3.13's ssl verifies with VERIFY_X509_STRICT (RFC 5280): a CA needs a key usage and a subject
        # key identifier, every issued certificate an authority key identifier; without them 3.13 refuses.
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        if issuer is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=not ca, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=not ca, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False),
            critical=True)
        if not ca:
            usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(directory: Path, *, rfc5280: bool = True) -> Pki:
    """A CA, a server and a client certificate it signed, and another CA. ``rfc5280=False``: certificates
    without key identifiers and key usages, as older tooling made them (3.11 and 3.12 accept them, 3.13 not)."""
    directory.mkdir(parents=True, exist_ok=True)

    def write(name: str, cert: x509.Certificate) -> Path:
        path = directory / name
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    ca_key = _key(directory / "ca.key")
    ca = _cert("lamabus test CA", ca_key, None, ca_key, ca=True, rfc5280=rfc5280)
    server_key = _key(directory / "server.key")
    client_key = _key(directory / "client.key")
    other_key = _key(directory / "other-ca.key")
    return Pki(ca=write("ca.pem", ca),
               server_cert=write("server.pem", _cert("127.0.0.1", server_key, ca, ca_key, server=True,
                                                              rfc5280=rfc5280)),
               server_key=directory / "server.key",
               client_cert=write("client.pem", _cert("lamabus client", client_key, ca, ca_key, rfc5280=rfc5280)),
               client_key=directory / "client.key",
               other_ca=write("other-ca.pem", _cert("someone else's CA", other_key, None, other_key, ca=True)))


def tls_config(pki: Pki, *, verify: bool = True) -> str:
    """A ``tls`` block: the server's certificate, and with ``verify`` a client certificate is required."""
    block = {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key), "ca_file": str(pki.ca),
             "verify": verify, "timeout": 5}
    return "tls " + json.dumps(block) + "\n"


# ---------------------------------------------------------------------------------------------- nkeys, JWTs


@dataclass(frozen=True)
class Nkey:
    seed: bytes
    public: str

    @property
    def pair(self) -> Any:
        return nkeys.from_seed(self.seed)


def new_nkey(kind: str) -> Nkey:
    prefix = {"operator": nkeys.PREFIX_BYTE_OPERATOR, "account": nkeys.PREFIX_BYTE_ACCOUNT,
              "user": nkeys.PREFIX_BYTE_USER}[kind]
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    return Nkey(seed, nkeys.from_seed(seed).public_key.decode())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def encode_jwt(claims: dict[str, Any], signer: Nkey) -> str:
    """A NATS JWT (``ed25519-nkey``), signed by ``signer``'s seed."""
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    claims = {**claims, "iss": signer.public, "iat": int(time.time())}
    claims["jti"] = base64.b32encode(hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
                                     ).decode().rstrip("=")
    body = _b64(json.dumps(claims).encode())
    signature = signer.pair.sign(f"{header}.{body}".encode())
    return f"{header}.{body}.{_b64(signature)}"


_UNLIMITED = {"subs": -1, "data": -1, "payload": -1}


@dataclass(frozen=True)
class Operator:
    operator: Nkey
    account: Nkey
    config: str  # the server's config for operator mode with this account preloaded

    def user_creds(self, path: Path, *, name: str = "lamabus", expires: int | None = None,
                   permissions: dict[str, Any] | None = None) -> Path:
        """A ``.creds`` file for a new user of the account (``expires``: a Unix time, past for an expired one)."""
        user = new_nkey("user")
        nats: dict[str, Any] = {"type": "user", "version": 2, **_UNLIMITED, **(permissions or {})}
        claims: dict[str, Any] = {"sub": user.public, "name": name, "nats": nats}
        if expires is not None:
            claims["exp"] = expires
        token = encode_jwt(claims, self.account)
        path.write_text("-----BEGIN NATS USER JWT-----\n" f"{token}\n" "------END NATS USER JWT------\n\n"
                        "-----BEGIN USER NKEY SEED-----\n" f"{user.seed.decode()}\n"
                        "------END USER NKEY SEED------\n")
        os.chmod(path, 0o600)
        return path


def make_operator(directory: Path) -> Operator:
    """Operator mode with one account (and the system account) in a memory resolver."""
    directory.mkdir(parents=True, exist_ok=True)
    operator, account = new_nkey("operator"), new_nkey("account")
    op_jwt = encode_jwt({"sub": operator.public, "name": "lamabus-test", "nats": {"type": "operator", "version": 2}},
                        operator)
    limits = {**_UNLIMITED, "imports": -1, "exports": -1, "wildcards": True, "conn": -1, "leaf": -1}
    acc_jwt = encode_jwt({"sub": account.public, "name": "LAMABUS",
                          "nats": {"type": "account", "version": 2, "limits": limits}}, operator)
    # JetStream (which the embedded server always runs) wants a system account in operator mode.
    system = new_nkey("account")
    sys_jwt = encode_jwt({"sub": system.public, "name": "SYS", "nats": {"type": "account", "version": 2,
                                                                         "limits": limits}}, operator)
    (directory / "operator.jwt").write_text(op_jwt)
    config = (f"operator: {json.dumps(str(directory / 'operator.jwt'))}\n"
              f"system_account: {system.public}\n"
              "resolver: MEMORY\n"
              f"resolver_preload: {{ {account.public}: {json.dumps(acc_jwt)}, {system.public}: {json.dumps(sys_jwt)} }}\n")
    return Operator(operator, account, config)
