"""The network policies allow exactly the flows of the chart's flow table, nothing more, nothing
less; the ServiceMonitor scrapes each component on the port the table names; and the table
holds every flow the services' own code dials.

The table (helm/ctloop/files/flows.yaml) names ports; the port numbers below are the chart's
defaults, written here independently. "ingress-controller" and "prometheus" are the namespaces
named in values (networkPolicy.*NamespaceSelector).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from ctloop.settings import REPO_ROOT
from tests.helm.conftest import CHART, Doc, named, of_kind, render

PORTS = {
    "ingest": {"http": 8000, "grpc": 50051},
    "inference": {"http": 18100, "grpc": 50052},
    "training": {"http": 18200, "grpc": 50053},
    "metrics": {"http": 18300, "grpc": 50054},
    "triton": {"grpc": 8001, "metrics": 8002},
    "kafka": {"kafka": 9092, "controller": 9093},
    "minio": {"s3": 9000},
    "postgresql": {"postgresql": 5432},
}
ANY = "any port"
TABLE = yaml.safe_load((CHART / "files" / "flows.yaml").read_text())
SERVICES = ("ingest", "inference", "training", "metrics")

FLOWS: set[tuple[str, str, Any]] = {
    (src, dst, PORTS[dst][port]) for src, dst, port in TABLE["flows"]
}
FLOWS |= {
    ("training-job", "training-job", ANY),  # rendezvous and NCCL among a round's pods
    ("ingress-controller", "ingest", PORTS["ingest"]["http"]),  # clients reach the REST API
}
FLOWS |= {("prometheus", c, PORTS[c][port]) for c, port in TABLE["scraped"]}


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
        if d["kind"] in ("Deployment", "StatefulSet", "Job")
    }
    test_pods = {  # `helm test` hooks
        d["metadata"]["labels"]["app.kubernetes.io/component"] for d in of_kind(docs, "Pod")
    }
    assert test_pods == {"release-check"}
    assert workloads | test_pods | {"training-job"} == covered
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


# What a service's code reveals about whom it dials (its whole package, as text).
_DIALS = {
    "kafka": re.compile(r"\b(EventProducer|EventConsumer|start_service)\("),
    "minio": re.compile(r"\b(ObjectStore|ModelRepository)\("),
    "postgresql": re.compile(r"\b(session_scope|start_service|create_schema)\("),
    "triton": re.compile(r"\bTritonModels\("),
}


def code_flows(service: str) -> set[tuple[str, str, str]]:
    """(service, peer, named port) for every peer the service's code dials: another service's
    gRPC target or HTTP address, the bus, the object store, the database, Triton."""
    text = "\n".join(p.read_text() for p in (REPO_ROOT / "services" / service).rglob("*.py"))
    found = {(service, peer, "grpc") for peer in re.findall(r'grpc_target\("(\w+)"\)', text)}
    found |= {(service, peer, "http") for peer in re.findall(r"\.(\w+)\.address\b", text)}
    ports = {"kafka": "kafka", "minio": "s3", "postgresql": "postgresql", "triton": "grpc"}
    found |= {(service, peer, ports[peer]) for peer, rx in _DIALS.items() if rx.search(text)}
    return found


def test_the_table_holds_exactly_the_flows_the_services_code_dials():
    """The chart's table cannot drift from the code: a dashboard that reads the metrics report
    needs ingest -> metrics, whatever the table says."""
    table = {tuple(f) for f in TABLE["flows"] if f[0] in SERVICES}
    dialled = set().union(*(code_flows(s) for s in SERVICES))
    assert ("ingest", "metrics", "http") in dialled
    assert table == dialled


def test_the_service_monitor_scrapes_each_component_on_its_metrics_port_only():
    docs = render(set_values=("serviceMonitor.enabled=true",))
    (monitor,) = of_kind(docs, "ServiceMonitor")
    scraped: set[tuple[str, str]] = set()
    services = {
        s["metadata"]["labels"]["app.kubernetes.io/component"]: {
            p["name"] for p in s["spec"]["ports"]
        }
        for s in of_kind(docs, "Service")
        if s["metadata"]["labels"].get("ctloop.org/metrics") == "true"
    }
    for endpoint in monitor["spec"]["endpoints"]:
        (keep,) = [r for r in endpoint["relabelings"] if r["action"] == "keep"]
        for component in keep["regex"].split("|"):
            assert endpoint["port"] in services[component], (component, endpoint["port"])
            scraped.add((component, endpoint["port"]))
    assert scraped == {tuple(s) for s in TABLE["scraped"]}
    assert ("triton", "http") not in scraped and set(services) == {c for c, _ in scraped}
