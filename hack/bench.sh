#!/usr/bin/env bash
# Benchmarks warm NodePublishVolume (p50/p99 over 1,000 publishes, small and 2 GiB models)
# against bare bind mounts and copies, in one run; prints a Markdown table and writes
# docs/bench/warm-publish.svg. Needs root and about 7 GiB of free disk in /tmp.
# Flags pass through: hack/bench.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "error: the benchmark mounts and needs root: sudo $0 $*" >&2
  exit 1
fi
. hack/lib.sh
run_release bench-publish "$@"
