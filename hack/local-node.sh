#!/usr/bin/env bash
# Runs a modelcache node on this machine, no cluster needed: an embedded hub serving a generated
# demo model, the node agent and the CSI plugin, then publishes the model read-only into a
# kubelet-style directory (cold, then warm) and prints what was mounted. Needs root for mounts.
# Flags pass through to the local-node program (--help lists them):
#   --keep              leave the volume mounted until Ctrl-C
#   --model-dir DIR --model ORG/NAME   serve your own files
#   --endpoint URL --model ORG/NAME    use a real hub (needs network)
#   --workdir DIR       where the store, sockets, logs and mounts go (/tmp/modelcache-local)
set -euo pipefail
cd "$(dirname "$0")/.."
built=target/release/local-node
# --help and --version need neither root nor a build.
for arg in "$@"; do
  case $arg in
    -h | --help | -V | --version)
      if [ -x "$built" ]; then
        exec "$built" "$arg"
      fi
      if [ "$arg" = -V ] || [ "$arg" = --version ]; then
        echo "local-node $(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
      else
        sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
        echo "(every flag: $built --help, once built)"
      fi
      exit 0
      ;;
  esac
done
if [ "$(id -u)" != 0 ]; then
  echo "error: bind mounts need root: sudo $0 $*" >&2
  exit 1
fi
. hack/lib.sh
run_release local-node "$@"
