#!/usr/bin/env bash
# Runs the Go client suite (amqp091-go and streadway/amqp) against a
# synod-broker it starts from ${SYNOD_BROKER_BIN:-target/debug/synod-broker},
# or against the broker named by AMQP_URL. Builds nothing of Synod; run
# scripts/setup-clients.sh first. Extra arguments go to go test (e.g. -run RPC).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v go > /dev/null; then
    echo "go is not installed: the Go client suite needs it" >&2
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
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cd broker/tests/go
status=0
go test -count=1 -timeout 5m -v "$@" ./... 2>&1 | tee "$log" || status=$?
# go test -v ends with "ok"/"FAIL" per package; add a count of top-level tests.
passed=$(grep -c '^--- PASS' "$log" || true)
failed=$(grep -c '^--- FAIL' "$log" || true)
skipped=$(grep -c '^--- SKIP' "$log" || true)
echo "amqp091-go: $passed passed, $failed failed, $skipped skipped"
exit "$status"
