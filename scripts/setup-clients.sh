#!/usr/bin/env bash
# Installs what the third-party client suites need: a Python venv with pika,
# kombu and pytest under ~/.cache/synod/venv, the Go modules of
# broker/tests/go, and the Maven artifacts of broker/tests/java under
# ~/.cache/synod/m2. Idempotent; takes about a second when already cached.
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

# The Java client suite: resolve its Maven dependencies and plugins once per
# pom.xml into the project's cache, so scripts/test-java.sh can run offline.
if ! command -v mvn > /dev/null; then
    echo "mvn is not installed; the Java client suite needs Maven and a JDK 17" >&2
    exit 1
fi
m2=$cache/m2
java_stamp=$m2/.synod-java-pom.sha256
want=$(sha256sum broker/tests/java/pom.xml | cut -d' ' -f1)
if [ "$(cat "$java_stamp" 2>/dev/null)" != "$want" ]; then
    (cd broker/tests/java && mvn -B -q -Dmaven.repo.local="$m2" -DskipTests test \
        dependency:resolve-plugins > /dev/null)
    echo "$want" > "$java_stamp"
fi
