"""Every pod the chart runs: resources, probes, non-root and the restricted Pod Security
standard, read-only root filesystems, pinned images; PDBs and HPAs; GPUs where they belong."""

from __future__ import annotations

import re

from tests.helm.conftest import Doc, named, of_kind, pod_specs, render

SERVICES = ("ingest", "inference", "training", "metrics")
# Containers whose root filesystem cannot be read-only ("where possible"): none today.
WRITABLE_ROOT: set[str] = set()


def all_containers(spec: Doc) -> list[Doc]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def test_every_container_has_requests_and_a_memory_limit(rendered):
    for workload, spec in pod_specs(rendered):
        for c in all_containers(spec):
            res = c.get("resources", {})
            where = f"{workload}/{c['name']}"
            assert {"cpu", "memory"} <= set(res.get("requests", {})), where
            assert "memory" in res.get("limits", {}), where


def test_every_long_running_container_has_liveness_and_readiness_probes(rendered):
    jobs = {d["metadata"]["name"] for d in rendered if d["kind"] == "Job"}  # they run to the end
    for workload, spec in pod_specs(rendered):
        if workload in jobs:
            continue
        for c in spec["containers"]:
            assert "livenessProbe" in c and "readinessProbe" in c, f"{workload}/{c['name']}"


def test_the_services_are_probed_on_their_health_endpoints(rendered):
    for svc in SERVICES:
        (c,) = named(rendered, "Deployment", svc)["spec"]["template"]["spec"]["containers"]
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["livenessProbe"]["httpGet"]["port"] == "http"
        assert c["command"] == ["python", "-m", f"services.{svc}"]


def test_every_pod_meets_the_restricted_pod_security_standard(rendered):
    for workload, spec in pod_specs(rendered):
        pod = spec.get("securityContext", {})
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", workload
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        for v in spec.get("volumes", []):
            assert "hostPath" not in v, f"{workload}: hostPath volume {v['name']}"
        for c in all_containers(spec):
            sc, where = c.get("securityContext", {}), f"{workload}/{c['name']}"
            assert sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, where
            assert sc.get("runAsUser", pod.get("runAsUser", 1)) != 0, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            assert not sc.get("privileged"), where
            if c["name"] not in WRITABLE_ROOT:
                assert sc.get("readOnlyRootFilesystem") is True, where


def test_images_are_pinned_never_latest(rendered):
    for workload, spec in pod_specs(rendered):
        for c in all_containers(spec):
            image = c["image"]
            assert re.fullmatch(r"[^:@]+(:\d+)?/[^:@]+:[A-Za-z0-9._-]+", image), image
            assert not image.endswith(":latest"), f"{workload}: {image}"


def test_a_latest_tag_is_refused_by_the_schema():
    from tests.helm.conftest import helm_template

    for key in ("image.tag", "triton.image.tag", "training.job.image.tag"):
        result = helm_template("--set", f"{key}=latest")
        assert result.returncode != 0, key
        assert "/" + key.replace(".", "/") in result.stderr, result.stderr


def test_only_the_training_service_mounts_an_api_token(rendered):
    for workload, spec in pod_specs(rendered):
        assert spec["automountServiceAccountToken"] is workload.endswith("-training"), workload


def test_every_workload_has_a_disruption_budget(rendered):
    budgets = {
        tuple(sorted(p["spec"]["selector"]["matchLabels"].items()))
        for p in of_kind(rendered, "PodDisruptionBudget")
    }
    for d in rendered:
        if d["kind"] in ("Deployment", "StatefulSet"):
            selector = tuple(sorted(d["spec"]["selector"]["matchLabels"].items()))
            assert selector in budgets, d["metadata"]["name"]


def test_ingest_and_inference_scale_horizontally_by_default():
    docs = render()
    scaled = {h["spec"]["scaleTargetRef"]["name"] for h in of_kind(docs, "HorizontalPodAutoscaler")}
    assert scaled == {"ctloop-ingest", "ctloop-inference"}
    for svc in ("ingest", "inference"):  # the HPA owns the replica count
        assert "replicas" not in named(docs, "Deployment", svc)["spec"]


def _serves_on(docs: list[Doc]) -> str:
    """Where the services ask Triton to run the models (cpu | gpu)."""
    (c,) = named(docs, "Deployment", "inference")["spec"]["template"]["spec"]["containers"]
    return str({e["name"]: e.get("value") for e in c["env"]}["CTLOOP_TRITON__INSTANCE_KIND"])


def test_triton_requests_a_gpu_and_serves_the_s3_repository_in_explicit_mode(rendered):
    (c,) = named(rendered, "Deployment", "triton")["spec"]["template"]["spec"]["containers"]
    requests, limits = c["resources"]["requests"], c["resources"]["limits"]
    if _serves_on(rendered) == "gpu":
        assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
        assert int(limits["nvidia.com/gpu"]) >= 1
    else:  # a CPU-only install: no GPU asked for anywhere
        assert "nvidia.com/gpu" not in requests and "nvidia.com/gpu" not in limits
    assert "--model-control-mode=explicit" in c["args"]
    assert "--disable-auto-complete-config" in c["args"]  # no extra stub per load
    repo = next(a for a in c["args"] if a.startswith("--model-repository="))
    assert re.fullmatch(r"--model-repository=s3://https?://[^/]+/[^/]+/models", repo), repo
    env = {e["name"]: e for e in c["env"]}
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "secretKeyRef" in env[var]["valueFrom"]


def test_the_cpu_runtime_reaches_the_services_that_load_and_publish_models():
    for flags, runtime in (((), "onnxruntime"), (("triton.cpuRuntime=torch",), "torch")):
        docs = render(set_values=flags)
        for svc in ("inference", "training"):  # inference loads versions, training publishes
            (c,) = named(docs, "Deployment", svc)["spec"]["template"]["spec"]["containers"]
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env["CTLOOP_TRITON__CPU_RUNTIME"] == runtime


def test_triton_runs_on_gpu_nodes():
    spec = named(render(), "Deployment", "triton")["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_the_training_role_allows_only_what_the_launcher_does():
    (role,) = of_kind(render(), "Role")
    rules = {(r["apiGroups"][0], r["resources"][0]): sorted(r["verbs"]) for r in role["rules"]}
    assert rules == {
        ("batch", "jobs"): sorted(["create", "get", "list", "watch", "delete"]),
        ("", "pods"): ["get", "list"],
        ("", "pods/log"): ["get"],
        ("apps", "deployments"): ["get"],  # its own Deployment only (the round Jobs' owner)
    }
    assert not of_kind(render(), "ClusterRole") and not of_kind(render(), "ClusterRoleBinding")
    (binding,) = of_kind(render(), "RoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "ctloop-training", "namespace": "ctloop"}
    ]


def test_with_pytorchjobs_the_role_also_covers_them():
    (role,) = of_kind(render(set_values=("training.job.kind=pytorchjob",)), "Role")
    groups = {r["apiGroups"][0]: r for r in role["rules"]}
    assert groups["kubeflow.org"]["resources"] == ["pytorchjobs"]


def test_the_optional_kinds_appear_when_enabled():
    docs = render(
        set_values=(
            "serviceMonitor.enabled=true",
            "grafanaDashboard.enabled=true",
            "ingress.enabled=true",
            "mtls.enabled=true",
        )
    )
    (monitor,) = of_kind(docs, "ServiceMonitor")
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"http", "metrics"}
    (ingress,) = of_kind(docs, "Ingress")
    assert ingress["spec"]["tls"][0]["secretName"] == "ctloop-tls"
    (peer,) = of_kind(docs, "PeerAuthentication")
    assert peer["spec"]["mtls"]["mode"] == "STRICT"
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            labels = d["spec"]["template"]["metadata"]["labels"]
            assert labels["sidecar.istio.io/inject"] == "true", d["metadata"]["name"]
    defaults = render()
    for kind in ("ServiceMonitor", "Ingress", "PeerAuthentication"):
        assert not of_kind(defaults, kind)


def _quantity(value: str | int) -> float:
    """A Kubernetes CPU or memory quantity as cores or bytes."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    text = str(value)
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def test_only_the_small_node_example_is_cpu_only():
    from tests.helm.conftest import SETUPS

    cpu_only = {name for name, files in SETUPS.items() if _serves_on(render(*files)) == "cpu"}
    assert cpu_only == {"small-node"}


def test_the_small_node_example_fits_one_small_node_with_a_round_running():
    """Every long-running pod plus a training round's CPU Job fits a 2-core node with 16 GiB
    free (what `make test-cluster` runs on), leaving room for the cluster's own pods."""
    from ctloop.settings import KubernetesLauncherSettings
    from tests.helm.conftest import EXAMPLES
    from tests.helm.test_settings_and_secrets import service_container, settings_of

    docs = render(next(f for f in EXAMPLES if f.stem == "small-node"))
    cpu = memory = 0.0
    for d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        replicas = d["spec"].get("replicas", 1)
        for c in d["spec"]["template"]["spec"]["containers"]:
            requests = c["resources"]["requests"]
            assert "nvidia.com/gpu" not in requests, d["metadata"]["name"]
            cpu += replicas * _quantity(requests["cpu"])
            memory += replicas * _quantity(requests["memory"])
    job: KubernetesLauncherSettings = settings_of(
        service_container(docs, "training")
    ).training.kubernetes
    assert job.gpu_resource == "" and job.node_selector == {}
    cpu += _quantity(job.cpu)
    memory += _quantity(job.memory)
    assert cpu <= 1.5, cpu  # of 2 cores: the rest for the API server, etcd, CoreDNS, ...
    assert memory <= 16 * 2**30, memory / 2**30
