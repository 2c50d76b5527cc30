#!/usr/bin/env bash
# Shared-cache import benchmark: modelcache-agent pull --sources shared-cache vs cp of the same files on
# the same disk, with the source in the page cache and cold. Prints a Markdown table of ratios
# and writes docs/bench/pvc-import.{json,svg}. Needs root (drops the page cache) and about
# 7 GiB free in /tmp. Flags pass through: hack/bench-import.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
. hack/lib.sh
require_cargo
trap give_back EXIT
python_env hack/requirements-bench.txt
cargo build --release --quiet -p modelcache-agent -p modelcache-hub --features modelcache-hub/faults
python3 hack/bench_import.py "$@"
