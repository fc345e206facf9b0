from ctloop.settings import Settings


def test_defaults_describe_the_embedded_stack():
    s = Settings()
    assert s.kafka.bootstrap_servers == "127.0.0.1:19092"
    assert s.s3.url == "http://127.0.0.1:17070"
    assert s.triton.grpc_url == "127.0.0.1:18001"
    assert s.database_url.startswith("sqlite:///")


def test_environment_overrides_nested_values(monkeypatch, tmp_path):
    monkeypatch.setenv("CTLOOP_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("CTLOOP_KAFKA__EXTERNAL_BOOTSTRAP", "kafka-0:9092,kafka-1:9092")
    monkeypatch.setenv("CTLOOP_DB__BACKEND", "postgresql")
    monkeypatch.setenv("CTLOOP_DB__PG_PORT", "6543")
    s = Settings()
    assert s.kafka.bootstrap_servers == "kafka-0:9092,kafka-1:9092"
    assert s.database_url.endswith("@127.0.0.1:6543/ctloop")
    assert s.data_dir == tmp_path / "data"


def test_external_services_are_not_run_locally(monkeypatch):
    from ctloop.stack.components import stack_components

    monkeypatch.setenv("CTLOOP_S3__EXTERNAL_ENDPOINT", "minio:9000")
    monkeypatch.setenv("CTLOOP_DB__URL", "postgresql+psycopg://u:p@db/ctloop")
    names = [c.name for c in stack_components(Settings())]
    assert names == ["kafka", "triton"]


def test_secrets_do_not_print():
    assert "ctloop-local-secret" not in repr(Settings())
