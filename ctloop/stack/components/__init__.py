"""The real servers of the embedded stack, one module each, and the set a stack runs.

:mod:`.base` says what a component is; :mod:`.kafka`, :mod:`.s3_gateway`, :mod:`.triton`,
:mod:`.sqlite` and :mod:`.postgres` are the servers; :func:`stack_components` picks those this
configuration runs locally, in start order. Callers import every name from this package.
"""

from __future__ import annotations

from ctloop.settings import Settings
from ctloop.stack.components.base import Component, Health, StackError, port_open
from ctloop.stack.components.kafka import KafkaBroker
from ctloop.stack.components.postgres import PostgresDatabase
from ctloop.stack.components.s3_gateway import S3Gateway
from ctloop.stack.components.sqlite import SqliteDatabase
from ctloop.stack.components.triton import TritonServer

__all__ = [
    "Component",
    "Health",
    "KafkaBroker",
    "PostgresDatabase",
    "S3Gateway",
    "SqliteDatabase",
    "StackError",
    "TritonServer",
    "port_open",
    "stack_components",
]


def stack_components(settings: Settings) -> list[Component]:
    """The embedded components in start order (Triton reads its model repository from S3).

    A component whose external endpoint is configured (an existing database, S3 service,
    Kafka cluster or Triton) is not run locally.
    """
    components: list[Component] = []
    if settings.db.url is None:
        components.append(
            PostgresDatabase(settings)
            if settings.db.backend == "postgresql"
            else SqliteDatabase(settings)
        )
    if settings.s3.external_endpoint is None:
        components.append(S3Gateway(settings))
    if settings.kafka.external_bootstrap is None:
        components.append(KafkaBroker(settings))
    if settings.triton.external_url is None:
        components.append(TritonServer(settings))
    return components
