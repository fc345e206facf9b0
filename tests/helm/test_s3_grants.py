"""The chart's object store can hold per-service S3 accounts (issue 18, finding 4)."""

from tests.helm.conftest import render


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
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
