"""The chart's authenticated bus (issue 18, finding 7): brokers that speak only SASL with an
authorizer, one principal and one Secret per service (ctloop/contracts/kafka_acls.py), and the
ACLs created by the admin beside the brokers. On the chart before this the brokers were
PLAINTEXT with no authorizer and no pod had a Kafka credential."""

from __future__ import annotations

from typing import Any

from ctloop.contracts.kafka_acls import ADMIN, GRANTS, PRINCIPALS
from tests.helm.conftest import Doc, named, of_kind, render

SERVICES = sorted(GRANTS)


def _env(container: Doc) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _secret_refs(spec: Doc) -> set[str]:
    """Names of the Secrets a pod's containers read."""
    refs = set()
    for c in [*spec.get("initContainers", []), *spec["containers"]]:
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.add(ref["name"])
    return refs


def _kafka_secrets(spec: Doc) -> set[str]:
    return {name for name in _secret_refs(spec) if name.startswith("ctloop-kafka-")}


def test_brokers_speak_only_sasl_and_deny_what_no_acl_allows():
    docs = render()
    props = named(docs, "ConfigMap", "kafka")["data"]["server.properties"]
    assert "listener.security.protocol.map=BROKER:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT" in props
    assert "listener.name.broker.sasl.enabled.mechanisms=SCRAM-SHA-512" in props
    assert "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer" in props
    assert f"super.users=User:{ADMIN}\n" in props
    assert "PLAINTEXT://" not in props.replace("SASL_PLAINTEXT", "")
    start = named(docs, "ConfigMap", "kafka")["data"]["start.sh"]
    for p in PRINCIPALS:  # every principal's credential is stored when the storage is formatted
        assert f"[name={p},password=${{KAFKA_PASSWORD_{p.upper()}}}]" in start
    assert "advertised.listeners=BROKER://" in start


def test_each_service_signs_in_as_itself_with_only_its_own_secret():
    docs = render()
    for name in SERVICES:
        spec = named(docs, "Deployment", name)["spec"]["template"]["spec"]
        for c in [*spec["initContainers"], *spec["containers"]]:
            if c["name"] not in (name, "provision"):
                continue
            env = _env(c)
            assert env["CTLOOP_KAFKA__PRINCIPAL"] == name, (name, c["name"])
            ref = env["CTLOOP_KAFKA__PASSWORD"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == (f"ctloop-kafka-{name}", "password")
        assert _kafka_secrets(spec) == {f"ctloop-kafka-{name}"}, name


def test_only_the_brokers_pods_hold_the_admin_credential():
    docs = render()
    holders = [
        d["metadata"]["name"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet", "Job")
        and f"ctloop-kafka-{ADMIN}" in _secret_refs(d["spec"]["template"]["spec"])
    ]
    assert holders == ["ctloop-kafka"]
    pod = named(docs, "StatefulSet", "kafka")["spec"]["template"]["spec"]
    setup = next(c for c in pod["containers"] if c["name"] == "kafka-setup")
    assert setup["command"][:4] == ["python", "-m", "ctloop.kafka_security", "--stay"]
    env = _env(setup)
    assert env["CTLOOP_KAFKA__PRINCIPAL"] == ADMIN
    for p in SERVICES:  # it keeps each service's SCRAM credential equal to its Secret
        assert env[f"CTLOOP_KAFKA_PASSWORD_{p.upper()}"]["secretKeyRef"]["name"] == (
            f"ctloop-kafka-{p}"
        )
    assert not {k for k in env if k.startswith(("CTLOOP_DB__", "CTLOOP_S3__"))}


def test_one_generated_secret_per_principal_or_the_one_given():
    generated = {
        d["metadata"]["name"]
        for d in of_kind(render(), "Secret")
        if d["metadata"]["name"].startswith("ctloop-kafka-")
    }
    assert generated == {f"ctloop-kafka-{p}" for p in PRINCIPALS}
    docs = render(set_values=("kafka.auth.existingSecrets.training=hospital-kafka-training",))
    names = {d["metadata"]["name"] for d in of_kind(docs, "Secret")}
    assert "ctloop-kafka-training" not in names
    spec = named(docs, "Deployment", "training")["spec"]["template"]["spec"]
    assert _kafka_secrets(spec) == set()
    assert "hospital-kafka-training" in _secret_refs(spec)


def test_the_release_check_reads_the_topics_as_metrics():
    docs = render()
    pod = next(d for d in of_kind(docs, "Pod") if d["metadata"]["name"] == "ctloop-release-check")
    env = _env(pod["spec"]["containers"][0])
    assert env["CTLOOP_KAFKA__PRINCIPAL"] == "metrics"


def test_auth_off_is_plaintext_with_no_kafka_credentials():
    docs = render(set_values=("kafka.auth.enabled=false",))
    props = named(docs, "ConfigMap", "kafka")["data"]["server.properties"]
    assert "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT" in props
    assert "authorizer.class.name" not in props
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            assert not _kafka_secrets(d["spec"]["template"]["spec"]), d["metadata"]["name"]
