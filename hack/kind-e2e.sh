#!/usr/bin/env bash
# End to end on a real (kind) cluster, for people with Docker: creates a kind cluster, builds the
# image and loads it, installs the chart, then checks that a pod with an inline volume and a pod
# with a PVC from a StorageClass both read the model, read-only, and that the Node got its
# readiness label. Needs docker, kind, kubectl and helm, and network access to the Hugging Face
# Hub (or --endpoint to a mirror). It cannot run in this repository's CI (no container engine).
#
#   hack/kind-e2e.sh [--model ORG/NAME] [--endpoint URL] [--keep] [--cluster NAME]
set -euo pipefail
cd "$(dirname "$0")/.."

model=sentence-transformers/all-MiniLM-L6-v2
endpoint=https://huggingface.co
cluster=modelcache-e2e
keep=false
image=ghcr.io/modelcache/modelcache:e2e
ns=modelcache

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model=$2; shift 2 ;;
    --endpoint) endpoint=$2; shift 2 ;;
    --cluster) cluster=$2; shift 2 ;;
    --keep) keep=true; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "error: $tool is not installed; this script needs docker, kind, kubectl and helm" >&2; exit 1; }
done

step() { printf '\n==> %s\n' "$*"; }
on_exit() {
  status=$?
  if [ "$status" != 0 ]; then
    echo "--- failed; what the cluster says:" >&2
    kubectl -n "$ns" get pods -o wide >&2 || true
    kubectl -n "$ns" logs daemonset/modelcache-node -c agent --tail=50 >&2 || true
    kubectl -n "$ns" logs daemonset/modelcache-node -c plugin --tail=50 >&2 || true
    kubectl -n e2e describe pods >&2 || true
  fi
  if [ "$keep" = true ]; then
    echo "kept: kind cluster $cluster (kind delete cluster --name $cluster)"
  else
    kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
  fi
  exit "$status"
}
trap on_exit EXIT

step "kind cluster $cluster"
kind get clusters | grep -qx "$cluster" || kind create cluster --name "$cluster" --wait 120s

step "build and load $image"
docker build -t "$image" .
kind load docker-image --name "$cluster" "$image"

step "helm install (release modelcache, namespace $ns)"
helm upgrade --install modelcache deploy/helm/modelcache --namespace "$ns" --create-namespace \
  --set image.repository="${image%:*}" --set image.tag="${image##*:}" --set image.pullPolicy=Never \
  --set hub.endpoint="$endpoint" \
  --set-json "storageClasses=[{\"name\":\"e2e-model\",\"parameters\":{\"model\":\"$model\"}}]" \
  --wait --timeout 5m
kubectl -n "$ns" rollout status daemonset/modelcache-node --timeout=3m
kubectl -n "$ns" rollout status deployment/modelcache-controller --timeout=3m

step "a pod with an inline volume, and a pod with a PVC, read $model"
kubectl create namespace e2e --dry-run=client -o yaml | kubectl apply -f -
# A pod that lists the model, reads a file, and fails unless writing into the volume fails.
reader_pod() { # name, the volume's source (YAML, indented 6)
  cat <<EOF
---
apiVersion: v1
kind: Pod
metadata: { name: $1 }
spec:
  containers:
    - name: reader
      image: busybox:1.36
      command: [sh, -c, "ls -l /model && cat /model/config.json >/dev/null && ! touch /model/x && sleep 3600"]
      volumeMounts: [{ name: model, mountPath: /model, readOnly: true }]
  volumes:
    - name: model
$2
EOF
}
{
  reader_pod inline "      csi: { driver: csi.modelcache.dev, readOnly: true, volumeAttributes: { model: \"$model\" } }"
  cat <<EOF
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: { name: model }
spec:
  storageClassName: e2e-model
  accessModes: [ReadOnlyMany]
  resources: { requests: { storage: 1Mi } }
EOF
  reader_pod claimed "      persistentVolumeClaim: { claimName: model, readOnly: true }"
} | kubectl -n e2e apply -f -
kubectl -n e2e wait --for=condition=Ready pod/inline pod/claimed --timeout=10m

step "what the pods see"
for pod in inline claimed; do
  echo "--- $pod"
  kubectl -n e2e exec "$pod" -- ls -l /model
  if kubectl -n e2e exec "$pod" -- touch /model/written 2>/dev/null; then
    echo "error: $pod could write into its model volume" >&2
    exit 1
  fi
done
kubectl -n e2e get events --field-selector reason=ModelReady

step "the node's readiness label"
label="models.modelcache.dev/${model/\//--}"
node=$(kubectl -n e2e get pod inline -o jsonpath='{.spec.nodeName}')
value=
for _ in $(seq 30); do
  # The labels as one JSON object; the value is the 12-hex commit.
  value=$(kubectl get node "$node" -o 'jsonpath={.metadata.labels}' \
    | grep -o "\"$label\":\"[0-9a-f]*\"" | cut -d'"' -f4 || true)
  [ -n "$value" ] && break
  sleep 1
done
[ -n "$value" ] || { echo "error: node $node has no label $label" >&2; exit 1; }
echo "$node: $label=$value"

step "passed"
