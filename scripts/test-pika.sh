#!/usr/bin/env bash
# Runs the pika (and kombu) test suite against a synod-broker it starts from
# ${SYNOD_BROKER_BIN:-target/debug/synod-broker}, or against the broker named
# by AMQP_URL. Builds nothing; run scripts/setup-clients.sh first.
# Extra arguments go to pytest (e.g. -k topics).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${SYNOD_CACHE:-$HOME/.cache/synod}/venv
if [ ! -x "$venv/bin/pytest" ]; then
    echo "pytest is missing from $venv: run scripts/setup-clients.sh" >&2
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
cd broker/tests/pika
exec "$venv/bin/pytest" -p no:cacheprovider "$@"
