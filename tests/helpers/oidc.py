"""A stand-in for Keycloak's certs endpoint: a real HTTP server publishing RSA keys as a JWKS,
so tests can sign their own OIDC tokens and the services verify them as they would Keycloak's.
The published keys can be changed while it runs (a rotation at the issuer)."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class JwksServer:
    """The issuer's JWKS, served at ``<issuer>/protocol/openid-connect/certs``; ``fetches``
    counts the requests (how often the verifier asked)."""

    def __init__(self, keys: dict[str, rsa.RSAPrivateKey]) -> None:
        self.fetches = 0
        self.signers: dict[str, rsa.RSAPrivateKey] = {}  # every key ever published
        self.publish(keys)
        server = self

        class Certs(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.fetches += 1
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(server.body)

            def log_message(self, *args: object) -> None:
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Certs)
        self.issuer = f"http://127.0.0.1:{self.http.server_port}/realms/ctloop"

    def publish(self, keys: dict[str, rsa.RSAPrivateKey]) -> None:
        """From now on the issuer's keys are ``keys`` (kid -> key); others are gone."""
        self.signers.update(keys)
        jwks = []
        for kid, key in keys.items():
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            jwks.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
        self.body = json.dumps({"keys": jwks}).encode()

    def token(self, kid: str, **claims: Any) -> str:
        """An access token signed with the key ``kid`` (published or not)."""
        base = {"iss": self.issuer, "aud": "ctloop", "exp": int(time.time()) + 300}
        return jwt.encode({**base, **claims}, self.signers[kid], "RS256", headers={"kid": kid})


@contextmanager
def jwks_server(keys: dict[str, rsa.RSAPrivateKey]) -> Iterator[JwksServer]:
    server = JwksServer(keys)
    threading.Thread(target=server.http.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.http.shutdown()


@contextmanager
def jwks_issuer() -> Iterator[tuple[str, rsa.RSAPrivateKey]]:
    """Yields the issuer URL (``.../realms/ctloop``) and the private key its tokens are signed
    with (kid ``k1``); the server stops when the block ends."""
    key = new_key()
    with jwks_server({"k1": key}) as server:
        yield server.issuer, key
