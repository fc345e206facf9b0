"""The rounds' loop looks at the policy at each tick and once an event's quiet spell has passed."""

from __future__ import annotations

import threading
import time

from services.training.policy import PolicyClock


def _pause_in_thread(clock: PolicyClock, stop: threading.Event) -> tuple[threading.Thread, list]:
    ended: list[float] = []

    def pause() -> None:
        clock.pause(stop)
        ended.append(time.monotonic())

    t = threading.Thread(target=pause, daemon=True)
    t.start()
    return t, ended


def test_an_event_wakes_the_loop_once_its_debounce_has_passed():
    clock = PolicyClock(tick_s=600, debounce_s=0.3)
    stop = threading.Event()
    t, ended = _pause_in_thread(clock, stop)
    time.sleep(0.1)
    sent = time.monotonic()
    clock.event()
    t.join(60)
    assert ended, "the event did not end the pause (a tick is 600 s)"
    assert ended[0] - sent >= 0.3  # not before the quiet spell has passed


def test_a_later_event_moves_the_look_later():
    clock = PolicyClock(tick_s=600, debounce_s=0.5)
    stop = threading.Event()
    t, ended = _pause_in_thread(clock, stop)
    clock.event()
    time.sleep(0.3)
    second = time.monotonic()
    clock.event()
    t.join(60)
    assert ended and ended[0] - second >= 0.5


def test_without_events_the_pause_is_a_tick_and_stop_ends_it():
    clock = PolicyClock(tick_s=0.2, debounce_s=30)
    stop = threading.Event()
    t0 = time.monotonic()
    clock.pause(stop)
    assert time.monotonic() - t0 >= 0.2
    slow = PolicyClock(tick_s=600, debounce_s=30)
    t, ended = _pause_in_thread(slow, stop)
    slow.event()  # its debounce (30 s) is far off: the pause goes on
    time.sleep(0.2)
    assert not ended
    stop.set()
    t.join(60)
    assert ended, "stop did not end the pause"


def test_an_event_during_a_round_makes_the_next_pause_short():
    clock = PolicyClock(tick_s=600, debounce_s=0.0)
    clock.event()  # arrived while the loop was busy with a round
    stop = threading.Event()
    t, ended = _pause_in_thread(clock, stop)
    t.join(60)
    assert ended
    # ... and once: the pause after it waits for the tick again
    t, ended = _pause_in_thread(clock, stop)
    time.sleep(0.3)
    assert not ended
    stop.set()
    t.join(60)
