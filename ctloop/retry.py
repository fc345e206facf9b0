"""The one retry policy: bounded attempts with capped exponential back-off."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    # Errors that another attempt cannot fix (bad input): raised at once.
    give_up_on: tuple[type[BaseException], ...] = ()

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))

    def call(self, fn: Callable[[], T]) -> T:
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except self.give_up_on:
                raise
            except self.retry_on as exc:
                if attempt == self.attempts:
                    raise
                log.warning(
                    "attempt failed; retrying",
                    extra={"attempt": attempt, "error": repr(exc), "delay_s": self.delay(attempt)},
                )
                time.sleep(self.delay(attempt))
        raise AssertionError("unreachable")
