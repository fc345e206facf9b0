"""The inference server of the embedded stack: NVIDIA's tritonserver, models from S3."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
from pathlib import Path

import httpx

from ctloop.stack.components.base import Component, Health, StackError


class TritonServer(Component):
    """NVIDIA tritonserver from the nvidia-pytriton wheel, python backend, S3 model repository."""

    name = "triton"

    @property
    def pytriton_dir(self) -> Path:
        # Located, not imported: pytriton's own Python API is not used (nor installable here).
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise StackError("nvidia-pytriton is not installed: run `make setup`")
        return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"

    @property
    def backends_dir(self) -> Path:
        return self.settings.tools_dir / "triton" / "backends"

    def prepare(self) -> None:
        """Assemble a backends folder whose python stub matches this interpreter."""
        src = self.pytriton_dir
        py = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = src / "python_backend_stubs" / py / "triton_python_backend_stub"
        if not stub.exists():
            raise StackError(f"no Triton python backend stub for Python {py} in {src}")
        dest = self.backends_dir / "python"
        dest.mkdir(parents=True, exist_ok=True)
        for item in (
            src / "backends" / "python" / "libtriton_python.so",
            src / "backends" / "python" / "triton_python_backend_utils.py",
            stub,
        ):
            target = dest / item.name
            if not target.exists() or target.stat().st_size != item.stat().st_size:
                shutil.copy2(item, target)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        from ctloop.storage import ObjectStore

        # Triton refuses a repository "directory" with no object under it.
        ObjectStore(self.settings).ensure_model_repository()

    @property
    def model_repository(self) -> str:
        s3, t = self.settings.s3, self.settings.triton
        return f"s3://{s3.url}/{s3.model_bucket}/{t.model_prefix}"

    def command(self) -> list[str]:
        t = self.settings.triton
        return [
            str(self.pytriton_dir / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            "--model-control-mode=explicit",
            f"--backend-directory={self.backends_dir}",
            f"--http-address={t.host}",
            f"--http-port={t.http_port}",
            f"--grpc-address={t.host}",
            f"--grpc-port={t.grpc_port}",
            f"--metrics-address={t.host}",
            f"--metrics-port={t.metrics_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            # A broken model must not take the server (and the models it serves) down.
            "--exit-on-error=false",
            "--strict-readiness=false",
            # Every config is complete (ctloop writes it): without this, each load of a
            # python-backend model starts one more stub, only to ask model.py to complete it
            # (importing torch, MONAI and ctloop once more: ~half of a load).
            "--disable-auto-complete-config",
            "--log-verbose=0",
        ]

    def env(self) -> dict[str, str]:
        s3 = self.settings.s3
        # Triton runs model.py from the bucket: it gets the identity that only reads models.
        access_key, secret_key = self.settings.s3_credential("triton")
        venv_bin = str(Path(sys.executable).parent)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        pytriton_libs = str(self.pytriton_dir.parent.parent / "nvidia_pytriton.libs")
        ld = [libdir, pytriton_libs, os.environ.get("LD_LIBRARY_PATH", "")]
        # None of the caller's own AWS settings (a CA bundle, a profile, a session token, another
        # endpoint): with AWS_CA_BUNDLE set, Triton's S3 client could not be created once the
        # gateway had restarted ("Unable to create S3 filesystem client"), and test_faults failed.
        ambient = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        return {
            **ambient,
            # The stub then runs as this virtualenv's python: model.py can import torch, monai.
            "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",
            # Without the interpreter's own libpython first, the stub loads the system one.
            "LD_LIBRARY_PATH": ":".join(p for p in ld if p),
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_DEFAULT_REGION": s3.region,
            "CTLOOP_RUN_DIR": str(self.settings.run_dir),
        }

    def listens(self) -> list[tuple[str, int]]:
        t = self.settings.triton
        return [(t.host, t.http_port), (t.host, t.grpc_port), (t.host, t.metrics_port)]

    def health(self) -> Health:
        t = self.settings.triton
        try:
            r = httpx.get(f"http://{t.host}:{t.http_port}/v2/health/ready", timeout=2.0)
        except httpx.HTTPError as exc:
            return Health(False, f"not answering: {type(exc).__name__}")
        return Health(r.status_code == 200, f"ready={r.status_code == 200}")

    def describe(self) -> str:
        t = self.settings.triton
        return f"grpc {t.grpc_url}, http {t.host}:{t.http_port}, repo {self.model_repository}"
