"""``python -m ctloop.provision [--s3] [--kafka]``: make the buckets, the Triton model repository
prefix and the event topics exist, waiting for the object store and Kafka to answer.

Idempotent and safe to run concurrently: in a cluster every ctloop pod runs it as an init
container (Triton's with ``--s3`` only), so nothing starts before what it needs is there.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable

from ctloop.log import configure_logging
from ctloop.settings import Settings, get_settings

log = logging.getLogger("ctloop.provision")


def provision_s3(settings: Settings) -> None:
    from ctloop.storage import ObjectStore

    store = ObjectStore(settings)
    store.ensure_buckets()
    store.ensure_model_repository()


def provision_kafka(settings: Settings) -> None:
    from ctloop.bus import ensure_topics

    ensure_topics(settings)


def until_done(
    what: str, step: Callable[[Settings], None], settings: Settings, timeout_s: float
) -> None:
    """Call ``step(settings)`` until it succeeds or ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    delay = 1.0
    while True:
        try:
            step(settings)
            log.info("provisioned", extra={"what": what})
            return
        except Exception as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("not ready yet", extra={"what": what, "error": repr(exc)})
            time.sleep(delay)
            delay = min(delay * 2, 15.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ctloop.provision", description=__doc__)
    parser.add_argument("--s3", action="store_true", help="buckets and the model repository")
    parser.add_argument("--kafka", action="store_true", help="the event topics")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to keep trying")
    args = parser.parse_args(argv)
    settings = get_settings()
    configure_logging(settings.log_level)
    everything = not (args.s3 or args.kafka)
    if args.s3 or everything:
        until_done("s3", provision_s3, settings, args.timeout)
    if args.kafka or everything:
        until_done("kafka", provision_kafka, settings, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
