"""A stand-in for Keycloak's certs endpoint: a real HTTP server publishing one RSA key as a JWKS,
so tests can sign their own OIDC tokens and the services verify them as they would Keycloak's."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa


@contextmanager
def jwks_issuer() -> Iterator[tuple[str, rsa.RSAPrivateKey]]:
    """Yields the issuer URL (``.../realms/ctloop``) and the private key its tokens are signed
    with; the server stops when the block ends."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    body = json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}).encode()

    class Certs(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Certs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/realms/ctloop", key
    finally:
        server.shutdown()
