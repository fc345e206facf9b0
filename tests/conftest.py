"""Shared fixtures. Integration tests run against the real local stack, which the session
brings up once (or reuses when one is already healthy) and stops again if it started it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from ctloop.settings import Settings, get_settings
from ctloop.stack import LocalStack


@pytest.fixture(scope="session")
def settings() -> Settings:
    return get_settings()


@pytest.fixture(scope="session")
def stack(settings: Settings) -> Iterator[LocalStack]:
    local = LocalStack(settings, echo=lambda line: print(f"[stack] {line}"))
    already_up = local.is_healthy()
    local.up()
    yield local
    if not already_up:
        local.down()


@pytest.fixture
def unique() -> str:
    """A short id that keeps one test's names (models, groups, keys) apart from others'."""
    return uuid.uuid4().hex[:10]
