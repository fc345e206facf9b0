"""The network policies allow exactly the flows of the design, nothing more, nothing less.

FLOWS is the design's flow table (shared/DESIGN.md, "Shape" and the component table), written
once here and independently of the chart: (from, to, port). "ingress-controller" and
"prometheus" are the namespaces named in values (networkPolicy.*NamespaceSelector).
"""

from __future__ import annotations

from typing import Any

from tests.helm.conftest import Doc, named, of_kind, render

INGEST_HTTP, INGEST_GRPC = 8000, 50051
INFERENCE_HTTP, INFERENCE_GRPC = 18100, 50052
TRAINING_HTTP, TRAINING_GRPC = 18200, 50053
METRICS_HTTP = 18300
TRITON_GRPC, TRITON_METRICS = 8001, 8002
KAFKA, KAFKA_CONTROLLER, S3, POSTGRESQL = 9092, 9093, 9000, 5432
ANY = "any port"

FLOWS: set[tuple[str, str, Any]] = {
    # clients reach the REST API through the ingress controller
    ("ingress-controller", "ingest", INGEST_HTTP),
    # ingest: Segment (inference) and train requests (training) over gRPC; events, blobs, state
    ("ingest", "inference", INFERENCE_GRPC),
    ("ingest", "training", TRAINING_GRPC),
    ("ingest", "kafka", KAFKA),
    ("ingest", "minio", S3),
    ("ingest", "postgresql", POSTGRESQL),
    # inference: Triton over gRPC, events, masks, its outbox
    ("inference", "triton", TRITON_GRPC),
    ("inference", "kafka", KAFKA),
    ("inference", "minio", S3),
    ("inference", "postgresql", POSTGRESQL),
    # training: asks ingest for its data, events, the model repository, rounds
    ("training", "ingest", INGEST_GRPC),
    ("training", "kafka", KAFKA),
    ("training", "minio", S3),
    ("training", "postgresql", POSTGRESQL),
    # metrics: every topic, and the masks it scores
    ("metrics", "kafka", KAFKA),
    ("metrics", "minio", S3),
    # Triton loads models from the S3 repository
    ("triton", "minio", S3),
    # a round's pods: their data in S3, rendezvous and NCCL among themselves
    ("training-job", "minio", S3),
    ("training-job", "training-job", ANY),
    # the Kafka quorum
    ("kafka", "kafka", KAFKA),
    ("kafka", "kafka", KAFKA_CONTROLLER),
    # Prometheus scrapes /metrics
    ("prometheus", "ingest", INGEST_HTTP),
    ("prometheus", "inference", INFERENCE_HTTP),
    ("prometheus", "training", TRAINING_HTTP),
    ("prometheus", "metrics", METRICS_HTTP),
    ("prometheus", "triton", TRITON_METRICS),
}
# Egress outside the release: DNS for everyone, the API server for training (Jobs).
EXTERNAL_EGRESS = {("training", "kube-apiserver", 443), ("training", "kube-apiserver", 6443)}


def peer_name(peer: Doc) -> str:
    if "podSelector" in peer and "namespaceSelector" not in peer:
        return str(peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"])
    if "namespaceSelector" in peer:
        ns = peer["namespaceSelector"].get("matchLabels", {}).get("kubernetes.io/metadata.name")
        if peer.get("podSelector", {}).get("matchLabels", {}).get("k8s-app") == "kube-dns":
            return "dns"
        return {"ingress-nginx": "ingress-controller", "monitoring": "prometheus"}.get(ns, str(ns))
    if "ipBlock" in peer:
        return "ip:" + peer["ipBlock"]["cidr"]
    raise AssertionError(f"unexpected peer {peer}")


def rule_ports(rule: Doc) -> list[Any]:
    return [p["port"] for p in rule.get("ports", [])] or [ANY]


def flows(docs: list[Doc]) -> tuple[set[tuple[str, str, Any]], set[tuple[str, str, Any]]]:
    """(flows the ingress rules allow, flows the egress rules allow), DNS left out."""
    ingress, egress = set(), set()
    for policy in of_kind(docs, "NetworkPolicy"):
        me = policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]  # default deny both ways
        for rule in policy["spec"].get("ingress", []):
            for peer in rule["from"]:
                ingress |= {(peer_name(peer), me, port) for port in rule_ports(rule)}
        for rule in policy["spec"].get("egress", []):
            targets = [peer_name(p) for p in rule.get("to", [])] or ["anywhere"]
            egress |= {(me, t, port) for t in targets for port in rule_ports(rule) if t != "dns"}
    return ingress, egress


def test_ingress_rules_are_exactly_the_design_flows():
    ingress, _ = flows(render())
    assert ingress == FLOWS


def test_egress_rules_are_exactly_the_design_flows():
    _, egress = flows(render())
    internal = {f for f in FLOWS if f[0] not in ("ingress-controller", "prometheus")}
    api = {("training", "anywhere", 443), ("training", "anywhere", 6443)}
    assert egress == internal | api


def test_every_component_is_default_deny_and_only_dns_is_open_to_all():
    docs = render()
    covered = {
        p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        for p in of_kind(docs, "NetworkPolicy")
    }
    workloads = {
        d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
    }
    assert workloads | {"training-job"} == covered
    for policy in of_kind(docs, "NetworkPolicy"):
        dns = policy["spec"]["egress"][0]
        assert {p["port"] for p in dns["ports"]} == {53}
        assert dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}


def test_the_api_server_can_be_pinned_to_its_address():
    docs = render(set_values=("networkPolicy.kubeApiServer.cidrs={10.0.0.1/32}",))
    _, egress = flows(docs)
    assert ("training", "ip:10.0.0.1/32", 443) in egress
    assert not any(t == "anywhere" for _, t, _ in egress)


def test_with_external_services_their_flows_go_to_the_given_peers_and_ports():
    from tests.helm.conftest import EXAMPLES

    docs = render(next(f for f in EXAMPLES if f.stem == "external-services"))
    names = {p["metadata"]["name"] for p in of_kind(docs, "NetworkPolicy")}
    assert not names & {"ctloop-kafka", "ctloop-minio", "ctloop-postgresql"}
    _, egress = flows(docs)
    assert ("ingest", "data", 9092) in egress  # the Kafka namespace's peers
    assert ("triton", "ip:10.40.12.0/24", 443) in egress  # S3 over TLS
    assert ("training", "ip:10.40.20.15/32", 5432) in egress
    assert ("ingest", "ip:10.40.30.0/24", 443) in egress  # OIDC and the PACS
    assert not any(f[1] in ("kafka", "minio", "postgresql") for f in egress)
    policy = named(docs, "NetworkPolicy", "metrics")
    assert "10.40.30" not in str(policy["spec"]["egress"])  # only ingest reaches OIDC / PACS


def test_policies_can_be_switched_off():
    assert not of_kind(render(set_values=("networkPolicy.enabled=false",)), "NetworkPolicy")
