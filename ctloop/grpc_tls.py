"""Mutual TLS on gRPC between ctloop's services (issue 18, finding 7), beside the service tokens
of :mod:`ctloop.rpc_auth`: the wire is encrypted, a server only accepts a client whose
certificate chains to the release's CA, a client only talks to a server whose certificate does,
and a call's ``x-ctloop-caller`` must be the name in its client certificate (a stolen token is
useless without that service's key).

One folder (``grpc.tls_dir``) holds ``ca.crt`` and, for each party, ``<name>.crt`` and
``<name>.key``: the services (ingest, inference, training, metrics), the operator (``ctloop
run`` against a release, benchmarks, admins) and ``release-check`` (``helm test``, health only).
A process uses the pair of its own name; in a cluster each pod's folder holds only its own pair
(the chart's ``grpcTls`` Secrets). No folder: plain text, as before (the token check stays).

``python -m ctloop.grpc_tls DIR`` makes such a folder (a CA and every party's pair, for a local
platform or tests); the chart makes its own with Helm's ``genCA``/``genSignedCert``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from ctloop.settings import Settings

SERVICES = ("ingest", "inference", "training", "metrics")
NAMES = (*SERVICES, "operator", "release-check")
CA_FILE = "ca.crt"


class TlsConfigError(RuntimeError):
    """The TLS folder is set but lacks what this party needs."""


@dataclass(frozen=True)
class TlsPair:
    """A party's PEM certificate and key, and the CA its peers must chain to."""

    name: str
    cert: bytes
    key: bytes
    ca: bytes


def load(settings: Settings, name: str) -> TlsPair | None:
    """``name``'s pair from ``grpc.tls_dir``, or None when TLS is off (no folder set)."""
    folder = settings.grpc.tls_dir
    if folder is None:
        return None
    files = {"cert": folder / f"{name}.crt", "key": folder / f"{name}.key", "ca": folder / CA_FILE}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise TlsConfigError(f"gRPC TLS is on (grpc.tls_dir={folder}) but {missing} are missing")
    return TlsPair(name, *(files[k].read_bytes() for k in ("cert", "key", "ca")))


def server_credentials(pair: TlsPair) -> grpc.ServerCredentials:
    """Serve with ``pair``; every client must present a certificate from the same CA."""
    return grpc.ssl_server_credentials(
        [(pair.key, pair.cert)], root_certificates=pair.ca, require_client_auth=True
    )


def channel_credentials(pair: TlsPair) -> grpc.ChannelCredentials:
    """Dial with ``pair`` as the client certificate; trust only servers from the same CA."""
    return grpc.ssl_channel_credentials(
        root_certificates=pair.ca, private_key=pair.key, certificate_chain=pair.cert
    )


def peer_name(context: grpc.ServicerContext) -> str | None:
    """The common name of the client certificate of a call (None without TLS)."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode() if names else None


# ----------------------------------------------------------------------------- making a PKI
def write_pki(
    directory: Path,
    names: Sequence[str] = NAMES,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    days: int = 825,
) -> Path:
    """A CA and, per name, a certificate (CN = the name; SANs = the name and ``hosts``) and
    key, written to ``directory`` (keys 0600; the CA's key is not kept). Returns the folder."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ctloop gRPC CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (directory / CA_FILE).write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        alt: list[x509.GeneralName] = [x509.DNSName(name)]
        for host in hosts:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                alt.append(x509.DNSName(host))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        (directory / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path = directory / f"{name}.key"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ctloop.grpc_tls",
        description="Make a gRPC TLS folder (CA and each party's pair) for grpc.tls_dir.",
    )
    parser.add_argument("directory", type=Path)
    parser.add_argument(
        "--host",
        action="append",
        default=None,
        help="a name or IP the services are dialled at (repeatable; default 127.0.0.1, localhost)",
    )
    parser.add_argument("--days", type=int, default=825)
    args = parser.parse_args(argv)
    hosts = args.host or ["127.0.0.1", "localhost"]
    out = write_pki(args.directory, hosts=hosts, days=args.days)
    print(f"gRPC TLS folder {out}: {CA_FILE} and a pair for each of {', '.join(NAMES)}")
    print(f"use it with CTLOOP_GRPC__TLS_DIR={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
