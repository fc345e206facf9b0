"""Where a round's ``torchrun`` runs: on this machine, or as a Kubernetes Job.

The contract every launcher keeps (``Launcher.run(config, work)``):

- ``config`` is the round's :class:`~ctloop.core.train.TrainConfig`; every path in it (the
  Decathlon ``sources``, ``init_from``, ``out``) lies inside the round's folder ``work``.
- On return ``config.out`` exists (the candidate checkpoint, written by rank 0 alone) and
  ``work / "train.log"`` holds the training log (rank 0's node).
- On failure it raises ``RuntimeError`` with the log's tail, and leaves nothing running.

:class:`LocalLauncher` is ``torchrun --standalone --nproc-per-node N`` in a subprocess (what the
training service has always done). :class:`KubernetesJobLauncher` moves the round through the
object store: it uploads the work folder under ``<s3_prefix>/<job>/input/`` of the data bucket,
creates a batch/v1 Job (indexed, one pod per node; or a Kubeflow ``PyTorchJob``) that runs
``python -m services.training.job`` (download, ``torchrun``, upload ``output/``), polls it to the
end with a timeout, fetches the candidate and the log, and deletes the Job and the prefix.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from ctloop.core.train import DataSource, TrainConfig
from ctloop.settings import REPO_ROOT, KubernetesLauncherSettings, Settings

log = logging.getLogger("ctloop.training.launcher")

TRAIN_JSON = "train.json"
TRAIN_LOG = "train.log"
CONTAINER = "pytorch"  # the name the Kubeflow training operator requires; used for Jobs too
SCRATCH = "/scratch"
COMPONENT = "training-job"
# Non-root user of the ctloop images (docker/Dockerfile*).
IMAGE_UID = 10001


class Launcher(Protocol):
    def run(self, config: TrainConfig, work: Path) -> None: ...


# ---------------------------------------------------------------- torchrun, shared
@dataclass(frozen=True)
class Rendezvous:
    """c10d rendezvous of a multi-node run: node 0 hosts the store at ``endpoint``."""

    endpoint: str  # host:port
    run_id: str


def torchrun_command(
    config_path: Path,
    nproc_per_node: int,
    nnodes: int = 1,
    rendezvous: Rendezvous | None = None,
    from_env: bool = False,
) -> list[str]:
    """``python -m torch.distributed.run … -m ctloop.core.train <config>``.

    One node: ``--standalone``. Several: c10d rendezvous at ``rendezvous``. ``from_env``: the
    Kubeflow operator's ``PET_*`` variables (nnodes, node rank, master address) configure it.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if from_env:
        pass
    elif nnodes == 1:
        cmd += ["--standalone", f"--nproc-per-node={nproc_per_node}"]
    else:
        if rendezvous is None:
            raise ValueError("a multi-node run needs a rendezvous endpoint")
        cmd += [
            f"--nnodes={nnodes}",
            f"--nproc-per-node={nproc_per_node}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rendezvous.endpoint}",
            f"--rdzv-id={rendezvous.run_id}",
        ]
    return [*cmd, "-m", "ctloop.core.train", str(config_path)]


def run_logged(cmd: list[str], log_path: Path) -> int:
    """Run ``cmd`` with ctloop importable, stdout and stderr into ``log_path``."""
    path = os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}:{path}" if path else str(REPO_ROOT)}
    with open(log_path, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    return proc.returncode


def log_tail(log_path: Path, chars: int = 2000) -> str:
    return log_path.read_text(errors="replace")[-chars:] if log_path.exists() else "(no log)"


class LocalLauncher:
    """``torchrun --standalone`` on this machine, ``nproc_per_node`` processes."""

    def __init__(self, nproc_per_node: int) -> None:
        self.nproc_per_node = nproc_per_node

    def run(self, config: TrainConfig, work: Path) -> None:
        cfg_path = work / TRAIN_JSON
        cfg_path.write_text(config.model_dump_json(indent=2))
        log.info("torchrun", extra={"nproc_per_node": self.nproc_per_node, "config": str(cfg_path)})
        code = run_logged(torchrun_command(cfg_path, self.nproc_per_node), work / TRAIN_LOG)
        if code != 0 or not config.out.exists():
            raise RuntimeError(f"torchrun exited {code}:\n{log_tail(work / TRAIN_LOG)}")


# ---------------------------------------------------------------- a round as files
def relative_config(config: TrainConfig, work: Path) -> TrainConfig:
    """``config`` with its paths relative to ``work`` (so it can run in another folder)."""

    def rel(p: Path) -> Path:
        try:
            return p.resolve().relative_to(work.resolve())
        except ValueError:
            raise ValueError(f"{p} is not inside the round folder {work}") from None

    return config.model_copy(
        update={
            "sources": [s.model_copy(update={"path": rel(s.path)}) for s in config.sources],
            "out": rel(config.out),
            "init_from": rel(config.init_from) if config.init_from else None,
        }
    )


def rooted_config(config: TrainConfig, root: Path) -> TrainConfig:
    """The inverse of :func:`relative_config`: relative paths resolved inside ``root``."""
    return config.model_copy(
        update={
            "sources": [DataSource(path=root / s.path, limit=s.limit) for s in config.sources],
            "out": root / config.out,
            "init_from": root / config.init_from if config.init_from else None,
        }
    )


def input_files(config: TrainConfig, root: Path) -> list[Path]:
    """Every file a relative ``config`` reads, relative to ``root``: its sources' folders and
    the parent weights."""
    files: list[Path] = []
    for source in config.sources:
        folder = root / source.path
        files += sorted(p.relative_to(root) for p in folder.rglob("*") if p.is_file())
    if config.init_from is not None:
        files.append(config.init_from)
    return files


def job_name(config: TrainConfig) -> str:
    """``ctloop-<model>-r<round>-<6 hex>``: a DNS label short enough for pod hostnames."""
    model = re.sub(r"[^a-z0-9-]", "-", str(config.meta.get("name", "round")).lower())[:20]
    number = int(config.meta.get("round", 0))
    return f"ctloop-{model.strip('-') or 'round'}-r{number:04d}-{uuid.uuid4().hex[:6]}"


# ---------------------------------------------------------------- manifests
def _labels(k: KubernetesLauncherSettings, name: str, config: TrainConfig) -> dict[str, str]:
    return {
        **k.labels,
        "app.kubernetes.io/name": "ctloop",
        "app.kubernetes.io/component": COMPONENT,
        "ctloop.org/job": name,
        "ctloop.org/round": str(int(config.meta.get("round", 0))),
    }


def _container(
    settings: Settings, args: list[str], nproc: int, ports: list[dict[str, Any]]
) -> dict[str, Any]:
    k = settings.training.kubernetes
    requests: dict[str, str] = {"cpu": k.cpu, "memory": k.memory}
    limits: dict[str, str] = {"memory": k.memory_limit or k.memory}
    if k.cpu_limit:
        limits["cpu"] = k.cpu_limit
    if k.gpu_resource:  # extended resources: request == limit
        requests[k.gpu_resource] = limits[k.gpu_resource] = str(nproc)
    s3 = settings.s3
    env: list[dict[str, Any]] = [
        {"name": "CTLOOP_S3__EXTERNAL_ENDPOINT", "value": s3.endpoint},
        {"name": "CTLOOP_S3__SECURE", "value": str(s3.secure).lower()},
        {"name": "CTLOOP_S3__REGION", "value": s3.region},
        {"name": "CTLOOP_S3__BUCKET", "value": s3.bucket},
        {"name": "CTLOOP_LOG_LEVEL", "value": settings.log_level},
        {"name": "CTLOOP_RUN_DIR", "value": f"{SCRATCH}/ctloop"},
        {"name": "HOME", "value": SCRATCH},
        {"name": "TMPDIR", "value": f"{SCRATCH}/tmp"},
    ]
    env += [
        {"name": e.name, "valueFrom": {"secretKeyRef": {"name": e.secret, "key": e.key}}}
        for e in k.secret_env
    ]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": k.image,
        "imagePullPolicy": k.image_pull_policy,
        "command": ["python", "-m", "services.training.job", *args],
        "env": env,
        "resources": {"requests": requests, "limits": limits},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "scratch", "mountPath": SCRATCH},
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
    }
    if ports:
        container["ports"] = ports
    return container


def _pod_template(
    settings: Settings, labels: dict[str, str], container: dict[str, Any], subdomain: str = ""
) -> dict[str, Any]:
    k = settings.training.kubernetes
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": k.service_account,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": IMAGE_UID,
            "runAsGroup": IMAGE_UID,
            "fsGroup": IMAGE_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "scratch", "emptyDir": {"sizeLimit": k.scratch_size}},
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": k.shm_size}},
        ],
    }
    if subdomain:
        spec["subdomain"] = subdomain
    if k.node_selector:
        spec["nodeSelector"] = dict(k.node_selector)
    if k.tolerations:
        spec["tolerations"] = list(k.tolerations)
    if k.priority_class:
        spec["priorityClassName"] = k.priority_class
    if k.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in k.image_pull_secrets]
    return {"metadata": {"labels": labels}, "spec": spec}


def build_job(settings: Settings, name: str, prefix: str, config: TrainConfig) -> dict[str, Any]:
    """An indexed batch/v1 Job: one pod per node, ``nproc_per_node`` processes (GPUs) each.

    Several nodes meet at a c10d rendezvous on pod 0, reached by its stable hostname
    ``<job>-0.<headless service>`` (indexed pods get ``<job>-<index>`` as hostname).
    """
    k, nproc = settings.training.kubernetes, settings.training.nproc_per_node
    if k.nodes > 1 and not k.headless_service:
        raise ValueError("multi-node training needs training.kubernetes.headless_service")
    args = [prefix, f"--nproc-per-node={nproc}", f"--nnodes={k.nodes}"]
    ports: list[dict[str, Any]] = []
    if k.nodes > 1:
        endpoint = f"{name}-0.{k.headless_service}:{k.rdzv_port}"
        args += [f"--rdzv-endpoint={endpoint}", f"--rdzv-id={name}"]
        ports = [{"name": "rendezvous", "containerPort": k.rdzv_port, "protocol": "TCP"}]
    labels = _labels(k, name, config)
    template = _pod_template(
        settings,
        labels,
        _container(settings, args, nproc, ports),
        subdomain=k.headless_service if k.nodes > 1 else "",
    )
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "completionMode": "Indexed",
            "completions": k.nodes,
            "parallelism": k.nodes,
            "backoffLimit": 0,  # the training service retries rounds itself
            "activeDeadlineSeconds": int(k.timeout_s),
            "ttlSecondsAfterFinished": k.ttl_after_finished_s,
            "template": template,
        },
    }


def build_pytorchjob(
    settings: Settings, name: str, prefix: str, config: TrainConfig
) -> dict[str, Any]:
    """A Kubeflow ``PyTorchJob`` (training operator v1): a Master and ``nodes - 1`` Workers;
    the operator sets the ``PET_*`` variables torchrun reads (nnodes, node rank, master)."""
    k, nproc = settings.training.kubernetes, settings.training.nproc_per_node
    labels = _labels(k, name, config)
    ports = [{"name": "pytorchjob-port", "containerPort": k.rdzv_port, "protocol": "TCP"}]
    template = _pod_template(
        settings, labels, _container(settings, [prefix, "--rdzv-from-env"], nproc, ports)
    )
    replicas: dict[str, Any] = {
        "Master": {"replicas": 1, "restartPolicy": "Never", "template": template}
    }
    if k.nodes > 1:
        replicas["Worker"] = {
            "replicas": k.nodes - 1,
            "restartPolicy": "Never",
            "template": template,
        }
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "nprocPerNode": str(nproc),
            "runPolicy": {
                "backoffLimit": 0,
                "activeDeadlineSeconds": int(k.timeout_s),
                "ttlSecondsAfterFinished": k.ttl_after_finished_s,
                "cleanPodPolicy": "None",
            },
            "pytorchReplicaSpecs": replicas,
        },
    }


# ---------------------------------------------------------------- the Kubernetes API
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubernetesApi:
    """The few calls the launcher makes, with the pod's service-account token (re-read on every
    call: projected tokens rotate) and the cluster CA."""

    def __init__(
        self,
        api_url: str,
        namespace: str | None = None,
        account_dir: Path = SERVICE_ACCOUNT_DIR,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.account_dir = account_dir
        self.namespace = namespace or (account_dir / "namespace").read_text().strip()
        ca = account_dir / "ca.crt"
        self.http = httpx.Client(
            base_url=api_url,
            verify=str(ca) if ca.exists() else True,
            timeout=30.0,
            transport=transport,
        )

    def _headers(self) -> dict[str, str]:
        token = (self.account_dir / "token").read_text().strip()
        return {"Authorization": f"Bearer {token}", "Accept": "application/json"}

    def request(
        self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None
    ) -> httpx.Response:
        return self.http.request(method, path, json=body, params=params, headers=self._headers())

    def call(
        self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None
    ) -> dict[str, Any]:
        r = self.request(method, path, body, params)
        if r.status_code >= 400:
            raise RuntimeError(f"Kubernetes API {method} {path}: {r.status_code} {r.text[:500]}")
        data: dict[str, Any] = r.json()
        return data

    def close(self) -> None:
        self.http.close()


def resource_path(manifest: dict[str, Any], namespace: str) -> str:
    """The collection URL of a manifest's kind (batch Jobs or Kubeflow PyTorchJobs)."""
    if manifest["kind"] == "Job":
        return f"/apis/batch/v1/namespaces/{namespace}/jobs"
    if manifest["kind"] == "PyTorchJob":
        return f"/apis/kubeflow.org/v1/namespaces/{namespace}/pytorchjobs"
    raise ValueError(f"unsupported kind {manifest['kind']}")


def job_outcome(obj: dict[str, Any]) -> str | None:
    """``succeeded`` / ``failed`` from a Job's or PyTorchJob's conditions; None while running."""
    for cond in obj.get("status", {}).get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") in ("Complete", "Succeeded"):
            return "succeeded"
        if cond.get("type") in ("Failed", "FailureTarget"):
            return f"failed: {cond.get('reason', '')} {cond.get('message', '')}".strip()
    return None


# ---------------------------------------------------------------- the object store side
class RoundFiles(Protocol):
    """Moving a round's files to and from the object store (a :class:`ctloop.storage.ObjectStore`
    adapter in production)."""

    def upload(self, key: str, path: Path) -> None: ...
    def download(self, key: str, path: Path) -> bool: ...  # False if the key does not exist
    def keys(self, prefix: str) -> list[str]: ...
    def delete(self, keys: list[str]) -> None: ...


class ObjectStoreFiles:
    """:class:`RoundFiles` on the data bucket, streaming files (volumes are large)."""

    def __init__(self, settings: Settings) -> None:
        from ctloop.storage import ObjectStore

        self.store = ObjectStore(settings)
        self.bucket = settings.s3.bucket

    def upload(self, key: str, path: Path) -> None:
        self.store.client.fput_object(self.bucket, key, str(path))

    def download(self, key: str, path: Path) -> bool:
        if not self.store.exists(self.bucket, key):
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        self.store.client.fget_object(self.bucket, key, str(path))
        return True

    def keys(self, prefix: str) -> list[str]:
        return self.store.list_keys(self.bucket, prefix)

    def delete(self, keys: list[str]) -> None:
        from minio.deleteobjects import DeleteObject

        errors = self.store.client.remove_objects(self.bucket, [DeleteObject(k) for k in keys])
        for err in errors:
            log.warning("could not delete", extra={"key": err.name, "error": err.message})


# ---------------------------------------------------------------- the launcher
class KubernetesJobLauncher:
    """A round as a Kubernetes Job (or PyTorchJob); see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        files: RoundFiles | None = None,
        api: KubernetesApi | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.k = settings.training.kubernetes
        self.files = files or ObjectStoreFiles(settings)
        self.api = api or KubernetesApi(self.k.api_url, self.k.namespace)
        self.sleep, self.clock = sleep, clock

    def manifest(self, name: str, prefix: str, config: TrainConfig) -> dict[str, Any]:
        build = build_pytorchjob if self.k.kind == "pytorchjob" else build_job
        return build(self.settings, name, prefix, config)

    def run(self, config: TrainConfig, work: Path) -> None:
        name = job_name(config)
        prefix = f"{self.k.s3_prefix.strip('/')}/{name}"
        relative = relative_config(config, work)
        self._upload(relative, work, prefix)
        manifest = self.manifest(name, prefix, config)
        collection = resource_path(manifest, self.api.namespace)
        log.info(
            "training job submitted",
            extra={"job": name, "kind": manifest["kind"], "nodes": self.k.nodes, "prefix": prefix},
        )
        try:
            self.api.call("POST", collection, manifest)
            outcome = self._wait(f"{collection}/{name}")
            got_log = self.files.download(f"{prefix}/output/{TRAIN_LOG}", work / TRAIN_LOG)
            if not got_log:
                (work / TRAIN_LOG).write_text(self._pod_logs(name))
            if outcome != "succeeded":
                raise RuntimeError(f"job {name} {outcome}:\n{log_tail(work / TRAIN_LOG)}")
            if not self.files.download(f"{prefix}/output/{relative.out}", config.out):
                raise RuntimeError(f"job {name} wrote no checkpoint:\n{log_tail(work / TRAIN_LOG)}")
        finally:
            self._delete(f"{collection}/{name}")
            self.files.delete(self.files.keys(prefix + "/"))
        log.info("training job finished", extra={"job": name})

    def _upload(self, relative: TrainConfig, work: Path, prefix: str) -> None:
        for rel in input_files(relative, work):
            self.files.upload(f"{prefix}/input/{rel.as_posix()}", work / rel)
        spec = work / TRAIN_JSON
        spec.write_text(relative.model_dump_json(indent=2))
        self.files.upload(f"{prefix}/input/{TRAIN_JSON}", spec)

    def _wait(self, path: str) -> str:
        deadline = self.clock() + self.k.timeout_s + 300  # past the Job's own deadline
        while True:
            outcome = job_outcome(self.api.call("GET", path))
            if outcome is not None:
                return outcome
            if self.clock() > deadline:
                return f"failed: no result after {self.k.timeout_s:.0f}s"
            self.sleep(self.k.poll_s)

    def _pod_logs(self, name: str) -> str:
        """The pods' own logs, when the job never got to upload its train.log."""
        ns = self.api.namespace
        try:
            pods = self.api.call(
                "GET",
                f"/api/v1/namespaces/{ns}/pods",
                params={"labelSelector": f"ctloop.org/job={name}"},
            )
            parts = []
            for pod in pods.get("items", []):
                pod_name = pod["metadata"]["name"]
                r = self.api.request("GET", f"/api/v1/namespaces/{ns}/pods/{pod_name}/log")
                parts.append(f"--- {pod_name}\n{r.text[-4000:]}")
            return "\n".join(parts) or "(no pods)"
        except Exception as exc:  # the log is a diagnosis aid, never the failure itself
            return f"(pod logs unavailable: {exc})"

    def _delete(self, path: str) -> None:
        r = self.api.request("DELETE", path, params={"propagationPolicy": "Background"})
        if r.status_code >= 400 and r.status_code != 404:
            log.warning("could not delete the job", extra={"path": path, "status": r.status_code})


def launcher_for(settings: Settings) -> Launcher:
    """The launcher ``training.launcher`` names."""
    if settings.training.launcher == "kubernetes":
        return KubernetesJobLauncher(settings)
    return LocalLauncher(settings.training.nproc_per_node)
