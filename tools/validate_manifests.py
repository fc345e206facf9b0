"""Validate rendered Kubernetes manifests offline (``make helm-check``).

Built-in kinds: ``kubernetes-validate --strict`` against the Kubernetes version given (unknown
fields, wrong types and missing required fields are errors; so is a built-in kind or API version
it has no schema for). Custom resources, which kubernetes-validate does not know, are checked
against the small JSON schemas in ``tools/crd-schemas/`` (the fields this chart and the training
launcher use, strictly); a custom kind with no schema there is an error, never a silent pass.

Usage: python tools/validate_manifests.py --kubernetes-version 1.37.0 FILE.yaml [...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

CRD_SCHEMAS = Path(__file__).with_name("crd-schemas")
# Custom resources: apiVersion/kind -> schema file, and why kubernetes-validate cannot check them.
CUSTOM_KINDS: dict[tuple[str, str], tuple[str, str]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): (
        "servicemonitor.json",
        "Prometheus-operator CRD (serviceMonitor.enabled)",
    ),
    ("security.istio.io/v1", "PeerAuthentication"): (
        "peerauthentication.json",
        "Istio CRD (mtls.provider=istio)",
    ),
    ("kubeflow.org/v1", "PyTorchJob"): (
        "pytorchjob.json",
        "Kubeflow training-operator CRD (training.job.kind=pytorchjob, built by the launcher)",
    ),
}


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def validate(doc: dict[str, Any], version: str) -> str | None:
    """None if ``doc`` is valid, else why not."""
    key = (doc.get("apiVersion", ""), doc.get("kind", ""))
    if key in CUSTOM_KINDS:
        schema = json.loads((CRD_SCHEMAS / CUSTOM_KINDS[key][0]).read_text())
        try:
            jsonschema.validate(doc, schema)
        except jsonschema.ValidationError as exc:
            return f"{'.'.join(map(str, exc.absolute_path))}: {exc.message}"
        return None
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except ValidationError as exc:
        return f"{'.'.join(map(str, exc.path))}: {exc.message}"
    except SchemaNotFoundError as exc:
        return f"no schema: {exc.message} (add a schema to tools/crd-schemas if it is a CRD)"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubernetes-version", required=True)
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    failures = checked = 0
    kinds: dict[str, int] = {}
    for path in args.files:
        for doc in documents(path):
            checked += 1
            kind = f"{doc.get('apiVersion')}/{doc.get('kind')}"
            kinds[kind] = kinds.get(kind, 0) + 1
            error = validate(doc, args.kubernetes_version)
            if error:
                failures += 1
                name = doc.get("metadata", {}).get("name", "?")
                print(f"FAIL {path.name}: {doc.get('kind')}/{name}: {error}")
    custom = sorted(f"{a}/{k}" for a, k in CUSTOM_KINDS)
    print(
        f"validated {checked} documents in {len(args.files)} files against Kubernetes "
        f"{args.kubernetes_version} (strict): {failures} invalid; "
        f"custom kinds checked by tools/crd-schemas: {', '.join(custom)}"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
