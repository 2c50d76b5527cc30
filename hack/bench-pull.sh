#!/usr/bin/env bash
# Cold pull benchmark: modelcache-agent pull vs huggingface_hub, hf_transfer and curl, against
# the same local modelcache-hub, unthrottled and at 40 MB/s per connection. Prints a Markdown table
# of ratios and writes docs/bench/cold-pull.{json,svg}. Needs about 9 GiB free in /tmp.
# Flags pass through: hack/bench-pull.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
command -v curl >/dev/null || { apt-get update -qq && apt-get install -y -qq curl; }
. hack/lib.sh
require_cargo
trap give_back EXIT
python_env hack/requirements-bench.txt
cargo build --release --quiet -p modelcache-agent -p modelcache-hub --features modelcache-hub/faults
python3 hack/bench_pull.py "$@"
