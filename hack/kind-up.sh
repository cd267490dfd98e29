#!/usr/bin/env bash
# Brings the whole platform up on a local kind cluster:
#   kind cluster -> image build -> kind load -> helm install (operator + NATS, Valkey, MinIO,
#   QuestDB + sample TradingStack) -> kubectl wait --for=condition=Ready.
# Settings (environment): CLUSTER (tradingstack), NAMESPACE (tradingstack-system),
# IMAGE (tradingstack:dev), TIMEOUT (15m).
set -euo pipefail

CLUSTER=${CLUSTER:-tradingstack}
NAMESPACE=${NAMESPACE:-tradingstack-system}
IMAGE=${IMAGE:-tradingstack:dev}
TIMEOUT=${TIMEOUT:-15m}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)

missing=()
for tool in docker kind helm kubectl; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "make up needs: ${missing[*]} (not found on PATH)." >&2
  echo "  docker: https://docs.docker.com/engine/install/   kind: https://kind.sigs.k8s.io/docs/user/quick-start/" >&2
  echo "  helm:   https://helm.sh/docs/intro/install/        kubectl: https://kubernetes.io/docs/tasks/tools/" >&2
  exit 1
fi
if ! docker info >/dev/null 2>&1; then
  echo "make up: docker is installed but the Docker daemon is not reachable (is it running? may you use it?)" >&2
  exit 1
fi

if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  echo "==> kind cluster $CLUSTER exists"
else
  echo "==> creating kind cluster $CLUSTER"
  kind create cluster --name "$CLUSTER" --wait 120s
fi
context="kind-$CLUSTER"

echo "==> building $IMAGE"
docker build -t "$IMAGE" "$root"
echo "==> loading $IMAGE into $CLUSTER"
kind load docker-image "$IMAGE" --name "$CLUSTER"

repository=${IMAGE%:*}
tag=${IMAGE##*:}
echo "==> helm install tradingstack into $NAMESPACE"
helm upgrade --install tradingstack "$root/charts/tradingstack" \
  --kube-context "$context" --namespace "$NAMESPACE" --create-namespace \
  --set image.registry= --set image.repository="$repository" --set image.tag="$tag" \
  --set image.pullPolicy=Never \
  --set nats.enabled=true --set redis.enabled=true --set s3.enabled=true --set questdb.enabled=true \
  --set sample.enabled=true --set sample.name=demo \
  --wait --timeout "$TIMEOUT"

echo "==> waiting for tradingstack/demo to be Ready (timeout $TIMEOUT)"
if ! kubectl --context "$context" -n "$NAMESPACE" wait --for=condition=Ready tradingstack/demo --timeout="$TIMEOUT"; then
  echo "tradingstack/demo is not Ready. Its conditions and events:" >&2
  kubectl --context "$context" -n "$NAMESPACE" describe tradingstack demo >&2 || true
  exit 1
fi

cat <<MSG

tradingstack is up on kind cluster $CLUSTER.
  kubectl --context $context -n $NAMESPACE get tstack,deploy,sts,svc
  kubectl --context $context -n $NAMESPACE describe tstack demo
  kubectl --context $context -n $NAMESPACE logs deploy/tradingstack-operator
  helm test tradingstack --kube-context $context -n $NAMESPACE
Tear down with: make down
MSG
