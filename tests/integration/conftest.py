"""Integration tests: every one runs with the session's stack up; service tests share a module's
own workflow database, its bootstrap admin and a stand-in OIDC issuer."""

import pytest

from ctloop.db import create_schema
from ctloop.settings import Settings
from tests.helpers.oidc import jwks_issuer


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _real_stack(stack):  # every integration test runs with the local stack up
    return stack


@pytest.fixture(scope="module")
def oidc_issuer():
    """A real HTTP server publishing a JWKS, standing in for Keycloak's certs endpoint."""
    with jwks_issuer() as issuer_and_key:
        yield issuer_and_key


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
