#!/bin/sh
# java with Kafka's jars, heap from KAFKA_HEAP_OPTS, logs to stdout (log4j2.xml beside this script).
set -eu
here=$(dirname "$0")
main=$1; shift
# shellcheck disable=SC2086  # KAFKA_HEAP_OPTS holds several options
exec java ${KAFKA_HEAP_OPTS:--Xms256m -Xmx256m} -XX:+UseG1GC -Djava.awt.headless=true \
  -Dlog4j2.configurationFile="$here/log4j2.xml" -cp "/opt/kafka/libs/*" "$main" "$@"
