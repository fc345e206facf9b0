"""A round as a Kubernetes Job: the few API calls, and the launcher that runs it.

:class:`KubernetesJobLauncher` moves the round through the object store: it uploads the work
folder under ``<s3_prefix>/<job>/input/`` of the data bucket, creates a batch/v1 Job (indexed,
one pod per node; or a Kubeflow ``PyTorchJob``; :mod:`services.training.manifests`) that runs
``python -m services.training.job`` (download, ``torchrun``, upload ``output/``), polls it to
the end with a timeout, fetches the candidate and the log, and deletes the Job and the prefix.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from ctloop.contracts import keys
from ctloop.core.train import TrainConfig
from ctloop.settings import Settings
from services.training.manifests import build_job, build_pytorchjob, job_name
from services.training.round_files import (
    TRAIN_JSON,
    TRAIN_LOG,
    ObjectStoreFiles,
    RoundFiles,
    input_files,
    relative_config,
)
from services.training.torchrun import log_tail

log = logging.getLogger("ctloop.training.launcher")

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
        manifest = build(self.settings, name, prefix, config)
        if self.k.owner_deployment:
            manifest["metadata"]["ownerReferences"] = [self._owner()]
        return manifest

    def _owner(self) -> dict[str, Any]:
        """The owning Deployment as an owner reference (its uid read from the API)."""
        name = self.k.owner_deployment
        path = f"/apis/apps/v1/namespaces/{self.api.namespace}/deployments/{name}"
        uid = self.api.call("GET", path)["metadata"]["uid"]
        return {"apiVersion": "apps/v1", "kind": "Deployment", "name": name, "uid": uid}

    def prepare(self) -> None:
        """Nothing to keep ready: each round is a Job of its own."""

    def close(self) -> None:
        """Nothing kept between rounds."""

    def run(self, config: TrainConfig, work: Path) -> None:
        name = job_name(config)
        prefix = keys.training_job_prefix(self.k.s3_prefix, name)
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
            got_log = self.files.download(keys.training_output(prefix, TRAIN_LOG), work / TRAIN_LOG)
            if not got_log:
                (work / TRAIN_LOG).write_text(self._pod_logs(name))
            if outcome != "succeeded":
                raise RuntimeError(f"job {name} {outcome}:\n{log_tail(work / TRAIN_LOG)}")
            if not self.files.download(keys.training_output(prefix, str(relative.out)), config.out):
                raise RuntimeError(f"job {name} wrote no checkpoint:\n{log_tail(work / TRAIN_LOG)}")
        finally:
            self._delete(f"{collection}/{name}")
            self.files.delete(self.files.keys(prefix + "/"))
        log.info("training job finished", extra={"job": name})

    def _upload(self, relative: TrainConfig, work: Path, prefix: str) -> None:
        for rel in input_files(relative, work):
            self.files.upload(keys.training_input(prefix, rel.as_posix()), work / rel)
        spec = work / TRAIN_JSON
        spec.write_text(relative.model_dump_json(indent=2))
        self.files.upload(keys.training_input(prefix, TRAIN_JSON), spec)

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
