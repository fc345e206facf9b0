import json

import pytest

from ctloop.db import create_schema
from ctloop.settings import Settings


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _real_stack(stack):  # every integration test runs with the local stack up
    return stack


@pytest.fixture(scope="module")
def oidc_issuer():
    """A real HTTP server publishing a JWKS, standing in for Keycloak's certs endpoint."""
    import http.server
    import threading

    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    body = json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}).encode()

    class Certs(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Certs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    issuer = f"http://127.0.0.1:{server.server_port}/realms/ctloop"
    yield issuer, key
    server.shutdown()


@pytest.fixture(scope="module")
def svc_settings(settings: Settings, tmp_path_factory) -> Settings:
    db = tmp_path_factory.mktemp("db") / "workflow.db"
    url = f"sqlite:///{db}"
    create_schema(url)
    return settings.model_copy(update={"db": settings.db.model_copy(update={"url": url})})


@pytest.fixture(scope="module")
def admin_headers(svc_settings: Settings, tmp_path_factory) -> dict[str, str]:
    """The bootstrap admin of this module's database, as request headers."""
    from ctloop.auth import ensure_admin_token

    token = ensure_admin_token(svc_settings.database_url, tmp_path_factory.mktemp("t") / "admin")
    assert token is not None
    return {"Authorization": f"Bearer {token}"}
