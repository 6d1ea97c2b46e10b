#!/usr/bin/env bash
# Checks the Helm chart and what ships with it: alert rules (promtool),
# dashboards (valid JSON, no hard-coded datasource), RBAC kept equal to the
# operator's, `helm lint --strict`, values.schema.json rejecting bad values,
# and the single-file install manifest free of drift.
# Needs helm (built by scripts/setup-k8s.sh) and promtool (Debian prometheus).
set -euo pipefail
cd "$(dirname "$0")/.."
chart=charts/synod
fail() { echo "test-chart: FAILED: $*" >&2; exit 1; }
passed=0

command -v promtool > /dev/null || fail "promtool is missing: install Debian's prometheus package (scripts/install-deps.sh)"
command -v helm > /dev/null || fail "helm is missing: run scripts/setup-k8s.sh"

promtool check rules "$chart/alerts/synod-rules.yaml" || fail "promtool check rules"
passed=$((passed + 1))

python3 - "$chart"/dashboards/*.json <<'PY' || fail "dashboards"
import json, sys
for path in sys.argv[1:]:
    board = json.load(open(path))
    assert board.get("uid") and board.get("title"), f"{path}: uid and title are required"
    names = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "namespace"} <= names, f"{path}: variables {names}"
    for panel in board["panels"]:
        uid = panel["datasource"]["uid"]
        assert uid == "${datasource}", f"{path}: panel {panel['title']!r} hard-codes datasource {uid!r}"
        assert panel["targets"], f"{path}: panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{path}: panel {panel['title']!r} has an empty query"
    print(f"{path}: {len(board['panels'])} panels ok")
PY
passed=$((passed + 1))

diff -u operator/rbac.yaml "$chart/files/operator-rules.yaml" \
    || fail "$chart/files/operator-rules.yaml differs from operator/rbac.yaml: copy it over"
passed=$((passed + 1))

helm lint --strict "$chart" || fail "helm lint --strict"
helm lint --strict "$chart" --set monitoring.podMonitor.enabled=true \
    --set monitoring.prometheusRule.enabled=true --set monitoring.dashboards.enabled=true \
    --set networkPolicy.enabled=true || fail "helm lint --strict with every option on"
passed=$((passed + 1))

if out=$(helm template synod "$chart" --set operator.logFormat=xml 2>&1); then
    fail "values.schema.json accepted operator.logFormat=xml"
fi
grep -q "logFormat" <<< "$out" || fail "schema error does not name the field: $out"
if helm template synod "$chart" --set operator.noSuchKey=1 > /dev/null 2>&1; then
    fail "values.schema.json accepted an unknown key"
fi
passed=$((passed + 1))

manifest=$(mktemp)
trap 'rm -f "$manifest"' EXIT
scripts/render-install-manifest.sh > "$manifest"
diff -u deploy/synod.yaml "$manifest" > /dev/null \
    || fail "deploy/synod.yaml is stale: run scripts/render-install-manifest.sh > deploy/synod.yaml"
passed=$((passed + 1))

echo "test-chart: $passed passed, 0 failed"
