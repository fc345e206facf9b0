"""The ``ctloop`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ctloop.cli_run import add_run_commands
from ctloop.log import configure_logging
from ctloop.settings import get_settings
from ctloop.stack.manager import ComponentStatus


def _stack(args: argparse.Namespace) -> int:
    from ctloop.stack import LocalStack, StackError
    from ctloop.stack.services import service_components

    settings = get_settings()
    if args.command == "services":
        stack = LocalStack(settings, components=service_components(settings))
    else:
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
    return _print_status(stack.status())


def _status(_: argparse.Namespace) -> int:
    from ctloop.stack import LocalStack
    from ctloop.stack.services import service_components

    settings = get_settings()
    servers = LocalStack(settings).status()
    services = LocalStack(settings, components=service_components(settings)).status()
    return _print_status(servers + services)


def _print_status(statuses: list[ComponentStatus]) -> int:
    healthy = True
    for status in statuses:
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
    svc = s.services
    print(f"  ingest API      http://{svc.host}:{svc.ingest.http_port}/docs")
    for name in ("inference", "training", "metrics"):
        ep = getattr(svc, name)
        print(
            f"  {name:<15} http://{svc.host}:{ep.http_port}/readyz, gRPC {svc.host}:{ep.grpc_port}"
        )
    print("Check everything with `ctloop status`; stop with `make services-down stack-down`.")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from ctloop.core.datasets import synthesize_dataset
    from ctloop.core.phantom import SITES

    if args.list_sites:
        for name, profile in SITES.items():
            print(f"{name:<12} {profile.phase:<12} {profile.description}")
        return 0
    if args.out is None:
        print("error: --out is required (or --list-sites)", file=sys.stderr)
        return 2
    ds = synthesize_dataset(
        args.out, args.site, args.count, args.seed, args.size, with_labels=not args.unlabelled
    )
    print(f"wrote {len(ds)} volumes of site {args.site!r} to {args.out} (dataset.json)")
    return 0


def _train(args: argparse.Namespace) -> int:
    from ctloop.core.model import ModelConfig
    from ctloop.core.train import DataSource, TrainConfig, train

    model = ModelConfig()
    if args.spacing:
        model = model.model_copy(update={"spacing": tuple(args.spacing)})
    cfg = TrainConfig(
        model=model,
        sources=[DataSource(path=p) for p in args.data],
        out=args.out,
        init_from=args.init_from,
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
        meta={"name": args.name},
    )
    if args.nproc > 1:
        import subprocess
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            f.write(cfg.model_dump_json())
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={args.nproc}",
            "-m",
            "ctloop.core.train",
            f.name,
        ]
        return subprocess.call(cmd)
    summary = train(cfg)
    print(f"wrote {args.out} after {summary['steps']} steps in {summary['seconds']:.0f}s")
    return 0


def _segment(args: argparse.Namespace) -> int:

    from ctloop.core.datasets import DecathlonDataset, save_nifti
    from ctloop.core.infer import Segmenter
    from ctloop.core.metrics import mean_dice

    segmenter = Segmenter(args.checkpoint)
    ds = DecathlonDataset.open(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    report = []
    for i, vol in enumerate(ds):
        result = segmenter(vol.image, vol.affine)
        save_nifti(args.out / f"{vol.id}.nii.gz", result.label, vol.affine)
        row = {"id": vol.id, "uncertainty": result.uncertainty}
        if vol.label is not None:
            row["mean_dice"] = mean_dice(result.label, vol.label)
        report.append(row)
        print(
            f"[{i + 1}/{len(ds)}] {vol.id} "
            + " ".join(f"{k}={v:.3f}" for k, v in row.items() if k != "id")
        )
    (args.out / "segmentation.json").write_text(json.dumps(report, indent=2))
    return 0


def _admin_pacs(client: Any, args: argparse.Namespace) -> Any:
    """``ctloop admin pacs list|add|remove SITE [URL]``: a site's DICOMweb services."""
    path = f"/v1/sites/{args.site}/dicomweb-sources"
    if args.action == "list":
        return client.get(path)
    if not args.url:
        raise SystemExit(f"error: ctloop admin pacs {args.action} needs a URL")
    if args.action == "add":
        return client.post(path, json={"url": args.url})
    return client.delete(path, params={"url": args.url})


def _admin_user(client: Any, args: argparse.Namespace) -> Any:
    """``ctloop admin user ID --role R [--site S]`` adds a user; ``user disable|enable ID``."""
    if args.id in ("disable", "enable"):
        if not args.target:
            raise SystemExit(f"error: ctloop admin user {args.id} needs a user id")
        return client.post(f"/v1/users/{args.target}/{args.id}")
    if not args.role:
        raise SystemExit("error: ctloop admin user ID needs --role")
    return client.post("/v1/users", json={"id": args.id, "role": args.role, "sites": args.site})


def _every_page(client: Any, path: str, params: dict[str, Any]) -> Any:
    """Every item of a paged list (``X-Next-Cursor``), as one answer (the first error as is)."""
    import httpx

    from ctloop.paging import MAX_LIMIT

    items: list[Any] = []
    cursor = None
    while True:
        r = client.get(
            path, params={**params, "limit": MAX_LIMIT, **({"cursor": cursor} if cursor else {})}
        )
        if r.status_code >= 400:
            return r
        items += r.json()
        cursor = r.headers.get("X-Next-Cursor")
        if not cursor:
            return httpx.Response(200, json=items)


def _admin_token(client: Any, args: argparse.Namespace) -> Any:
    """``ctloop admin token issue USER [--label L] [--expires-in DAYS]`` (printed once),
    ``token list [--user USER]``, ``token revoke SHA256``."""
    if args.action == "list":
        return _every_page(client, "/v1/tokens", {"user": args.user} if args.user else {})
    if not args.target:
        raise SystemExit(f"error: ctloop admin token {args.action} needs a user id or sha256")
    if args.action == "revoke":
        return client.delete(f"/v1/tokens/{args.target}")
    body = {"label": args.label, "expires_in_days": args.expires_in}
    return client.post(f"/v1/users/{args.target}/tokens", json=body)


def _admin_audit(client: Any, args: argparse.Namespace) -> Any:
    """``ctloop admin audit [RESOURCE] [--limit N]``; ``audit verify [--anchor ID:HASH]``
    checks the hash chain (exit status 1 when it finds a problem)."""
    if args.id == "verify":
        return client.get("/v1/audit/verify", params={"anchor": args.anchor} if args.anchor else {})
    return client.get(
        "/v1/audit", params={"limit": args.limit, **({"resource": args.id} if args.id else {})}
    )


def _admin(args: argparse.Namespace) -> int:
    """Administration through the ingest API, as the admin whose token is in .ctloop."""
    import os

    import httpx

    settings = get_settings()
    svc = settings.services
    url = args.api or f"http://{svc.host}:{svc.ingest.http_port}"
    token = args.token or os.environ.get("CTLOOP_TOKEN")
    if not token and settings.admin_token_file.exists():
        token = settings.admin_token_file.read_text().strip()
    if not token:
        print(
            f"error: no token (--token, CTLOOP_TOKEN or {settings.admin_token_file})",
            file=sys.stderr,
        )
        return 2
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    if args.what == "site":
        r = client.post("/v1/sites", json={"id": args.id, "name": args.name or args.id})
    elif args.what == "user":
        r = _admin_user(client, args)
    elif args.what == "token":
        r = _admin_token(client, args)
    elif args.what == "pacs":
        r = _admin_pacs(client, args)
    else:
        r = _admin_audit(client, args)
    if r.status_code >= 400:
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        print(
            f"error: {r.status_code} {body.get('code', '')}: {body.get('message', r.text)}",
            file=sys.stderr,
        )
        return 1
    if r.content:  # a removal answers 204, no body
        print(json.dumps(r.json(), indent=2))
    if args.what == "audit" and args.id == "verify" and not r.json()["ok"]:
        return 1
    return 0


def _add_operation_commands(sub: Any) -> None:
    """stack, services, status, admin, info: running and administering a platform."""
    stack = sub.add_parser("stack", help="manage the embedded local stack")
    stack.add_argument("action", choices=["up", "down", "status"])
    stack.set_defaults(func=_stack)
    services = sub.add_parser("services", help="run the ctloop services on the local stack")
    services.add_argument("action", choices=["up", "down", "status"])
    services.set_defaults(func=_stack)
    status = sub.add_parser("status", help="every server and service with its health")
    status.set_defaults(func=_status)
    admin = sub.add_parser("admin", help="create sites, users and tokens; read the audit log")
    admin.add_argument("--api", help="ingest API URL (default: from settings)")
    admin.add_argument("--token", help="admin token (default: CTLOOP_TOKEN or .ctloop/admin-token)")
    admin_sub = admin.add_subparsers(dest="what", required=True)
    site = admin_sub.add_parser("site", help="add a site")
    site.add_argument("id")
    site.add_argument("--name")
    user = admin_sub.add_parser(
        "user", help="add a user with a role and sites (ID --role R); disable ID; enable ID"
    )
    user.add_argument("id", help="the new user's id, or disable / enable")
    user.add_argument("target", nargs="?", help="the user to disable or enable")
    user.add_argument("--role", choices=["admin", "reviewer", "annotator", "integration"])
    user.add_argument("--site", action="append", default=[], help="repeat for several")
    token = admin_sub.add_parser(
        "token", help="issue USER (printed once), list [--user USER], revoke SHA256"
    )
    token.add_argument("action", choices=["issue", "list", "revoke"])
    token.add_argument("target", nargs="?", help="issue: the user; revoke: the token's sha256")
    token.add_argument("--label", default="")
    token.add_argument("--expires-in", type=int, metavar="DAYS", help="default: the settings'")
    token.add_argument("--user", help="list: only this user's tokens")
    audit_log = admin_sub.add_parser(
        "audit", help="recent audit entries; 'audit verify' checks the hash chain"
    )
    audit_log.add_argument("id", nargs="?", help="only this resource (e.g. a volume id), or verify")
    audit_log.add_argument("--limit", type=int, default=50)
    audit_log.add_argument("--anchor", help="verify: ID:HASH, the head an earlier check printed")
    pacs = admin_sub.add_parser("pacs", help="list, add or remove a site's DICOMweb services")
    pacs.add_argument("action", choices=["list", "add", "remove"])
    pacs.add_argument("site")
    pacs.add_argument("url", nargs="?", help="the service's base URL (add, remove)")
    admin.set_defaults(func=_admin)
    info = sub.add_parser("info", help="print how to reach the running stack")
    info.set_defaults(func=_info)


def _add_science_commands(sub: Any) -> None:
    """synth, train, segment: phantoms and the network, without the platform."""
    synth = sub.add_parser("synth", help="write synthetic CT phantoms as a Decathlon dataset")
    synth.add_argument("--site", default="public", help="built-in site name or a profile .json")
    synth.add_argument("--count", type=int, default=4)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", default="small", choices=["tiny", "small", "medium", "full"])
    synth.add_argument("--out", type=Path)
    synth.add_argument("--unlabelled", action="store_true", help="write images only")
    synth.add_argument("--list-sites", action="store_true", help="list the site profiles")
    synth.set_defaults(func=_synth)

    tr = sub.add_parser("train", help="train (or fine-tune) a network on dataset folders")
    tr.add_argument("--data", type=Path, nargs="+", required=True, help="Decathlon folders")
    tr.add_argument("--out", type=Path, required=True, help="checkpoint to write")
    tr.add_argument("--init-from", type=Path, help="fine-tune from this checkpoint")
    tr.add_argument("--steps", type=int, default=300)
    tr.add_argument("--lr", type=float, default=2e-3)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--spacing", type=float, nargs=3, help="training grid spacing (mm)")
    tr.add_argument("--name", default="igniter", help="recorded in the checkpoint")
    tr.add_argument("--nproc", type=int, default=1, help="processes (torchrun, DDP)")
    tr.set_defaults(func=_train)

    seg = sub.add_parser("segment", help="segment every volume of a dataset folder")
    seg.add_argument("--checkpoint", type=Path, required=True)
    seg.add_argument("--data", type=Path, required=True)
    seg.add_argument("--out", type=Path, required=True, help="folder for the masks")
    seg.set_defaults(func=_segment)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ctloop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_operation_commands(sub)
    _add_science_commands(sub)
    add_run_commands(sub)
    args = parser.parse_args(argv)
    configure_logging(get_settings().log_level)
    from pydantic import ValidationError

    from ctloop.core.datasets import DatasetError
    from ctloop.core.organs import UnknownLabel
    from ctloop.core.phantom import SiteError

    try:
        return int(args.func(args))
    except (DatasetError, UnknownLabel, SiteError, ValidationError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
