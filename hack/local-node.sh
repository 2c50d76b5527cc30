#!/usr/bin/env bash
# Runs a modelcache node on this machine, no cluster needed: an embedded hub serving a generated
# demo model, the node agent and the CSI plugin, then publishes the model read-only into a
# kubelet-style directory (cold, then warm) and prints what was mounted. Needs root for mounts.
# Flags pass through to the local-node program: hack/local-node.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "error: bind mounts need root: sudo $0 $*" >&2
  exit 1
fi
. hack/lib.sh
require_cargo
echo "==> building (release; the first build takes several minutes)" >&2
cargo build --release --workspace --bins
give_back
exec target/release/local-node "$@"
