#!/usr/bin/env bash
# Unit tests of the benchmark harness (PerfTest output parsing, ratios,
# targets, process sampling, the S7 cluster plan and AMQP client, the S4
# residence reader). The benchmark itself runs with bench/run.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 bench/test_run.py
