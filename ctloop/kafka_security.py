"""Kafka authentication and authorisation: each client's SASL/SCRAM credential, the
credentials file of the local stack, and applying the grants of
:mod:`ctloop.contracts.kafka_acls` to a broker.

``python -m ctloop.kafka_security`` (as ``admin``) creates or updates every service's SCRAM
credential from ``CTLOOP_KAFKA_PASSWORD_<PRINCIPAL>`` variables when given, then the topics and
the ACLs: a container beside each of the chart's brokers runs it (``--stay``); the local stack
does the same at start.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ctloop.contracts.kafka_acls import (
    ADMIN,
    GRANTS,
    MECHANISM,
    PLAIN,
    PREFIXED,
    PRINCIPALS,
    TOPIC,
    AclRow,
    acl_rows,
)
from ctloop.settings import Settings, running_service

log = logging.getLogger(__name__)


class MissingCredential(RuntimeError):
    """The credentials file has no password for the principal this process is."""


def new_passwords() -> dict[str, str]:
    """A fresh random password for every principal."""
    return {name: secrets.token_urlsafe(24) for name in PRINCIPALS}


def write_credentials(path: Path, passwords: dict[str, str], admin_plain: bool = False) -> None:
    """Write ``passwords`` to ``path``, readable by this user only (created 0600, never wider).
    ``admin_plain``: the broker does not know the admin's SCRAM credential yet (storage
    formatted before SASL), so the admin signs in with PLAIN until it has put it there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    doc: dict[str, Any] = {"mechanism": MECHANISM, "users": passwords}
    if admin_plain:
        doc["admin_mechanism"] = PLAIN
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1)
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def read_credentials(path: Path) -> dict[str, str]:
    """Principal -> password, from a file :func:`write_credentials` wrote."""
    users = json.loads(path.read_text())["users"]
    return {str(k): str(v) for k, v in users.items()}


def admin_mechanism(path: Path) -> str:
    """The SASL mechanism the admin signs in with (PLAIN only while a migration is pending)."""
    return str(json.loads(path.read_text()).get("admin_mechanism", MECHANISM))


def credentials_path(settings: Settings) -> Path | None:
    """The credentials file this process reads: its run folder's, else the configured one."""
    for path in (settings.kafka_credentials_file, settings.kafka.credentials_file):
        if path is not None and path.is_file():
            return path
    return None


def principal(settings: Settings) -> str:
    """Who this process is on the bus: ``kafka.principal``, else the service it runs, else
    ``admin`` (the stack, the operator's tools, the tests)."""
    return settings.kafka.principal or running_service(GRANTS) or ADMIN


def produced_topics(settings: Settings) -> frozenset[str] | None:
    """The topics this process's principal may write (None: admin, every topic). A service's
    outbox relay sends only these rows: the outbox is one table in the shared database, and a
    row another service staged is that service's to send (the broker would refuse it)."""
    grant = GRANTS.get(principal(settings))
    return None if grant is None else frozenset(str(t) for t in grant.produces)


def client_credential(settings: Settings) -> tuple[str, str, str] | None:
    """(principal, password, SASL mechanism) this process authenticates with; None: the broker
    has no SASL."""
    k = settings.kafka
    name = principal(settings)
    if k.password is not None:
        return name, k.password.get_secret_value(), MECHANISM
    path = credentials_path(settings)
    if path is None:
        return None
    passwords = read_credentials(path)
    if name not in passwords:
        raise MissingCredential(f"{path} has no Kafka credential for {name!r}")
    mechanism = admin_mechanism(path) if name == ADMIN else MECHANISM
    return name, passwords[name], mechanism


def client_config(settings: Settings) -> dict[str, Any]:
    """The connection arguments of every kafka-python client (producer, consumer, admin)."""
    config: dict[str, Any] = {"bootstrap_servers": settings.kafka.bootstrap_servers}
    credential = client_credential(settings)
    if credential is not None:
        config.update(
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism=credential[2],
            sasl_plain_username=credential[0],
            sasl_plain_password=credential[1],
        )
    return config


def is_restricted(settings: Settings) -> bool:
    """Whether this process is a service principal (not ``admin``) on a SASL broker: it may not
    create topics or change their configuration."""
    return client_credential(settings) is not None and principal(settings) != ADMIN


def _acl(row: AclRow) -> Any:
    from kafka.admin import (
        ACL,
        ACLOperation,
        ACLPermissionType,
        ACLResourcePatternType,
        ResourcePattern,
        ResourceType,
    )

    return ACL(
        principal=f"User:{row.principal}",
        host="*",
        operation=ACLOperation[row.operation.upper()],
        permission_type=ACLPermissionType.ALLOW,
        resource_pattern=ResourcePattern(
            ResourceType.TOPIC if row.resource == TOPIC else ResourceType.GROUP,
            row.name,
            ACLResourcePatternType.PREFIXED
            if row.pattern == PREFIXED
            else ACLResourcePatternType.LITERAL,
        ),
    )


def apply_grants(settings: Settings, passwords: dict[str, str] | None = None) -> None:
    """As ``admin``: upsert the SCRAM credential of each principal in ``passwords``, then
    create the table's ACLs (creating an ACL that exists is a no-op). Idempotent."""
    from kafka import KafkaAdminClient
    from kafka.admin import UserScramCredentialUpsertion

    admin = KafkaAdminClient(client_id="ctloop-grants", **client_config(settings))
    try:
        if passwords:
            upserts = [
                UserScramCredentialUpsertion(name, MECHANISM, pw)
                for name, pw in sorted(passwords.items())
            ]
            failed = {u: e for u, e in admin.alter_user_scram_credentials(upserts).items() if e}
            if failed:
                raise RuntimeError(f"SCRAM credentials refused: {failed}")
        rows = acl_rows(settings.kafka.group_prefix)
        acls = [_acl(r) for r in rows]
        result = admin.create_acls(acls)
        if result["failed"]:
            raise RuntimeError(f"ACLs refused: {result['failed']}")
        _until_in_force(admin, acls)
    finally:
        admin.close()
    log.info("kafka grants applied", extra={"acls": len(rows), "principals": sorted(GRANTS)})


def _key(acl: Any) -> tuple[str, int, int, str, int]:
    pattern = acl.resource_pattern
    return (
        acl.principal,
        int(acl.operation),
        int(pattern.resource_type),
        pattern.resource_name,
        int(pattern.pattern_type),
    )


def _until_in_force(admin: Any, acls: list[Any], timeout_s: float = 30.0) -> None:
    """Wait until the broker's authorizer has ``acls``: the controller commits them first and
    the broker applies its metadata a moment later (a client right after would be refused). The
    credentials were written before them, so they are in force too."""
    from kafka.admin import (
        ACLFilter,
        ACLOperation,
        ACLPermissionType,
        ACLResourcePatternType,
        ResourcePatternFilter,
        ResourceType,
    )

    anything = ACLFilter(
        principal=None,
        host=None,
        operation=ACLOperation.ANY,
        permission_type=ACLPermissionType.ANY,
        resource_pattern=ResourcePatternFilter(ResourceType.ANY, None, ACLResourcePatternType.ANY),
    )
    wanted = {_key(a) for a in acls}
    deadline = time.monotonic() + timeout_s
    while True:
        described, _ = admin.describe_acls(anything)
        missing = wanted - {_key(a) for a in described}
        if not missing:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(missing)} ACLs not in force after {timeout_s:.0f}s")
        time.sleep(0.2)


def grant_groups(settings: Settings) -> None:
    """Let the services of a platform instance use its consumer groups (its own
    ``kafka.group_prefix``) on a SASL broker; as ``admin``, nothing without SASL."""
    if client_credential(settings) is not None:
        apply_grants(settings)


def _passwords_from_env() -> dict[str, str]:
    """``CTLOOP_KAFKA_PASSWORD_<PRINCIPAL>`` variables (the chart's Secrets), by principal."""
    found = {name: os.environ.get(f"CTLOOP_KAFKA_PASSWORD_{name.upper()}") for name in GRANTS}
    return {name: pw for name, pw in found.items() if pw}


def main(argv: list[str] | None = None) -> int:
    from ctloop.bus import ensure_topics
    from ctloop.log import configure_logging
    from ctloop.provision import until_done
    from ctloop.settings import get_settings

    parser = argparse.ArgumentParser(prog="python -m ctloop.kafka_security", description=__doc__)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to keep trying")
    parser.add_argument(
        "--stay", type=Path, metavar="READY_FILE", help="then write READY_FILE and keep running"
    )
    args = parser.parse_args(argv)
    settings = get_settings()
    configure_logging(settings.log_level)
    passwords = _passwords_from_env()
    until_done("kafka topics", ensure_topics, settings, args.timeout)
    until_done("kafka grants", lambda s: apply_grants(s, passwords), settings, args.timeout)
    if args.stay:  # a container beside the broker: its probes look for the file
        args.stay.write_text("grants applied\n")
        threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
