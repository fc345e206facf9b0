"""Training rounds as Kubernetes Jobs: the manifests, the torchrun command lines, the round's
files through the object store, and the submit / poll / fetch / delete cycle against an
in-process stand-in for the Kubernetes API."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest

from ctloop.core.train import DataSource, TrainConfig
from ctloop.settings import (
    REPO_ROOT,
    KubernetesLauncherSettings,
    SecretEnv,
    Settings,
    TrainingSettings,
)
from services.training import job
from services.training.kubernetes import KubernetesApi, KubernetesJobLauncher, job_outcome
from services.training.launcher import LocalLauncher, launcher_for
from services.training.manifests import build_job, build_pytorchjob, job_name
from services.training.round_files import relative_config, rooted_config
from services.training.torchrun import Rendezvous, torchrun_command

K8S_VERSION = "1.37.0"


def settings_with(nproc: int = 2, **k8s: Any) -> Settings:
    defaults: dict[str, Any] = {
        "image": "registry.example/ctloop-cuda:0.1.0",
        "service_account": "ctloop-training-job",
        "headless_service": "ctloop-training-jobs",
        "node_selector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "secret_env": [
            SecretEnv(name="CTLOOP_S3__SECRET_KEY", secret="ctloop-s3", key="secretKey")
        ],
    }
    training = TrainingSettings(
        nproc_per_node=nproc,
        launcher="kubernetes",
        kubernetes=KubernetesLauncherSettings(**{**defaults, **k8s}),
    )
    return Settings(training=training)


def round_folder(tmp_path: Path) -> tuple[TrainConfig, Path]:
    work = tmp_path / "round-0003"
    (work / "train" / "imagesTr").mkdir(parents=True)
    (work / "train" / "dataset.json").write_text("{}")
    (work / "train" / "imagesTr" / "v1.nii.gz").write_bytes(b"volume")
    (work / "parent.pt").write_bytes(b"weights")
    config = TrainConfig(
        sources=[DataSource(path=work / "train")],
        out=work / "candidate.pt",
        init_from=work / "parent.pt",
        meta={"name": "sustainer", "round": 3},
    )
    return config, work


def pod_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    if manifest["kind"] == "Job":
        spec: dict[str, Any] = manifest["spec"]["template"]["spec"]
    else:
        spec = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    return spec


# ---------------------------------------------------------------- manifests
def test_a_single_node_job_asks_for_one_gpu_per_process_and_validates_strictly(tmp_path):
    config, _ = round_folder(tmp_path)
    manifest = build_job(settings_with(nproc=4), "ctloop-sustainer-r0003-abc123", "p/x", config)
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    assert manifest["spec"]["completionMode"] == "Indexed"
    assert manifest["spec"]["completions"] == manifest["spec"]["parallelism"] == 1
    assert manifest["spec"]["backoffLimit"] == 0
    spec = pod_spec(manifest)
    (container,) = spec["containers"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "4"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert container["command"][:3] == ["python", "-m", "services.training.job"]
    assert "--nproc-per-node=4" in container["command"]
    assert not any(a.startswith("--rdzv") for a in container["command"])
    assert "subdomain" not in spec
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert spec["serviceAccountName"] == "ctloop-training-job"
    assert spec["automountServiceAccountToken"] is False


def test_job_pods_meet_the_restricted_pod_security_standard(tmp_path):
    config, _ = round_folder(tmp_path)
    for build in (build_job, build_pytorchjob):
        spec = pod_spec(build(settings_with(), "ctloop-x-r0001-abcdef", "p/x", config))
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["readOnlyRootFilesystem"] is True
        shm = next(v for v in spec["volumes"] if v["name"] == "shm")
        assert shm["emptyDir"]["medium"] == "Memory"


def test_several_nodes_meet_at_node_zero_by_its_indexed_hostname(tmp_path):
    config, _ = round_folder(tmp_path)
    name = "ctloop-sustainer-r0003-abc123"
    manifest = build_job(settings_with(nproc=8, nodes=3), name, "p/x", config)
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    assert manifest["spec"]["completions"] == manifest["spec"]["parallelism"] == 3
    spec = pod_spec(manifest)
    assert spec["subdomain"] == "ctloop-training-jobs"
    cmd = spec["containers"][0]["command"]
    assert f"--rdzv-endpoint={name}-0.ctloop-training-jobs:29500" in cmd
    assert f"--rdzv-id={name}" in cmd and "--nnodes=3" in cmd
    assert spec["containers"][0]["ports"][0]["containerPort"] == 29500


def test_several_nodes_without_a_headless_service_are_refused(tmp_path):
    config, _ = round_folder(tmp_path)
    with pytest.raises(ValueError, match="headless_service"):
        build_job(settings_with(nodes=2, headless_service=""), "n", "p", config)


def test_a_pytorchjob_has_one_master_and_the_other_nodes_as_workers(tmp_path):
    config, _ = round_folder(tmp_path)
    s = settings_with(nproc=4, nodes=3, kind="pytorchjob")
    manifest = KubernetesJobLauncher(s, files=MemoryFiles(), api=FakeApi().client()).manifest(
        "ctloop-s-r0003-abcdef", "p/x", config
    )
    assert manifest["apiVersion"] == "kubeflow.org/v1" and manifest["kind"] == "PyTorchJob"
    assert manifest["spec"]["nprocPerNode"] == "4"
    replicas = manifest["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    schema = json.loads((REPO_ROOT / "tools" / "crd-schemas" / "pytorchjob.json").read_text())
    jsonschema.validate(manifest, schema)
    for replica in replicas.values():  # the pod templates are core PodTemplates, strictly
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
        template["template"] = replica["template"]
        kubernetes_validate.validate(template, K8S_VERSION, strict=True)
    container = replicas["Worker"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch"  # the operator finds the container by this name
    assert "--rdzv-from-env" in container["command"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"


def test_cpu_only_jobs_request_no_gpu(tmp_path):
    config, _ = round_folder(tmp_path)
    manifest = build_job(settings_with(gpu_resource=""), "n", "p", config)
    resources = pod_spec(manifest)["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in resources["requests"]


def test_job_names_are_dns_labels_that_leave_room_for_the_pod_index():
    config = TrainConfig(sources=[], out=Path("x"), meta={"name": "Sustainer_V2!", "round": 12})
    name = job_name(config)
    assert re.fullmatch(r"ctloop-sustainer-v2-r0012-[0-9a-f]{6}", name)
    assert len(name) <= 50


def test_the_s3_credentials_come_from_secrets_never_literals(tmp_path):
    config, _ = round_folder(tmp_path)
    env = pod_spec(build_job(settings_with(), "n", "p", config))["containers"][0]["env"]
    secret = next(e for e in env if e["name"] == "CTLOOP_S3__SECRET_KEY")
    assert secret["valueFrom"]["secretKeyRef"] == {"name": "ctloop-s3", "key": "secretKey"}
    assert all("value" not in e for e in env if "SECRET" in e["name"])


def test_the_launcher_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("CTLOOP_TRAINING__LAUNCHER", "kubernetes")
    monkeypatch.setenv("CTLOOP_TRAINING__KUBERNETES__NODES", "2")
    monkeypatch.setenv("CTLOOP_TRAINING__KUBERNETES__NODE_SELECTOR", '{"gpu": "a100"}')
    monkeypatch.setenv(
        "CTLOOP_TRAINING__KUBERNETES__SECRET_ENV",
        json.dumps([{"name": "CTLOOP_S3__ACCESS_KEY", "secret": "s3", "key": "user"}]),
    )
    k = Settings().training.kubernetes
    assert (k.nodes, k.node_selector, k.secret_env[0].key) == (2, {"gpu": "a100"}, "user")
    assert isinstance(launcher_for(Settings(training=TrainingSettings())), LocalLauncher)


# ---------------------------------------------------------------- torchrun and the round's files
def test_torchrun_runs_standalone_on_one_node_and_c10d_across_several():
    one = torchrun_command(Path("t.json"), 2)
    assert "--standalone" in one and "--nproc-per-node=2" in one
    assert one[-3:] == ["-m", "ctloop.core.train", "t.json"]
    many = torchrun_command(Path("t.json"), 8, 2, Rendezvous("j-0.svc:29500", "j"))
    assert "--rdzv-backend=c10d" in many and "--rdzv-endpoint=j-0.svc:29500" in many
    assert "--standalone" not in many
    from_env = torchrun_command(Path("t.json"), 8, from_env=True)
    assert not any(a.startswith("--") for a in from_env[3:-3])
    with pytest.raises(ValueError):
        torchrun_command(Path("t.json"), 8, 2)
    # One process on one node: the training module alone, no launcher to start.
    assert torchrun_command(Path("t.json"), 1)[1:] == ["-m", "ctloop.core.train", "t.json"]


def test_a_round_config_moves_to_another_folder(tmp_path):
    config, work = round_folder(tmp_path)
    relative = relative_config(config, work)
    assert relative.sources[0].path == Path("train") and relative.out == Path("candidate.pt")
    moved = rooted_config(relative, Path("/scratch/round"))
    assert moved.init_from == Path("/scratch/round/parent.pt")
    assert moved.steps == config.steps and moved.meta == config.meta
    outside = config.model_copy(update={"out": tmp_path / "elsewhere.pt"})
    with pytest.raises(ValueError, match="not inside"):
        relative_config(outside, work)


def test_job_arguments():
    a = job.parse_args(["training/jobs/j/", "--nproc-per-node=4", "--nnodes=2",
                        "--rdzv-endpoint=j-0.s:29500", "--rdzv-id=j"])  # fmt: skip
    assert (a.prefix, a.nproc_per_node, a.nnodes) == ("training/jobs/j", 4, 2)
    assert a.rendezvous == Rendezvous("j-0.s:29500", "j")
    assert job.parse_args(["p", "--nnodes=2", "--rdzv-from-env"]).rendezvous is None
    with pytest.raises(SystemExit):
        job.parse_args(["p", "--nnodes=2"])
    with pytest.raises(SystemExit):
        job.parse_args(["p", "--nproc-per-node=0"])


def test_node_rank_from_the_indexed_job_or_the_operator():
    assert job.node_rank({"JOB_COMPLETION_INDEX": "2"}) == 2
    assert job.node_rank({"PET_NODE_RANK": "1"}) == 1
    assert job.node_rank({}) == 0


def test_the_job_refuses_keys_outside_its_round_folder(tmp_path):
    files = MemoryFiles()
    files.objects["p/input/../../etc/x"] = b"x"
    with pytest.raises(ValueError, match="outside"):
        job.download_round(files, "p", tmp_path)


# ---------------------------------------------------------------- the launch cycle
class MemoryFiles:
    """The object store side of a round, in memory."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def upload(self, key: str, path: Path) -> None:
        self.objects[key] = path.read_bytes()

    def download(self, key: str, path: Path) -> bool:
        if key not in self.objects:
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.objects[key])
        return True

    def keys(self, prefix: str) -> list[str]:
        return sorted(k for k in self.objects if k.startswith(prefix))

    def delete(self, keys: list[str]) -> None:
        for k in keys:
            self.objects.pop(k, None)


class FakeApi:
    """The Kubernetes API as far as the launcher uses it: the Job runs when it is polled."""

    def __init__(self, on_poll: Any = None, outcome: str = "Complete") -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.on_poll, self.outcome = on_poll, outcome

    def handle(self, request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer sa-token"
        path = request.url.path
        self.calls.append((request.method, path))
        if request.method == "POST":
            body = json.loads(request.content)
            self.jobs[body["metadata"]["name"]] = body
            return httpx.Response(201, json=body)
        name = path.rsplit("/", 1)[-1]
        if request.method == "DELETE":
            assert request.url.params["propagationPolicy"] == "Background"
            return httpx.Response(200 if self.jobs.pop(name, None) else 404, json={})
        if path.endswith("/pods"):
            return httpx.Response(200, json={"items": []})
        if "/apis/apps/v1/" in path:
            return httpx.Response(200, json={"metadata": {"name": name, "uid": f"uid-of-{name}"}})
        body = self.jobs[name]
        if self.on_poll is not None:
            self.on_poll(body)
        cond = {"type": self.outcome, "status": "True", "reason": "BackoffLimitExceeded"}
        return httpx.Response(200, json={**body, "status": {"conditions": [cond]}})

    def client(self, account: Path | None = None) -> KubernetesApi:
        if account is None:
            import tempfile

            account = Path(tempfile.mkdtemp())
        (account / "token").write_text("sa-token\n")
        return KubernetesApi(
            "https://kubernetes.default.svc",
            namespace="ctloop",
            account_dir=account,
            transport=httpx.MockTransport(self.handle),
        )


def test_a_round_goes_up_runs_as_a_job_and_comes_back(tmp_path):
    config, work = round_folder(tmp_path)
    files = MemoryFiles()

    def the_job_runs(body: dict[str, Any]) -> None:  # what services.training.job does
        prefix = body["spec"]["template"]["spec"]["containers"][0]["command"][3]
        uploaded = job.download_round(files, prefix, tmp_path / "pod")
        assert uploaded.init_from is not None and uploaded.init_from.read_bytes() == b"weights"
        files.objects[f"{prefix}/output/candidate.pt"] = b"trained"
        files.objects[f"{prefix}/output/train.log"] = b"step 10 loss 0.1"

    api = FakeApi(on_poll=the_job_runs)
    launcher = KubernetesJobLauncher(
        settings_with(), files=files, api=api.client(tmp_path), sleep=lambda _: None
    )
    launcher.run(config, work)
    assert config.out.read_bytes() == b"trained"
    assert (work / "train.log").read_text() == "step 10 loss 0.1"
    methods = [m for m, _ in api.calls]
    assert methods[0] == "POST" and methods[-1] == "DELETE"
    assert api.calls[0][1] == "/apis/batch/v1/namespaces/ctloop/jobs"
    assert api.jobs == {} and files.objects == {}  # the Job and the round's prefix are gone


def test_round_jobs_are_owned_by_the_training_deployment(tmp_path):
    """Kubernetes then deletes a Job with the release (helm uninstall deletes the Deployment),
    also one a restarted training service no longer watches."""
    config, _work = round_folder(tmp_path)
    api = FakeApi()
    owned = KubernetesJobLauncher(
        settings_with(owner_deployment="ctloop-training"),
        files=MemoryFiles(),
        api=api.client(tmp_path),
        sleep=lambda _: None,
    )
    manifest = owned.manifest("ctloop-sustainer-r0001-abc", "jobs/x", config)
    assert manifest["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": "ctloop-training",
            "uid": "uid-of-ctloop-training",
        }
    ]
    assert ("GET", "/apis/apps/v1/namespaces/ctloop/deployments/ctloop-training") in api.calls
    free = KubernetesJobLauncher(settings_with(), files=MemoryFiles(), api=api.client(tmp_path))
    assert "ownerReferences" not in free.manifest("j", "jobs/x", config)["metadata"]


def test_a_failed_job_raises_with_its_log_and_is_still_cleaned_up(tmp_path):
    config, work = round_folder(tmp_path)
    files = MemoryFiles()
    api = FakeApi(outcome="Failed")
    launcher = KubernetesJobLauncher(
        settings_with(), files=files, api=api.client(tmp_path), sleep=lambda _: None
    )
    with pytest.raises(RuntimeError, match="failed: BackoffLimitExceeded"):
        launcher.run(config, work)
    assert not config.out.exists()
    assert api.jobs == {} and files.objects == {}
    assert (work / "train.log").read_text() == "(no pods)"


def test_a_job_that_never_finishes_times_out(tmp_path):
    config, work = round_folder(tmp_path)
    now = [0.0]

    class Running(FakeApi):
        def handle(self, request: httpx.Request) -> httpx.Response:
            if request.method == "GET" and "/jobs/" in request.url.path:
                now[0] += 1000.0
                return httpx.Response(200, json={"status": {}})
            return super().handle(request)

    api = Running()
    launcher = KubernetesJobLauncher(
        settings_with(timeout_s=1800),
        files=MemoryFiles(),
        api=api.client(tmp_path),
        sleep=lambda _: None,
        clock=lambda: now[0],
    )
    with pytest.raises(RuntimeError, match="no result after 1800s"):
        launcher.run(config, work)
    assert ("DELETE", api.calls[-1][1]) == api.calls[-1]


def test_job_outcomes_from_conditions():
    assert job_outcome({"status": {}}) is None
    done = {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    assert job_outcome(done) == "succeeded"
    pytorch = {"status": {"conditions": [{"type": "Succeeded", "status": "True"}]}}
    assert job_outcome(pytorch) == "succeeded"
    stale = {"status": {"conditions": [{"type": "Failed", "status": "False"}]}}
    assert job_outcome(stale) is None


def test_the_local_launcher_reports_a_failing_torchrun(tmp_path, monkeypatch):
    config, work = round_folder(tmp_path)
    monkeypatch.setattr(
        "services.training.launcher.torchrun_command",
        lambda *a, **k: [shutil.which("sh") or "/bin/sh", "-c", "echo boom; exit 3"],
    )
    with pytest.raises(RuntimeError, match="exited 3:\nboom"):
        LocalLauncher(1).run(config, work)
