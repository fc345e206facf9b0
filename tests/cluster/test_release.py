"""The chart in a real single-node cluster, step by step on one release (the tests run in file
order and build on each other): install, ``helm test``, a transfer round end to end, an upgrade
during a round, pods deleted mid-round, uninstall; then the 3-broker Kafka variant."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx

from ctloop.db import RoundStatus, VolumeStatus
from ctloop.platform import RemotePlatform
from ctloop.transfer.run import TransferRun
from ctloop.v1 import training_pb2, training_pb2_grpc
from tests.cluster import kube
from tests.cluster.conftest import PRESET, Release, install, step, wait_ready

ENDS = (RoundStatus.PUBLISHED, RoundStatus.REJECTED, RoundStatus.FAILED)
# What `make run`'s report carries (services/metrics/report.py build_report).
REPORT_FIELDS = {
    "run_id",
    "generated_at",
    "run",
    "rounds",
    "igniter_vs_final",
    "paper",
    "trends",
    "events_seen",
}
ROUND_FIELDS = {"round", "model", "role", "version", "dice"}


@contextmanager
def reach(release: Release) -> Iterator[RemotePlatform]:
    """The release's ingest and metrics HTTP and training and inference gRPC, port-forwarded."""
    with ExitStack() as stack:
        ports: dict[str, list[int]] = {}
        for component, remote in (
            ("ingest", [8000]),
            ("metrics", [18300]),
            ("training", [50053]),
            ("inference", [50052]),
        ):
            ports[component] = stack.enter_context(
                kube.port_forward(release.namespace, release.service(component), remote)
            )
        yield RemotePlatform(
            api=f"http://127.0.0.1:{ports['ingest'][0]}",
            metrics_url=f"http://127.0.0.1:{ports['metrics'][0]}",
            training_target=f"127.0.0.1:{ports['training'][0]}",
            inference_target=f"127.0.0.1:{ports['inference'][0]}",
            admin_token=release.admin_token,
            grpc_token=release.operator_grpc_token,
            grpc_tls=release.operator_grpc_tls,
        )


def helm_test(release: Release) -> str:
    """``helm test``: the release-check pod succeeded (it is then removed; a failed one stays
    and its log is in the error)."""
    try:
        out = kube.helm("test", release.name, "-n", release.namespace, timeout=600)
    except kube.KubeError as exc:
        logs = kube.kubectl(
            "logs",
            "-n",
            release.namespace,
            "-l",
            "app.kubernetes.io/component=release-check",
            check=False,
        )
        raise AssertionError(f"{exc}\n{logs}") from None
    assert "Succeeded" in out, out
    return out


def rounds(p: RemotePlatform) -> list[Any]:
    with p.grpc_channel(p.training_target) as ch:
        answer = training_pb2_grpc.TrainingStub(ch).ListRounds(
            training_pb2.ListRoundsRequest(), timeout=30
        )
    return list(answer.rounds)


def annotated(p: RemotePlatform) -> dict[str, int]:
    """Each annotated clinical volume and how many annotation revisions it has."""
    with httpx.Client(base_url=p.api, headers=p.admin_headers(), timeout=60) as api:
        vols = api.get("/v1/volumes", params={"dataset": "clinical"}).json()
        done = {}
        for v in vols:
            if v["status"] == VolumeStatus.ANNOTATED:
                r = api.get(f"/v1/volumes/{v['volume_id']}/annotations")
                assert r.status_code == 200, r.text
                done[v["volume_id"]] = len(r.json())
    return done


def start_a_round(p: RemotePlatform) -> int:
    """Ask for a sustainer round now and wait until its Job runs; its number."""
    before = max((r.round for r in rounds(p)), default=0)
    with p.grpc_channel(p.training_target) as ch:
        training_pb2_grpc.TrainingStub(ch).StartRound(
            training_pb2.StartRoundRequest(model=p.sustainer), timeout=60
        )
    rnd = kube.until(
        "a new round running",
        lambda: next((r for r in rounds(p) if r.round > before and r.status not in ENDS), None),
        300,
    )
    return int(rnd.round)


def round_ends(p: RemotePlatform, number: int, timeout_s: float = 1800) -> Any:
    return kube.until(
        f"round {number} to end",
        lambda: next((r for r in rounds(p) if r.round == number and r.status in ENDS), None),
        timeout_s,
        poll_s=5,
    )


def the_round_ends_and_nothing_is_lost(
    release: Release, number: int, before: dict[str, int], after: str
) -> None:
    """After a disruption: round ``number`` still ends (published or rejected), every
    annotation revision there was is still there, and ``helm test`` passes."""
    with reach(release) as p:
        with step(f"round {number} ends after {after}"):
            end = round_ends(p, number)
        assert end.status in (RoundStatus.PUBLISHED, RoundStatus.REJECTED), end
        assert annotated(p) == before
    with step(f"helm test after {after}"):
        helm_test(release)


def test_install_every_pod_ready_and_helm_test_passes(release: Release) -> None:
    with step("helm test (every part through its Service)"):
        out = helm_test(release)
    for p in kube.pods(release.namespace):
        if p["metadata"].get("labels", {}).get("app.kubernetes.io/component") != "release-check":
            assert kube.ready(p) or p["status"].get("phase") == "Succeeded", p["metadata"]["name"]
    print(out[-2000:])


def test_a_transfer_round_end_to_end_inside_the_cluster(release: Release) -> None:
    with (
        step(
            f"transfer run ({PRESET}): ingest, igniter Job, Triton, annotations, sustainer, report"
        ),
        reach(release) as platform,
    ):
        run = TransferRun(PRESET, data=release.data, platform=platform, echo=print)
        report = run.run()
    assert set(report) >= REPORT_FIELDS, sorted(report)
    roles = [r["role"] for r in report["rounds"]]
    assert roles[0] == "igniter" and "sustainer" in roles, report["rounds"]
    for r in report["rounds"]:
        assert set(r) >= ROUND_FIELDS, r
        assert r["dice"] is not None and 0.0 <= r["dice"]["mean"] <= 1.0, r
    # finished round Jobs are deleted after their TTL; their creation events stay an hour
    events = kube.kubectl_json(
        "get", "events", "-n", release.namespace, "--field-selector", "involvedObject.kind=Job"
    )["items"]
    trained = {e["involvedObject"]["name"].split("-r")[0] for e in events}
    assert {"ctloop-igniter", "ctloop-sustainer"} <= trained, trained


def test_helm_upgrade_during_a_round_loses_no_annotation(release: Release) -> None:
    with reach(release) as p:
        before = annotated(p)
        assert before, "the transfer run left annotations"
        number = start_a_round(p)
        with step("helm upgrade (logLevel changed: every pod rolls) during a round"):
            install(
                release.namespace,
                release.name,
                release.values,
                {**_current_extra(release), "logLevel": "DEBUG"},
            )
            wait_ready(release.namespace)
    the_round_ends_and_nothing_is_lost(release, number, before, "the upgrade")


def test_a_pod_of_each_service_deleted_mid_round_recovers(release: Release) -> None:
    with reach(release) as p:
        before = annotated(p)
        number = start_a_round(p)
    with step("delete a pod of every component mid-round"):
        components = (
            "ingest",
            "inference",
            "training",
            "metrics",
            "triton",
            "kafka",
            "minio",
            "postgresql",
        )
        for c in components:
            kube.kubectl(
                "delete",
                "pod",
                "-n",
                release.namespace,
                "--wait=false",
                "-l",
                f"app.kubernetes.io/instance={release.name},app.kubernetes.io/component={c}",
            )
        wait_ready(release.namespace)
    the_round_ends_and_nothing_is_lost(release, number, before, "the deletions")


def test_uninstall_leaves_only_what_is_kept(release: Release) -> None:
    with step("helm uninstall"):
        kube.helm("uninstall", release.name, "-n", release.namespace, "--wait", timeout=600)
        kube.until("the release's pods gone", lambda: not kube.pods(release.namespace), 300)
    left = kube.kubectl_json(
        "get",
        "all,configmap,secret,pvc,serviceaccount,role,rolebinding,networkpolicy,"
        "poddisruptionbudget,ingress,job",
        "-n",
        release.namespace,
    )["items"]
    names = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in left)
    kept = {
        "ConfigMap/kube-root-ca.crt",  # Kubernetes' own, in every namespace
        "ServiceAccount/default",
        # helm.sh/resource-policy: keep, so that the kept volumes open again on a reinstall
        "Secret/ctloop-admin-token",
        "Secret/ctloop-s3",
        # each service's S3 identity: the kept object store still knows the user
        *(
            f"Secret/ctloop-s3-{i}"
            for i in ("ingest", "inference", "training", "metrics", "triton")
        ),
        "Secret/ctloop-postgresql",
        # each Kafka principal's password: the kept broker volumes hold its SCRAM credential
        *(
            f"Secret/ctloop-kafka-{p}"
            for p in ("admin", "ingest", "inference", "training", "metrics")
        ),
    }
    data = {n for n in names if n.startswith("PersistentVolumeClaim/data-")}
    assert set(names) - data == kept, names
    assert data, "the StatefulSets' volumes are kept (their data outlives the release)"
    with step("delete the kept volumes and the namespace"):
        kube.kubectl("delete", "namespace", release.namespace, "--wait=true", timeout=600)


def test_three_kafka_brokers_replicate_every_topic(release: Release) -> None:
    ns, name = "ctloop-3b", "ctloop"
    with step("helm install with 3 Kafka brokers"):
        install(ns, name, release.values, {"kafka": {"replicas": 3}})
        wait_ready(ns)
    three = Release(ns, name, release.data, release.values)
    with step("helm test (3 brokers)"):
        helm_test(three)
    script = (
        # as metrics, the one principal that may describe every topic (SASL and ACLs are on)
        "from kafka.admin import KafkaAdminClient\n"
        "from ctloop.settings import get_settings\n"
        "from ctloop.contracts.topics import Topic\n"
        "from ctloop.kafka_security import client_config\n"
        "a = KafkaAdminClient(**client_config(get_settings()))\n"
        "for t in a.describe_topics([x.value for x in Topic]):\n"
        "    for p in t['partitions']:\n"
        "        print(t['name'], p['partition_index'], len(p['replica_nodes']),"
        " len(p['isr_nodes']))\n"
    )
    out = kube.kubectl(
        "exec",
        "-n",
        ns,
        three.service("metrics").replace("svc/", "deploy/"),
        "--",
        "python",
        "-c",
        script,
    )
    rows = [line.split() for line in out.splitlines() if line.strip()]
    assert rows
    assert all(int(r[2]) == 3 and int(r[3]) >= 2 for r in rows), out
    with reach(three) as p, httpx.Client(base_url=p.api, headers=p.admin_headers()) as api:
        site = api.post("/v1/sites", json={"id": "hospital-a"})
        assert site.status_code in (201, 409), site.text
        vid, (_, image, affine) = next(iter(release.data.clinical.items()))
        from ctloop.core.blobs import nifti_gz_bytes

        r = api.post(
            "/v1/volumes",
            files={"file": ("ct.nii.gz", nifti_gz_bytes(image, affine), "application/gzip")},
            data={"site_id": "hospital-a", "dataset": "clinical", "volume_id": vid},
            timeout=120,
        )
        assert r.status_code in (200, 201), r.text  # the event was written with acks=all
    with step("helm uninstall (3 brokers)"):
        kube.helm("uninstall", name, "-n", ns, "--wait", timeout=600)
        kube.kubectl("delete", "namespace", ns, "--wait=true", timeout=600)


def _current_extra(release: Release) -> dict[str, Any]:
    import json

    path = kube.REPO_ROOT / ".ctloop" / f"test-cluster-{release.namespace}-{release.name}.json"
    extra: dict[str, Any] = json.loads(path.read_text())
    return extra
