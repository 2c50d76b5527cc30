#!/usr/bin/env bash
# Benchmarks warm NodePublishVolume with a new token on every publish against a slow hub
# (300 ms per answer) and a stopped one: modelcache's freshness rules (revision kept per node,
# revalidated in the background) beside asking the hub on every publish, in one run; prints a
# Markdown table with p50/p99, ratios and the hub requests each way cost, and writes
# docs/bench/warm-publish-hub.svg. Needs root; takes about two minutes.
# Flags pass through: hack/bench-freshness.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "error: the benchmark mounts and needs root: sudo $0 $*" >&2
  exit 1
fi
. hack/lib.sh
run_release bench-freshness "$@"
