"""Which Triton servers are the replicas, and a gRPC client to each.

Behind one Kubernetes Service, inference requests may go to any Triton replica, but explicit
model control is per server: a load through the Service reaches one pod. So loads and status
questions go to each replica by its own address, found again at every call (pods come and go):
``settings.triton.replicas`` lists ``host:port`` entries, and every host is resolved to all its
addresses (a headless Service name gives one per ready pod). Unset, the one server is
``settings.triton.grpc_url``.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

import tritonclient.grpc as triton_grpc

from ctloop.settings import Settings

# host, port -> every "address:port" that host stands for
Resolver = Callable[[str, int], list[str]]


def resolve_all(host: str, port: int) -> list[str]:
    """Every address of ``host`` (all its A records; AAAA ones only when it has no A record,
    so a dual-stack pod, or localhost's ::1 beside 127.0.0.1, counts once)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    v4 = sorted({str(i[4][0]) for i in infos if i[0] == socket.AF_INET})
    if v4:
        return [f"{a}:{port}" for a in v4]
    v6 = sorted({str(i[4][0]) for i in infos if i[0] == socket.AF_INET6})
    return [f"[{a}]:{port}" for a in v6]


def split_host_port(entry: str, default_port: int) -> tuple[str, int]:
    """``host:port``, ``host`` or ``[v6]:port`` -> (host, port)."""
    entry = entry.strip()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    host, sep, port = entry.rpartition(":")
    return (host, int(port)) if sep else (entry, default_port)


def replica_addresses(spec: str, default_port: int, resolve: Resolver = resolve_all) -> list[str]:
    """The ``address:port`` of every replica ``spec`` names, each once, in the given order."""
    found: list[str] = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        for address in resolve(*split_host_port(entry, default_port)):
            if address not in found:
                found.append(address)
    return found


class TritonReplicas:
    """The current replica set and one client per replica (kept while it stays in the set)."""

    def __init__(self, settings: Settings, resolve: Resolver = resolve_all) -> None:
        self.spec = settings.triton.replicas
        self.default_port = settings.triton.grpc_port
        self.single = settings.triton.grpc_url
        self.resolve = resolve
        self._clients: dict[str, triton_grpc.InferenceServerClient] = {}
        self._lock = threading.Lock()

    def describe(self) -> str:
        return self.spec or self.single

    def addresses(self) -> list[str]:
        """Resolved now; clients of replicas that have gone are closed."""
        current = (
            replica_addresses(self.spec, self.default_port, self.resolve)
            if self.spec
            else [self.single]
        )
        with self._lock:
            for address in set(self._clients) - set(current):
                self._clients.pop(address).close()
        return current

    def client(self, address: str) -> triton_grpc.InferenceServerClient:
        with self._lock:
            found = self._clients.get(address)
            if found is None:
                found = self._clients[address] = triton_grpc.InferenceServerClient(address)
            return found

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()
