"""The bus's grants table and how each client finds its Kafka credential (issue 18, finding 7).
The broker enforcing them is tested in tests/integration/test_kafka_security.py."""

from __future__ import annotations

import stat
import sys
import types
from pathlib import Path

import pytest

from ctloop.contracts.kafka_acls import (
    ADMIN,
    GRANTS,
    GROUP,
    PREFIXED,
    READ,
    TOPIC,
    WRITE,
    AclRow,
    acl_rows,
)
from ctloop.contracts.topics import Topic
from ctloop.kafka_security import (
    MissingCredential,
    client_config,
    new_passwords,
    principal,
    read_credentials,
    write_credentials,
)
from ctloop.settings import Settings
from ctloop.stack.components.kafka import KafkaBroker


def _settings(tmp_path: Path, **kafka: object) -> Settings:
    return Settings(run_dir=tmp_path / "run", kafka=kafka)  # type: ignore[arg-type]


def test_only_training_may_announce_a_model():
    writers = {name for name, g in GRANTS.items() if Topic.MODEL_PUBLISHED in g.produces}
    assert writers == {"training"}
    rows = acl_rows()
    assert {
        r.principal for r in rows if r.name == Topic.MODEL_PUBLISHED and r.operation == WRITE
    } == {"training"}


def test_every_event_has_a_producer_and_a_consumer_and_consumers_dead_letter():
    for topic in Topic:
        assert any(topic in g.produces for g in GRANTS.values()), topic
        if topic != Topic.DEAD_LETTER:
            assert any(topic in g.consumes for g in GRANTS.values()), topic
    for g in GRANTS.values():
        assert bool(g.consumes) == (Topic.DEAD_LETTER in g.produces), g.principal
        assert bool(g.consumes) == bool(g.groups), g.principal


def test_the_services_consumer_groups_are_those_granted():
    from services.inference.worker import CONSUMER as INFERENCE
    from services.training.worker import CONSUMER as TRAINING

    assert GRANTS["inference"].groups == (INFERENCE,)
    assert GRANTS["training"].groups == (TRAINING,)
    assert GRANTS["metrics"].groups == ("metrics-",)  # services/metrics: metrics-<host>-<hex>


def test_group_grants_follow_the_deployments_group_prefix():
    groups = {r for r in acl_rows("site-b.") if r.resource == GROUP}
    assert groups == {
        AclRow("inference", GROUP, PREFIXED, "site-b.inference", READ),
        AclRow("training", GROUP, PREFIXED, "site-b.training", READ),
        AclRow("metrics", GROUP, PREFIXED, "site-b.metrics-", READ),
    }
    assert all(r.pattern != PREFIXED for r in acl_rows() if r.resource == TOPIC)
    assert ADMIN not in {r.principal for r in acl_rows()}  # a super user needs no rule


def test_without_a_credentials_file_clients_speak_plaintext(tmp_path):
    assert client_config(_settings(tmp_path)) == {"bootstrap_servers": "127.0.0.1:19092"}


def test_credentials_file_is_private_and_gives_each_principal_its_own(tmp_path):
    settings = _settings(tmp_path, principal="ingest")
    passwords = new_passwords()
    write_credentials(settings.kafka_credentials_file, passwords)
    assert stat.S_IMODE(settings.kafka_credentials_file.stat().st_mode) == 0o600
    assert read_credentials(settings.kafka_credentials_file) == passwords
    config = client_config(settings)
    assert config["security_protocol"] == "SASL_PLAINTEXT"
    assert config["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (config["sasl_plain_username"], config["sasl_plain_password"]) == (
        "ingest",
        passwords["ingest"],
    )
    assert client_config(_settings(tmp_path))["sasl_plain_username"] == ADMIN
    with pytest.raises(MissingCredential):
        client_config(_settings(tmp_path, principal="mallory"))


def test_a_given_password_wins_and_an_instance_reads_the_stacks_file(tmp_path):
    chart = client_config(_settings(tmp_path, principal="metrics", password="from-secret"))
    assert (chart["sasl_plain_username"], chart["sasl_plain_password"]) == (
        "metrics",
        "from-secret",
    )
    stack = tmp_path / "stack" / "kafka-credentials.json"
    write_credentials(stack, new_passwords())
    instance = _settings(tmp_path, principal="training", credentials_file=stack)
    assert client_config(instance)["sasl_plain_password"] == read_credentials(stack)["training"]
    # A private stack in the instance's own run folder comes first.
    own = new_passwords()
    write_credentials(instance.kafka_credentials_file, own)
    assert client_config(instance)["sasl_plain_password"] == own["training"]


def test_a_migrating_admin_signs_in_with_plain(tmp_path):
    settings = _settings(tmp_path)
    write_credentials(settings.kafka_credentials_file, new_passwords(), admin_plain=True)
    assert client_config(settings)["sasl_mechanism"] == "PLAIN"
    assert client_config(_settings(tmp_path, principal="ingest"))["sasl_mechanism"] == (
        "SCRAM-SHA-512"
    )


def test_a_service_process_is_its_own_principal(tmp_path, monkeypatch):
    settings = _settings(tmp_path)
    assert principal(settings) == ADMIN  # pytest, the tools
    main = types.ModuleType("__main__")
    main.__spec__ = types.SimpleNamespace(name="services.inference.__main__")  # type: ignore[assignment]
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert principal(settings) == "inference"
    assert principal(_settings(tmp_path, principal="metrics")) == "metrics"


def test_the_broker_config_authenticates_and_authorises(tmp_path):
    settings = _settings(tmp_path)
    broker = KafkaBroker(settings)
    broker.data_dir.mkdir(parents=True)
    broker._write_config("s3cret", "SCRAM-SHA-512")
    text = broker.config_path.read_text()
    assert stat.S_IMODE(broker.config_path.stat().st_mode) == 0o600
    assert "listener.security.protocol.map=BROKER:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT" in text
    assert "listener.name.broker.sasl.enabled.mechanisms=SCRAM-SHA-512\n" in text
    assert "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer" in text
    assert "super.users=User:admin\n" in text
    assert "allow.everyone.if.no.acl.found=true" not in text
    broker._write_config("s3cret", "PLAIN")  # storage from before SASL: admin on PLAIN for now
    assert "broker.sasl.enabled.mechanisms=SCRAM-SHA-512,PLAIN\n" in broker.config_path.read_text()
