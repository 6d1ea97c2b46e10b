#!/usr/bin/env bash
# Runs the RabbitMQ Java client (com.rabbitmq:amqp-client) suite against a
# synod-broker it starts from ${SYNOD_BROKER_BIN:-target/debug/synod-broker},
# or against the broker named by AMQP_URL. Builds nothing of Synod; run
# scripts/setup-clients.sh first (it fills the Maven cache). Extra arguments
# go to Maven (e.g. -Dtest=TutorialsTest).
set -euo pipefail
cd "$(dirname "$0")/.."

m2=${SYNOD_CACHE:-$HOME/.cache/synod}/m2
if ! command -v mvn > /dev/null; then
    echo "mvn is not installed: the Java client suite needs Maven and a JDK 17" >&2
    exit 1
fi
if [ -z "${AMQP_URL:-}" ]; then
    bin=${SYNOD_BROKER_BIN:-target/debug/synod-broker}
    if [ ! -x "$bin" ]; then
        echo "broker binary $bin is missing: run 'cargo build -p synod-broker' or set SYNOD_BROKER_BIN" >&2
        exit 1
    fi
    SYNOD_BROKER_BIN=$(realpath "$bin")
    export SYNOD_BROKER_BIN
fi
cd broker/tests/java
exec mvn -B -Dmaven.repo.local="$m2" -Dstyle.color=never test "$@"
