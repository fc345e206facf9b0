"""Who may do what on the bus: the one table of Kafka principals and their grants.

Each service authenticates as its own principal (SASL/SCRAM-SHA-512) and the broker's
authorizer lets it write only the topics it produces, read only those it consumes, and use only
its own consumer groups. The local stack (ctloop/stack/components/kafka.py), the chart's ACL
Job (``python -m ctloop.kafka_security``) and the tests all read this table, so the grants
cannot drift from the producers and consumers the services really are. A forged
``model.published`` from any principal but training is refused by the broker.

The ``admin`` principal is the broker itself (inter-broker and controller traffic) and the
operator's tools: it is a super user and creates topics, credentials and ACLs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ctloop.contracts.topics import Topic

ADMIN = "admin"
MECHANISM = "SCRAM-SHA-512"
PLAIN = "PLAIN"  # the controller listener's mechanism (SCRAM credentials live in its metadata)


@dataclass(frozen=True)
class BusGrant:
    """What one service's principal may do. ``groups`` are consumer-group name prefixes (after
    ``kafka.group_prefix``): the metrics service takes a fresh group per process."""

    principal: str
    produces: frozenset[Topic]
    consumes: frozenset[Topic]
    groups: tuple[str, ...] = ()


_EVENTS = frozenset(t for t in Topic if t != Topic.DEAD_LETTER)

GRANTS: dict[str, BusGrant] = {
    g.principal: g
    for g in (
        # The REST API: uploads and corrections become events (through its outbox).
        BusGrant(
            "ingest",
            produces=frozenset({Topic.VOLUME_INGESTED, Topic.ANNOTATION_SUBMITTED}),
            consumes=frozenset(),
        ),
        # Every consumer dead-letters what it cannot handle, so produces to the dead letters.
        BusGrant(
            "inference",
            produces=frozenset({Topic.PREDICTION_COMPLETED, Topic.DEAD_LETTER}),
            consumes=frozenset({Topic.VOLUME_INGESTED, Topic.MODEL_PUBLISHED}),
            groups=("inference",),
        ),
        # The only principal that may announce (or roll back) a serving model.
        BusGrant(
            "training",
            produces=frozenset(
                {
                    Topic.TRAINING_STARTED,
                    Topic.TRAINING_COMPLETED,
                    Topic.MODEL_PUBLISHED,
                    Topic.DEAD_LETTER,
                }
            ),
            consumes=frozenset({Topic.VOLUME_INGESTED, Topic.ANNOTATION_SUBMITTED}),
            groups=("training",),
        ),
        BusGrant(
            "metrics",
            produces=frozenset({Topic.DEAD_LETTER}),
            consumes=_EVENTS,
            groups=("metrics-",),
        ),
    )
}

PRINCIPALS: tuple[str, ...] = (ADMIN, *GRANTS)

# Operations, by name: (resource type, pattern, resource name, operation) rows.
TOPIC, GROUP = "topic", "group"
LITERAL, PREFIXED = "literal", "prefixed"
READ, WRITE, DESCRIBE = "read", "write", "describe"


@dataclass(frozen=True, order=True)
class AclRow:
    """One ALLOW rule for ``User:<principal>``, from any host."""

    principal: str
    resource: str  # TOPIC or GROUP
    pattern: str  # LITERAL or PREFIXED
    name: str
    operation: str  # READ, WRITE or DESCRIBE


def acl_rows(group_prefix: str = "") -> list[AclRow]:
    """Every ALLOW rule the broker needs for the services (nothing else is allowed: the
    authorizer denies whatever no rule allows). Producing needs WRITE and DESCRIBE on the
    topic (idempotent producers need nothing on the cluster since Kafka 3.x: WRITE on a topic is
    enough); consuming needs READ and DESCRIBE on the topic and READ on the group."""
    rows: set[AclRow] = set()
    for g in GRANTS.values():
        for t in g.produces:
            rows |= {AclRow(g.principal, TOPIC, LITERAL, t, op) for op in (WRITE, DESCRIBE)}
        for t in g.consumes:
            rows |= {AclRow(g.principal, TOPIC, LITERAL, t, op) for op in (READ, DESCRIBE)}
        for name in g.groups:
            rows.add(AclRow(g.principal, GROUP, PREFIXED, group_prefix + name, READ))
    return sorted(rows)
