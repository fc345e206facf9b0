"""The ``ctloop`` command line."""

from __future__ import annotations

import argparse
import sys

from ctloop.log import configure_logging
from ctloop.settings import get_settings


def _stack(args: argparse.Namespace) -> int:
    from ctloop.stack import LocalStack, StackError

    settings = get_settings()
    stack = LocalStack(settings)
    try:
        if args.action == "up":
            stack.up()
            return 0
        if args.action == "down":
            stack.down()
            return 0
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    healthy = True
    for status in stack.status():
        print(status.line())
        if status.log_tail:
            print("  last lines of its log:")
            print("\n".join(f"    {line}" for line in status.log_tail.splitlines()))
        healthy &= status.healthy
    return 0 if healthy else 1


def _info(_: argparse.Namespace) -> int:
    s = get_settings()
    print("ctloop local stack")
    print(f"  run directory   {s.run_dir}")
    print(f"  Kafka           {s.kafka.bootstrap_servers}")
    print(f"  S3              {s.s3.url} (buckets {s.s3.bucket}, {s.s3.model_bucket})")
    print(f"                  access key {s.s3.access_key}; secret in CTLOOP_S3__SECRET_KEY")
    print(f"  Triton (gRPC)   {s.triton.grpc_url}")
    print(f"  Triton (HTTP)   http://{s.triton.host}:{s.triton.http_port}/v2/health/ready")
    print(f"  database        {s.database_url.split('@')[-1]}")
    print(f"  logs            {s.logs_dir}")
    print("Stop it with `make stack-down`; check it with `make stack-status`.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ctloop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    stack = sub.add_parser("stack", help="manage the embedded local stack")
    stack.add_argument("action", choices=["up", "down", "status"])
    stack.set_defaults(func=_stack)
    info = sub.add_parser("info", help="print how to reach the running stack")
    info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    configure_logging(get_settings().log_level)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
