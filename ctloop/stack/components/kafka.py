"""The Kafka server of the embedded stack: a single-node KRaft broker and controller."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

from ctloop.contracts.kafka_acls import ADMIN, MECHANISM, PRINCIPALS
from ctloop.kafka_security import (
    admin_mechanism,
    apply_grants,
    new_passwords,
    read_credentials,
    write_credentials,
)
from ctloop.stack.components.base import Component, Health, StackError, port_open


class KafkaBroker(Component):
    """Single-node KRaft broker+controller from the Apache Kafka jars (fetched by `make setup`)."""

    name = "kafka"

    @property
    def libs(self) -> Path:
        return self.settings.tools_dir / "kafka" / "libs"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "server.properties"

    def _java(self, main: str, *args: str) -> list[str]:
        return [
            "java",
            f"-Xmx{self.settings.kafka.heap}",
            f"-Xms{self.settings.kafka.heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.xml'}",
            "-cp",
            f"{self.libs}/*",
            main,
            *args,
        ]

    def prepare(self) -> None:
        if not self.libs.is_dir() or not any(self.libs.glob("kafka_2.13-*.jar")):
            raise StackError(f"Kafka jars missing in {self.libs}: run `make setup`")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        formatted = (self.data_dir / "log" / "meta.properties").exists()
        passwords = self._passwords(formatted)
        self._write_config(passwords[ADMIN], admin_mechanism(self.settings.kafka_credentials_file))
        (self.data_dir / "log4j2.xml").write_text(_LOG4J2_XML)
        if formatted:
            return
        scram = [
            f"{MECHANISM}=[name={name},password={pw}]" for name, pw in sorted(passwords.items())
        ]
        result = subprocess.run(
            self._java(
                "kafka.tools.StorageTool",
                "format",
                "--standalone",
                "-t",
                _kafka_cluster_id(),
                "-c",
                str(self.config_path),
                *[arg for entry in scram for arg in ("--add-scram", entry)],
            ),
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise StackError(f"formatting Kafka storage failed:\n{result.stdout}{result.stderr}")

    def _passwords(self, formatted: bool) -> dict[str, str]:
        """Every principal's password: those of the credentials file when the storage it was
        formatted with is kept, new ones (written 0600 before the broker learns them) otherwise.
        Storage formatted without them (by a release before SASL) gets new ones, the admin
        signing in with PLAIN until ``after_start`` has stored every SCRAM credential."""
        path = self.settings.kafka_credentials_file
        if formatted and path.is_file():
            kept = read_credentials(path)
            if set(PRINCIPALS) <= set(kept):
                return kept
        passwords = new_passwords()
        write_credentials(path, passwords, admin_plain=formatted)
        return passwords

    def _write_config(self, admin_password: str, admin_mechanism: str) -> None:
        """server.properties (0600: it holds the admin's password). SASL/SCRAM-SHA-512 on the
        client listener, SASL/PLAIN for the controller (SCRAM credentials live in the metadata
        the controller serves, so they cannot authenticate the controller itself); the
        StandardAuthorizer denies whatever no ACL allows, ``admin`` is the only super user."""
        k = self.settings.kafka
        jaas_scram = (
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{ADMIN}" password="{admin_password}";'
        )
        jaas_plain = (
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'username="{ADMIN}" password="{admin_password}" user_{ADMIN}="{admin_password}";'
        )
        # The admin only, and only until the SCRAM credentials are in (see _passwords).
        broker_mechanisms = ",".join(dict.fromkeys([MECHANISM, admin_mechanism]))
        lines = [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.bootstrap.servers={k.host}:{k.controller_port}",
            f"listeners=BROKER://{k.host}:{k.port},CONTROLLER://{k.host}:{k.controller_port}",
            f"advertised.listeners=BROKER://{k.host}:{k.port}",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=BROKER:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT",
            "inter.broker.listener.name=BROKER",
            f"sasl.mechanism.inter.broker.protocol={MECHANISM}",
            "sasl.mechanism.controller.protocol=PLAIN",
            f"listener.name.broker.sasl.enabled.mechanisms={broker_mechanisms}",
            "listener.name.controller.sasl.enabled.mechanisms=PLAIN",
            f"listener.name.broker.{MECHANISM.lower()}.sasl.jaas.config={jaas_scram}",
            f"listener.name.broker.plain.sasl.jaas.config={jaas_plain}",
            f"listener.name.controller.plain.sasl.jaas.config={jaas_plain}",
            "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            f"super.users=User:{ADMIN}",
            f"log.dirs={self.data_dir / 'log'}",
            f"num.partitions={k.topic_partitions}",
            "offsets.topic.replication.factor=1",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            # Events are the record of what happened: keep them (a week by default).
            "log.retention.hours=168",
            "auto.create.topics.enable=false",
            "",
        ]
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines))
        os.chmod(self.config_path, 0o600)

    def command(self) -> list[str]:
        return self._java("kafka.Kafka", str(self.config_path))

    def listens(self) -> list[tuple[str, int]]:
        k = self.settings.kafka
        return [(k.host, k.port), (k.host, k.controller_port)]

    def health(self) -> Health:
        k = self.settings.kafka
        if not port_open(k.host, k.port):
            return Health(False, f"port {k.port} closed")
        from ctloop.bus import broker_ready

        ok, detail = broker_ready(self.settings)
        return Health(ok, detail)

    def after_start(self) -> None:
        """Topics, every service's SCRAM credential and the ACLs of the grants table."""
        from ctloop.bus import ensure_topics

        path = self.settings.kafka_credentials_file
        ensure_topics(self.settings)
        if not path.is_file():  # a broker an earlier release started: no SASL until restarted
            return
        passwords = read_credentials(path)
        apply_grants(self.settings, passwords)
        if admin_mechanism(path) != MECHANISM:  # migrated: SCRAM from now on
            write_credentials(path, passwords)

    def describe(self) -> str:
        return f"bootstrap {self.settings.kafka.bootstrap_servers}"


def _kafka_cluster_id() -> str:
    """16 random bytes, URL-safe base64 without padding, never starting with "-": the storage
    tool's argument parser would take such an id for an option (1 start in 64 failed so)."""
    import base64

    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


_LOG4J2_XML = """<Configuration status="WARN">
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Logger name="kafka" level="INFO"/>
    <Logger name="org.apache.kafka" level="WARN"/>
    <!-- "Failed authentication with /<address> (...)": every refused sign-in, in the log. -->
    <Logger name="org.apache.kafka.common.network.Selector" level="INFO"/>
    <Root level="WARN"><AppenderRef ref="STDOUT"/></Root>
  </Loggers>
</Configuration>
"""
