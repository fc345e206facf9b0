"""The first admin: made once, with the deployment's token when it provides one (the chart keeps
it in a Secret), so a rescheduled ingest pod or a second replica never loses or replaces it."""

import pytest

from ctloop.auth import ensure_admin_token, principal_for
from ctloop.db import create_schema


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
