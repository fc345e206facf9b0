"""The audit log's rate limit for refused requests (services/ingest/auth_audit.py): per
address and minute, one summary, the count of what was left out, a bounded number of
addresses tracked."""

from __future__ import annotations

from services.ingest.auth_audit import OVERFLOW, RateLimit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_each_address_gets_its_budget_then_one_summary_then_nothing():
    clock = Clock()
    limit = RateLimit(per_minute=2, clock=clock)
    decisions = [limit.admit("10.0.0.1")[0] for _ in range(6)]
    assert decisions == ["write", "write", "summary", "drop", "drop", "drop"]
    assert limit.admit("10.0.0.2") == ("write", 0)  # another address has its own budget


def test_the_next_minute_writes_again_and_says_how_many_were_left_out():
    clock = Clock()
    limit = RateLimit(per_minute=1, clock=clock)
    for _ in range(5):
        limit.admit("10.0.0.1")
    clock.now += 61
    assert limit.admit("10.0.0.1") == ("write", 4)  # the summary's and three dropped
    assert limit.admit("10.0.0.1") == ("summary", 0)


def test_addresses_past_the_cap_share_one_budget():
    clock = Clock()
    limit = RateLimit(per_minute=1, max_clients=3, clock=clock)
    for n in range(3):
        assert limit.admit(f"10.0.0.{n}")[0] == "write"
    assert [limit.admit(f"10.0.1.{n}")[0] for n in range(4)] == ["write", "summary", "drop", "drop"]
    assert OVERFLOW in limit._windows and len(limit._windows) == 4
    clock.now += 121  # old windows are forgotten when room is needed
    assert limit.admit("10.0.2.1") == ("write", 0)
    assert "10.0.2.1" in limit._windows
