"""The Kafka server of the embedded stack: a single-node KRaft broker and controller."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

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
        k = self.settings.kafka
        log_dir = self.data_dir / "log"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.bootstrap.servers={k.host}:{k.controller_port}",
                    f"listeners=PLAINTEXT://{k.host}:{k.port},CONTROLLER://{k.host}:{k.controller_port}",
                    f"advertised.listeners=PLAINTEXT://{k.host}:{k.port}",
                    "controller.listener.names=CONTROLLER",
                    "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                    "inter.broker.listener.name=PLAINTEXT",
                    f"log.dirs={log_dir}",
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
            )
        )
        (self.data_dir / "log4j2.xml").write_text(_LOG4J2_XML)
        if (log_dir / "meta.properties").exists():
            return
        cluster_id = _kafka_cluster_id()
        result = subprocess.run(
            self._java(
                "kafka.tools.StorageTool",
                "format",
                "--standalone",
                "-t",
                cluster_id,
                "-c",
                str(self.config_path),
            ),
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise StackError(f"formatting Kafka storage failed:\n{result.stdout}{result.stderr}")

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
        from ctloop.bus import ensure_topics

        ensure_topics(self.settings)

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
    <Root level="WARN"><AppenderRef ref="STDOUT"/></Root>
  </Loggers>
</Configuration>
"""
