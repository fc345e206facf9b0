"""Several Triton replicas: explicit model control is per server, so the inference pods must
reach every Triton pod by its own address (a headless Service), while inference requests keep
going through the balancing Service."""

from __future__ import annotations

import pytest

from ctloop.triton_replicas import TritonReplicas, split_host_port
from tests.helm.conftest import Doc, named, of_kind, render
from tests.helm.test_settings_and_secrets import service_container, settings_of

HEADLESS = "ctloop-triton-replicas"


def _service(docs: list[Doc], name: str) -> Doc:
    (found,) = [d for d in of_kind(docs, "Service") if d["metadata"]["name"] == name]
    return found


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_inference_loads_models_on_every_triton_replica(replicas):
    docs = render(set_values=(f"triton.replicas={replicas}",))
    triton = named(docs, "Deployment", "triton")
    assert triton["spec"]["replicas"] == replicas
    pod_labels = triton["spec"]["template"]["metadata"]["labels"]
    (container,) = triton["spec"]["template"]["spec"]["containers"]
    grpc = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")

    # A headless Service over exactly Triton's ready pods: its name resolves to each of them.
    headless = _service(docs, HEADLESS)["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is False
    assert headless["selector"].items() <= pod_labels.items()
    assert headless["selector"] == named(docs, "Service", "triton")["spec"]["selector"]
    assert [(p["name"], p["targetPort"]) for p in headless["ports"]] == [("grpc", "grpc")]

    # The inference pods load through that name on Triton's gRPC port...
    s = settings_of(service_container(docs, "inference"))
    assert split_host_port(s.triton.replicas or "", 0) == (HEADLESS, grpc)
    pods = [f"10.0.0.{i}" for i in range(1, replicas + 1)]  # what cluster DNS answers

    def cluster_dns(host: str, port: int) -> list[str]:
        return [f"{ip}:{port}" for ip in pods] if host == HEADLESS else []

    reached = TritonReplicas(s, resolve=cluster_dns).addresses()
    assert reached == [f"{ip}:{grpc}" for ip in pods]
    # ... and send inference requests through the balancing ClusterIP Service.
    assert s.triton.grpc_url == f"ctloop-triton:{grpc}"
    assert named(docs, "Service", "triton")["spec"]["type"] == "ClusterIP"


def test_the_headless_service_is_not_scraped_twice():
    """Prometheus scrapes Triton through the ClusterIP Service only."""
    labels = _service(render(), HEADLESS)["metadata"]["labels"]
    assert "ctloop.org/metrics" not in labels
