"""The first admin: made once, with the deployment's token when it provides one (the chart keeps
it in a Secret), so a rescheduled ingest pod or a second replica never loses or replaces it."""

from datetime import UTC, datetime, timedelta

import pytest

from ctloop.auth import ensure_admin_token, principal_for, token_hash
from ctloop.db import ApiToken, create_schema, session_scope
from ctloop.settings import get_settings


@pytest.fixture
def db(tmp_path):
    url = f"sqlite:///{tmp_path / 'workflow.db'}"
    create_schema(url)
    return url


def test_the_deployments_token_opens_the_first_admin_and_survives_a_second_start(db, tmp_path):
    given = "ctl_" + "k" * 43
    assert ensure_admin_token(db, tmp_path / "a" / "admin-token", given) == given
    assert (tmp_path / "a" / "admin-token").read_text().strip() == given
    who = principal_for(db, given)
    assert who is not None and who.is_admin
    # Another replica, or the pod rescheduled with an empty scratch volume: nothing new.
    assert ensure_admin_token(db, tmp_path / "b" / "admin-token", given) is None
    assert not (tmp_path / "b" / "admin-token").exists()
    assert principal_for(db, given) == who


def test_without_a_given_token_one_is_made_and_written(db, tmp_path):
    token = ensure_admin_token(db, tmp_path / "admin-token")
    assert token is not None and token.startswith("ctl_")
    assert principal_for(db, token) is not None


def test_a_given_token_of_another_form_is_refused(db, tmp_path):
    with pytest.raises(ValueError, match="must start with 'ctl_'"):
        ensure_admin_token(db, tmp_path / "admin-token", "hunter2")
    assert not (tmp_path / "admin-token").exists()


def test_the_bootstrap_token_expires_like_any_other(db, tmp_path):
    """It exists to make the first real admins; a file or Secret holding it must not open the
    API forever (default: auth.token_lifetime_days)."""
    token = ensure_admin_token(db, tmp_path / "admin-token")
    assert token is not None
    with session_scope(db) as s:
        row = s.get(ApiToken, token_hash(token))
        assert row is not None and row.expires_at is not None
        lifetime = timedelta(days=get_settings().auth.token_lifetime_days)
        assert abs(row.expires_at - (datetime.now(UTC) + lifetime)) < timedelta(minutes=5)
        row.expires_at = datetime.now(UTC) - timedelta(seconds=1)
    assert principal_for(db, token) is None
