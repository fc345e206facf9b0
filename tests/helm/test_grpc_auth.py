"""The chart's gRPC service tokens (issue 18, finding 7): one Secret with each caller's token
and digest, random at install; each service gets its own token only if it calls others and
the digests of exactly the callers ctloop/rpc_auth.py's CALLS lets in; the operator's token
and every other service's token are mounted nowhere; the flow table agrees with CALLS."""

from __future__ import annotations

import base64
import hashlib

import yaml

from ctloop.rpc_auth import CALLERS, CALLS, callers_of, served_by
from tests.helm.conftest import CHART, Doc, helm_template, named, of_kind, render
from tests.helm.test_settings_and_secrets import SERVICES, service_container, settings_of

SECRET = "ctloop-grpc-tokens"


def grpc_refs(container: Doc, secret: str = SECRET) -> dict[str, str]:
    """Env name -> key, for every variable the container takes from the gRPC-token Secret."""
    return {
        e["name"]: e["valueFrom"]["secretKeyRef"]["key"]
        for e in container.get("env", [])
        if e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == secret
    }


def test_every_caller_has_a_random_token_and_its_digest_in_one_secret():
    def data() -> dict[str, str]:
        out = helm_template("--show-only", "templates/grpc-tokens.yaml").stdout
        (secret,) = [d for d in yaml.safe_load_all(out) if d]
        assert secret["metadata"]["name"] == SECRET
        return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}

    first, second = data(), data()
    assert set(first) == {f"{c}-{k}" for c in CALLERS for k in ("token", "sha256")}
    for caller in CALLERS:
        token = first[f"{caller}-token"]
        assert token.startswith("ctg_") and len(token) >= 40
        assert first[f"{caller}-sha256"] == hashlib.sha256(token.encode()).hexdigest()
        assert token != second[f"{caller}-token"]  # random per install, kept on upgrade (lookup)


def test_each_service_holds_its_own_token_and_only_its_callers_digests():
    docs = render()
    for svc in SERVICES:
        container = service_container(docs, svc)
        refs = grpc_refs(container)
        expected = {f"CTLOOP_GRPC__CALLERS__{c.upper()}": f"{c}-sha256" for c in callers_of(svc)}
        if svc in CALLS:  # it calls others: its own token, and nobody else's
            expected["CTLOOP_GRPC__TOKEN"] = f"{svc}-token"
        assert refs == expected, svc
        settings = settings_of(container)
        assert set(settings.grpc.callers) == callers_of(svc)
        assert (settings.grpc.token is not None) == (svc in CALLS)


def test_no_other_pod_gets_a_grpc_token(rendered):
    """Triton, Kafka, the provisioning init containers and `helm test`'s pod hold nothing of
    it; the operator's token is in no pod at all."""
    for d in rendered:
        if d["kind"] not in ("Deployment", "StatefulSet", "Job", "Pod"):
            continue
        spec = d["spec"] if d["kind"] == "Pod" else d["spec"]["template"]["spec"]
        component = d["metadata"]["labels"]["app.kubernetes.io/component"]
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            keys = set(grpc_refs(c).values())
            assert "operator-token" not in keys, (component, c["name"])
            if c["name"] != component or component not in SERVICES:
                assert not keys, (component, c["name"])
            else:
                assert keys <= {f"{component}-token"} | {f"{x}-sha256" for x in CALLERS}


def test_an_existing_secret_is_used_instead_of_a_generated_one():
    docs = render(set_values=("grpcAuth.existingSecret=hospital-grpc",))
    assert not [d for d in of_kind(docs, "Secret") if d["metadata"]["name"] == SECRET]
    refs = grpc_refs(service_container(docs, "training"), "hospital-grpc")
    assert refs == {
        "CTLOOP_GRPC__TOKEN": "training-token",
        "CTLOOP_GRPC__CALLERS__INGEST": "ingest-sha256",
        "CTLOOP_GRPC__CALLERS__OPERATOR": "operator-sha256",
    }
    assert named(docs, "Deployment", "ingest")  # renders whole


def test_the_flow_table_has_exactly_the_grpc_flows_between_services_that_calls_grants():
    table = yaml.safe_load((CHART / "files" / "flows.yaml").read_text())
    flows = {
        (src, dst)
        for src, dst, port in table["flows"]
        if port == "grpc" and src in SERVICES and dst in SERVICES
    }
    granted = {(caller, served_by(m)) for caller, ms in CALLS.items() for m in ms}
    assert flows == {(c, s) for c, s in granted if c in SERVICES}
