import pytest

from ctloop.retry import RetryPolicy


def test_retries_until_success():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("down")
        return "ok"

    assert RetryPolicy(attempts=3, base_delay_s=0).call(flaky) == "ok"
    assert len(calls) == 3


def test_gives_up_after_the_last_attempt_and_raises_the_error():
    def down():
        raise ConnectionError("still down")

    with pytest.raises(ConnectionError, match="still down"):
        RetryPolicy(attempts=2, base_delay_s=0).call(down)


def test_does_not_retry_errors_outside_retry_on():
    calls = []

    def bad():
        calls.append(1)
        raise ValueError("bad input")

    with pytest.raises(ValueError):
        RetryPolicy(attempts=5, base_delay_s=0, retry_on=(ConnectionError,)).call(bad)
    assert len(calls) == 1


def test_backoff_is_exponential_and_capped():
    p = RetryPolicy(base_delay_s=0.5, max_delay_s=3.0)
    assert [p.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
