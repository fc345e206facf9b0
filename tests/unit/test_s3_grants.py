"""The grant table (ctloop/s3_grants.py) against the real key layout (ctloop/contracts/keys.py):
every key a service writes or reads is inside its grant, nothing else is, and no identity may
delete an annotation revision or a model file. The servers' enforcement is tested in
tests/integration/test_s3_grants.py."""

import fnmatch
import json
import stat

from ctloop.contracts import keys
from ctloop.s3_grants import (
    GRANTS,
    IDENTITIES,
    Credential,
    Verb,
    bucket_name,
    bucket_policy,
    credential_file,
    identity_policy,
    key_pattern,
    read_credential,
    write_credential,
)
from ctloop.settings import Settings

S = Settings()
MODELS = S.triton.model_prefix


def may(identity: str, verb: Verb, bucket: str, key: str) -> bool:
    """Whether the table grants ``verb`` on ``key`` (``*`` matching across ``/``, as S3)."""
    return any(
        g.bucket == bucket and verb in g.verbs and fnmatch.fnmatchcase(key, key_pattern(S, g.keys))
        for g in GRANTS[identity]
    )


def test_every_service_has_an_identity_and_triton_reads_only_models():
    assert set(IDENTITIES) == {"ingest", "inference", "training", "metrics", "triton"}
    assert {g.bucket for g in GRANTS["triton"]} == {"models"}
    assert set().union(*(g.verbs for g in GRANTS["triton"])) == {Verb.READ, Verb.LIST}


def test_the_keys_each_service_uses_are_inside_its_grants():
    image, label = keys.volume_image("site-a", "v1"), keys.volume_label("site-a", "v1")
    annotation = keys.annotation_mask("site-a", "v1", 3)
    mask = keys.prediction_mask("v1", "sustainer", 2)
    model_py = keys.model_file(MODELS, "sustainer", 2, "model.py")
    job = keys.training_output(keys.training_job_prefix(S.training.kubernetes.s3_prefix, "r1"), "x")
    uses = [
        ("ingest", Verb.WRITE, "data", image),
        ("ingest", Verb.DELETE_VERSION, "data", image),
        ("ingest", Verb.WRITE, "data", annotation),
        ("ingest", Verb.READ, "data", mask),
        ("inference", Verb.READ, "data", image),
        ("inference", Verb.WRITE, "data", keys.volume_model_input("site-a", "v1", "abc")),
        ("inference", Verb.WRITE, "data", keys.prediction_info("v1", "sustainer", 2)),
        ("inference", Verb.READ, "models", keys.model_manifest(MODELS, "sustainer", 2)),
        ("training", Verb.READ, "data", annotation),
        ("training", Verb.WRITE, "models", model_py),
        ("training", Verb.DELETE, "data", job),
        ("metrics", Verb.READ, "data", label),
        ("metrics", Verb.DELETE_VERSION, "data", keys.metrics_snapshot("default")),
        ("metrics", Verb.WRITE, "data", keys.report_file("run1", "report.json")),
        ("triton", Verb.READ, "models", model_py),
    ]
    for use in uses:
        assert may(*use), use


def test_nothing_outside_the_grants():
    image = keys.volume_image("site-a", "v1")
    annotation = keys.annotation_mask("site-a", "v1", 3)
    model_py = keys.model_file(MODELS, "sustainer", 2, "model.py")
    refused = [
        ("triton", Verb.WRITE, "models", model_py),
        ("triton", Verb.READ, "data", image),
        ("inference", Verb.WRITE, "models", model_py),
        ("inference", Verb.WRITE, "data", image),
        ("ingest", Verb.DELETE_VERSION, "data", annotation),
        ("ingest", Verb.READ, "models", model_py),
        ("training", Verb.WRITE, "data", keys.prediction_mask("v1", "m", 1)),
        ("training", Verb.DELETE_VERSION, "models", model_py),
        ("metrics", Verb.READ, "data", image),
        ("metrics", Verb.WRITE, "data", annotation),
    ]
    for use in refused:
        assert not may(*use), use


def test_policies_deny_deleting_revisions_to_everyone():
    for identity in IDENTITIES:
        denied = [s for s in identity_policy(S, identity)["Statement"] if s["Effect"] == "Deny"]
        resources = {r for s in denied for r in s["Resource"]}
        assert f"arn:aws:s3:::{S.s3.bucket}/annotations/*" in resources
        assert f"arn:aws:s3:::{S.s3.model_bucket}/{MODELS}/*" in resources
        assert all("s3:DeleteObjectVersion" in s["Action"] for s in denied)


def test_bucket_policy_names_each_principal_on_its_own_bucket_only():
    access = {i: f"key-{i}" for i in IDENTITIES}
    models = bucket_policy(S, "models", access)["Statement"]
    assert {p for s in models for p in s["Principal"]["AWS"]} == set(access.values())
    allowed = {p for s in models if s["Effect"] == "Allow" for p in s["Principal"]["AWS"]}
    assert allowed == {"key-inference", "key-training", "key-triton"}
    for s in models:
        assert all(r.startswith(f"arn:aws:s3:::{S.s3.model_bucket}") for r in s["Resource"])


def test_listing_is_held_to_the_prefix():
    (listing,) = [
        s
        for s in identity_policy(S, "training")["Statement"]
        if s["Action"] == ["s3:ListBucket"]
        if s["Resource"] == [f"arn:aws:s3:::{S.s3.model_bucket}"]
    ]
    assert listing["Condition"]["StringLike"]["s3:prefix"] == [MODELS, f"{MODELS}/", f"{MODELS}/*"]


def test_credential_files_are_private_and_never_print(tmp_path):
    path = credential_file(tmp_path / "creds", "ingest")
    write_credential(path, Credential("ctloop-ingest", "s3cr3t-value"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_credential(path) == Credential("ctloop-ingest", "s3cr3t-value")
    assert "s3cr3t" not in repr(read_credential(path))
    assert read_credential(tmp_path / "none.json") is None


def test_settings_pick_the_identity_credential_file_else_root(monkeypatch, tmp_path):
    monkeypatch.setenv("CTLOOP_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("CTLOOP_S3__IDENTITY", "metrics")
    s = Settings()
    assert s.s3_credential() == (s.s3.access_key, s.s3.secret_key.get_secret_value())
    write_credential(credential_file(tmp_path / "s3-credentials", "metrics"), Credential("m", "x"))
    assert s.s3_credential() == ("m", "x")
    assert s.s3_credential("triton")[0] == s.s3.access_key  # no file for triton: root


def test_bucket_policies_fit_the_gateways_extended_attribute():
    """Versity Gateway's posix backend keeps a bucket policy in an xattr of the bucket folder:
    ext4 holds about 4 KB for all of them (a longer policy: 507 "No space left on device")."""
    from ctloop.s3_grants import access_key_of, policy_text

    access = {i: access_key_of(i) for i in IDENTITIES}
    for bucket in ("data", "models"):
        assert len(policy_text(bucket_policy(S, bucket, access))) < 3200


def test_each_identity_has_a_key_outside_its_reads_for_the_release_check():
    from ctloop.s3_grants import outside_read

    settings = Settings()
    for identity in IDENTITIES:
        bucket, key = outside_read(settings, identity)
        for g in GRANTS[identity]:
            if Verb.READ in g.verbs and bucket_name(settings, g.bucket) == bucket:
                assert not fnmatch.fnmatchcase(key, key_pattern(settings, g.keys)), (identity, key)


def test_the_policies_print_for_a_storage_team(capsys):
    from ctloop.s3_grants import main

    assert main(["triton"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["triton"]["access_key"] == "ctloop-triton"
    assert out["triton"]["policy"] == identity_policy(Settings(), "triton")
