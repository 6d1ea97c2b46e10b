#!/usr/bin/env bash
# Installs what the third-party client suites need: a Python venv with pika,
# kombu and pytest under ~/.cache/synod/venv, and the Go modules of
# broker/tests/go. Idempotent; a no-op (under a second) when already cached.
# Builds nothing of Synod.
set -euo pipefail
cd "$(dirname "$0")/.."

cache=${SYNOD_CACHE:-$HOME/.cache/synod}
venv=$cache/venv
requirements=broker/tests/pika/requirements.txt
stamp=$venv/.requirements.sha256
mkdir -p "$cache"

want=$(sha256sum "$requirements" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "creating $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
    echo "$want" > "$stamp"
fi

if ! command -v go > /dev/null; then
    echo "go is not installed; the amqp091-go suite needs it (Go 1.22 or later)" >&2
    exit 1
fi
# Downloads only what go.sum names; the module cache makes repeats instant.
(cd broker/tests/go && go mod download && go vet ./... > /dev/null)
