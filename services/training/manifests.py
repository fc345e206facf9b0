"""The Kubernetes manifests of a training round: a batch/v1 Job or a Kubeflow ``PyTorchJob``.

Each pod runs ``python -m services.training.job`` as a non-root user with a read-only root
filesystem, a scratch volume for the round's files and a memory-backed ``/dev/shm``. Several
nodes meet at a c10d rendezvous: on pod 0 of a Job, where the training operator says in a
``PyTorchJob``.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from ctloop.core.train import TrainConfig
from ctloop.settings import KubernetesLauncherSettings, Settings

CONTAINER = "pytorch"  # the name the Kubeflow training operator requires; used for Jobs too
SCRATCH = "/scratch"
COMPONENT = "training-job"
# Non-root user of the ctloop images (docker/Dockerfile*).
IMAGE_UID = 10001


def job_name(config: TrainConfig) -> str:
    """``ctloop-<model>-r<round>-<6 hex>``: a DNS label short enough for pod hostnames."""
    model = re.sub(r"[^a-z0-9-]", "-", str(config.meta.get("name", "round")).lower())[:20]
    number = int(config.meta.get("round", 0))
    return f"ctloop-{model.strip('-') or 'round'}-r{number:04d}-{uuid.uuid4().hex[:6]}"


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
