"""Triton's process environment: its own S3 identity and nothing of the caller's AWS settings."""

from __future__ import annotations

from ctloop.settings import Settings
from ctloop.stack.components.triton import TritonServer


def test_triton_gets_its_own_aws_settings_and_none_of_the_callers(monkeypatch, tmp_path):
    """A CA bundle, a profile or a session token in the caller's environment never reaches
    Triton (AWS_CA_BUNDLE broke its S3 client after a gateway restart); its keys are the
    triton identity's (the root keys where no identity file exists), its region the stack's."""
    for name, value in {
        "AWS_CA_BUNDLE": "/etc/ssl/certs/ca-certificates.crt",
        "AWS_PROFILE": "someone-else",
        "AWS_SESSION_TOKEN": "not-ours",
        "AWS_ENDPOINT_URL": "http://elsewhere:9000",
    }.items():
        monkeypatch.setenv(name, value)
    settings = Settings(run_dir=tmp_path)
    env = TritonServer(settings).env()
    aws = {k: v for k, v in env.items() if k.startswith("AWS_")}
    access, secret = settings.s3_credential("triton")
    assert aws == {
        "AWS_ACCESS_KEY_ID": access,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": settings.s3.region,
    }
    assert env["CTLOOP_RUN_DIR"] == str(tmp_path)


def test_triton_loads_configs_as_written_without_an_auto_complete_stub(tmp_path):
    """ctloop writes every model config whole; Triton asking model.py to complete one starts a
    second python stub per load (torch, MONAI and ctloop imported twice: ~7 s of a 12 s load
    here). The local stack and the chart both turn it off."""
    assert "--disable-auto-complete-config" in TritonServer(Settings(run_dir=tmp_path)).command()
