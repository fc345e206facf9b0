"""Finding the Triton replicas: the real resolver (getaddrinfo) and the ``host:port`` list."""

from __future__ import annotations

import pytest

from ctloop.settings import Settings, TritonSettings
from ctloop.triton_replicas import (
    TritonReplicas,
    replica_addresses,
    resolve_all,
    split_host_port,
)


def test_a_name_resolves_to_its_ipv4_addresses_once():
    # localhost is 127.0.0.1 and often ::1 too: one server, not two.
    assert resolve_all("localhost", 8001) == ["127.0.0.1:8001"]
    assert resolve_all("127.0.0.1", 18001) == ["127.0.0.1:18001"]


def test_an_ipv6_only_name_keeps_its_brackets():
    assert resolve_all("::1", 8001) == ["[::1]:8001"]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("triton-replicas:8001", ("triton-replicas", 8001)),
        ("triton-replicas", ("triton-replicas", 7)),
        ("[::1]:8001", ("::1", 8001)),
        ("[::1]", ("::1", 7)),
        (" 10.0.0.5:9 ", ("10.0.0.5", 9)),
    ],
)
def test_entries_are_host_and_port_with_a_default_port(entry, expected):
    assert split_host_port(entry, 7) == expected


def test_every_entry_is_resolved_and_each_address_counted_once():
    dns = {"a": ["10.0.0.1", "10.0.0.2"], "b": ["10.0.0.2", "10.0.0.3"]}

    def resolve(host: str, port: int) -> list[str]:
        return [f"{ip}:{port}" for ip in dns.get(host, [host])]

    assert replica_addresses("a:1, b:1,", 5, resolve) == ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]
    assert replica_addresses("localhost:28401,127.0.0.1:28411", 5) == [
        "127.0.0.1:28401",
        "127.0.0.1:28411",
    ]


def test_without_replicas_the_one_server_is_grpc_url():
    plain = Settings(triton=TritonSettings(grpc_port=18001))
    assert TritonReplicas(plain).addresses() == ["127.0.0.1:18001"]
    listed = Settings(triton=TritonSettings(replicas="localhost", grpc_port=18001))
    assert TritonReplicas(listed).addresses() == ["127.0.0.1:18001"]


def test_clients_of_replicas_that_went_away_are_closed():
    pods = ["10.0.0.1", "10.0.0.2"]
    settings = Settings(triton=TritonSettings(replicas="headless:8001"))
    replicas = TritonReplicas(settings, lambda h, p: [f"{ip}:{p}" for ip in pods])
    first, second = (replicas.client(a) for a in replicas.addresses())
    assert replicas.client("10.0.0.1:8001") is first
    pods.pop()
    assert replicas.addresses() == ["10.0.0.1:8001"]
    assert replicas.client("10.0.0.2:8001") is not second  # a new one if it comes back
    replicas.close()
