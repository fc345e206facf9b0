"""Least privilege in the object store, in the chart (issue 18, finding 4): the store holds
per-service accounts, a Job creates them, and each pod gets only its own identity's keys."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from tests.helm.conftest import named, of_kind, render


def _s3_container(docs):  # type: ignore[no-untyped-def]
    (sts,) = [
        d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"].endswith("-minio")
    ]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    return container


def test_versity_gateway_runs_its_internal_iam_on_the_data_volume():
    """Without --iam-dir the gateway is one root user: no account could be held to a grant."""
    container = _s3_container(render(set_values=("minio.server=versitygw",)))
    script = container["args"][0]
    assert "--iam-dir /data/iam" in script and "/data/iam &&" in script
    # v1.8.0's IAM cache corrupts a secret set again by the provisioning Job (an upgrade)
    assert "--iam-cache-disable" in script
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]


# ---------------------------------------------------------------- one S3 identity per pod

IDENTITY_OF = {"ingest": "ingest", "inference": "inference", "training": "training"}
IDENTITY_OF |= {"metrics": "metrics", "triton": "triton"}
S3_KEY_VARS = ("CTLOOP_S3__ACCESS_KEY", "CTLOOP_S3__SECRET_KEY")


def _containers(spec):  # type: ignore[no-untyped-def]
    return [*spec.get("initContainers", []), *spec["containers"]]


def _s3_secrets(container) -> set[str]:  # type: ignore[no-untyped-def]
    """The Secrets an S3 key of ``container`` comes from (ctloop's and Triton's variables)."""
    found = set()
    for e in container.get("env", []):
        key_var = re.search(r"(ACCESS_KEY|SECRET_KEY|ACCESS_KEY_ID|SECRET_ACCESS_KEY)$", e["name"])
        if key_var and ("S3" in e["name"] or e["name"].startswith("AWS_")):
            found.add(e["valueFrom"]["secretKeyRef"]["name"])
    return found


def _env(container) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return {e["name"]: e for e in container.get("env", [])}


def test_each_service_pod_holds_only_its_own_s3_identity():
    """Finding 4: one root key in every pod, Triton's included. Now each pod (init containers
    too) gets only the Secret of its own identity and says which identity it is."""
    docs = render()
    for component, identity in IDENTITY_OF.items():
        spec = named(docs, "Deployment", component)["spec"]["template"]["spec"]
        for c in _containers(spec):
            assert _s3_secrets(c) == {f"ctloop-s3-{identity}"}, (component, c["name"])
            if component != "triton" or c["name"] == "provision":
                assert _env(c)["CTLOOP_S3__IDENTITY"]["value"] == identity
    # a training round's Job signs in as training
    (training,) = named(docs, "Deployment", "training")["spec"]["template"]["spec"]["containers"]
    secret_env = json.loads(_env(training)["CTLOOP_TRAINING__KUBERNETES__SECRET_ENV"]["value"])
    s3 = [e for e in secret_env if e["name"] in S3_KEY_VARS]
    assert {e["secret"] for e in s3} == {"ctloop-s3-training"} and len(s3) == 2
    # helm test reads S3 as metrics (its grants, and a refusal outside them)
    (check,) = of_kind(docs, "Pod")
    assert _s3_secrets(check["spec"]["containers"][0]) == {"ctloop-s3-metrics"}


def test_the_root_key_is_only_in_the_object_store_and_the_provisioning_job():
    for docs in (render(), render(set_values=("minio.server=versitygw",))):
        holders = {
            d["metadata"]["name"]
            for d in docs
            if d["kind"] in ("Deployment", "StatefulSet", "Job", "Pod")
            for c in _containers(d["spec"].get("template", d)["spec"])
            if "ctloop-s3" in str(c.get("env", [])).replace("ctloop-s3-", "")
        }
        assert holders == {"ctloop-minio", "ctloop-s3-provision-r1"}


def test_the_provisioning_job_creates_every_identity_with_its_own_secret():
    from ctloop.s3_grants import IDENTITIES
    from ctloop.s3_provision import credentials_from_env

    for server in ("minio", "versitygw"):
        docs = render(set_values=(f"minio.server={server}",))
        (job,) = of_kind(docs, "Job")
        assert job["metadata"]["name"] == "ctloop-s3-provision-r1"  # one per revision
        assert "helm.sh/hook" not in job["metadata"].get("annotations", {})  # see the template
        (c,) = job["spec"]["template"]["spec"]["containers"]
        assert c["command"] == ["python", "-m", "ctloop.s3_provision", "--server", server]
        env = _env(c)
        assert "CTLOOP_S3__IDENTITY" not in env  # it runs as root
        assert env["CTLOOP_S3__ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "ctloop-s3"
        refs = {name: e["valueFrom"]["secretKeyRef"] for name, e in env.items() if "valueFrom" in e}
        given = {
            name: f"{ref['name']}/{ref['key']}"
            for name, ref in refs.items()
            if name.startswith("CTLOOP_S3_") and not name.startswith("CTLOOP_S3__")
        }
        users = credentials_from_env(given)  # the names the Job's code reads
        assert set(users) == set(IDENTITIES)
        for identity, cred in users.items():
            assert cred.access_key == f"ctloop-s3-{identity}/accessKey"
            assert cred.secret_key == f"ctloop-s3-{identity}/secretKey"
    # with network policies on, the Job may reach the object store
    policy = named(render(), "NetworkPolicy", "s3-provision")
    assert "minio" in str(policy["spec"]["egress"])


def test_generated_identity_secrets_name_the_user_and_keep_a_random_secret():
    docs = render()
    for identity in IDENTITY_OF.values():
        secret = named(docs, "Secret", f"s3-{identity}")
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert base64.b64decode(secret["data"]["accessKey"]).decode() == f"ctloop-{identity}"
        assert len(base64.b64decode(secret["data"]["secretKey"])) == 40


def test_given_identity_secrets_are_used_and_not_generated():
    docs = render(set_values=("objectStore.identities.existingSecrets.triton=hospital-triton",))
    names = {d["metadata"]["name"] for d in of_kind(docs, "Secret")}
    assert "ctloop-s3-triton" not in names and "ctloop-s3-ingest" in names
    spec = named(docs, "Deployment", "triton")["spec"]["template"]["spec"]
    assert all(_s3_secrets(c) == {"hospital-triton"} for c in _containers(spec))


def test_an_external_store_with_identities_made_by_the_hospital_needs_no_root_key():
    from tests.helm.conftest import EXAMPLES

    docs = render(next(f for f in EXAMPLES if f.stem == "external-services"))
    assert not of_kind(docs, "Job")
    assert "ctloop-s3'" not in str(docs) and "'ctloop-s3'" not in str(docs)
    for component, identity in IDENTITY_OF.items():
        spec = named(docs, "Deployment", component)["spec"]["template"]["spec"]
        assert _s3_secrets(spec["containers"][0]) == {f"hospital-s3-{identity}"}


def test_least_privilege_off_gives_every_pod_the_root_key_as_before():
    docs = render(set_values=("objectStore.leastPrivilege=false",))
    assert not of_kind(docs, "Job")
    secrets = [d["metadata"]["name"] for d in of_kind(docs, "Secret")]
    assert not [name for name in secrets if name.startswith("ctloop-s3-")]
    for component in IDENTITY_OF:
        spec = named(docs, "Deployment", component)["spec"]["template"]["spec"]
        for c in _containers(spec):
            assert _s3_secrets(c) == {"ctloop-s3"}
            assert "CTLOOP_S3__IDENTITY" not in _env(c)


def test_the_default_object_store_is_the_gateway_every_test_runs():
    """The default release runs the S3 server this project builds and tests (Versity Gateway,
    ctloop-s3 at the chart's appVersion); MinIO is an opt-in whose admin path is untested here."""
    container = _s3_container(render())
    assert container["image"] == "ghcr.io/ctloop/ctloop-s3:0.1.0"
    assert "--iam-dir /data/iam" in container["args"][0]
    (job,) = of_kind(render(), "Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][-1] == "versitygw"
    minio = _s3_container(render(set_values=("minio.server=minio",)))
    assert minio["command"][:2] == ["minio", "server"]
