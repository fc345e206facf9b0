"""Laps: where the time of one request or job went, stage by stage."""

from __future__ import annotations

import time


class Laps:
    """``lap(name)`` ends the stage ``name`` (repeated names add up); ``seconds`` holds them in
    order. ``server_timing()`` renders them as a W3C ``Server-Timing`` header (ms)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now

    def extend(self, seconds: dict[str, float]) -> None:
        """Stages timed by the callee that just returned: they end now."""
        for name, value in seconds.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + value
        self._last = time.perf_counter()

    def server_timing(self) -> str:
        return ", ".join(f"{k};dur={v * 1000:.1f}" for k, v in self.seconds.items())
