#!/usr/bin/env bash
# Brings the whole platform up and waits until the sample TradingStack is Ready:
#   cluster -> image build (content-derived tag) -> image load -> helm upgrade --install (operator,
#   in-release NATS, Redis, S3, QuestDB, sample TradingStack) -> kubectl wait --for=condition=Ready.
# Settings (environment):
#   CLUSTER      kind cluster name (tradingstack), or "current": the cluster of the current kubeconfig
#   IMAGE_LOAD   command that makes a local image available to the cluster, run with the image name
#                appended (kind: "kind load docker-image --name CLUSTER"; current: required, e.g.
#                "../shared/cluster/cluster-load /tmp/k8s" or a script that pushes to your registry)
#   LOCAL_INFRA  1: build the infrastructure stand-ins of hack/local-infra (Debian NATS and Redis,
#                moto S3, the QuestDB double) instead of pulling NATS, Valkey, MinIO and QuestDB
#   NAMESPACE (tradingstack-system), RELEASE (tradingstack), IMAGE_REPO (tradingstack),
#   TIMEOUT (15m), HELM_ARGS (extra helm arguments)
# Re-running it after a code change builds a new tag and rolls every pod onto it.
set -euo pipefail

CLUSTER=${CLUSTER:-tradingstack}
NAMESPACE=${NAMESPACE:-tradingstack-system}
RELEASE=${RELEASE:-tradingstack}
IMAGE_REPO=${IMAGE_REPO:-tradingstack}
TIMEOUT=${TIMEOUT:-15m}
LOCAL_INFRA=${LOCAL_INFRA:-0}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)

needed=(docker helm kubectl)
[[ $CLUSTER == current ]] || needed+=(kind)
missing=()
for tool in "${needed[@]}"; do
  if [[ $tool == helm ]]; then
    helm=$("$here/ensure-helm.sh" 2>/dev/null) || missing+=(helm)
  else
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  fi
done
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "make up needs: ${missing[*]} (not found on PATH)." >&2
  echo "  docker: https://docs.docker.com/engine/install/   kind: https://kind.sigs.k8s.io/docs/user/quick-start/" >&2
  echo "  helm:   https://helm.sh/docs/intro/install/        kubectl: https://kubernetes.io/docs/tasks/tools/" >&2
  echo "  (or CLUSTER=current IMAGE_LOAD='...' to use the cluster of your kubeconfig instead of kind)" >&2
  exit 1
fi
if ! docker info >/dev/null 2>&1; then
  echo "make up: docker is installed but the Docker daemon is not reachable (is it running? may you use it?)" >&2
  exit 1
fi

if [[ $CLUSTER == current ]]; then
  if [[ -z ${IMAGE_LOAD:-} ]]; then
    echo "make up: CLUSTER=current needs IMAGE_LOAD, the command that gives the cluster a local image" >&2
    echo "  e.g. IMAGE_LOAD='kind load docker-image --name NAME' or IMAGE_LOAD='../shared/cluster/cluster-load DIR'" >&2
    exit 1
  fi
  if ! kubectl version >/dev/null 2>&1; then
    echo "make up: the current kubeconfig's cluster does not answer (kubectl version failed)" >&2
    exit 1
  fi
  kube=(kubectl)
  helm_kube=()
  where="the cluster of $(kubectl config current-context 2>/dev/null || echo "${KUBECONFIG:-the kubeconfig}")"
else
  if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    echo "==> kind cluster $CLUSTER exists"
  else
    echo "==> creating kind cluster $CLUSTER"
    kind create cluster --name "$CLUSTER" --wait 120s
  fi
  IMAGE_LOAD=${IMAGE_LOAD:-kind load docker-image --name $CLUSTER}
  kube=(kubectl --context "kind-$CLUSTER")
  helm_kube=(--kube-context "kind-$CLUSTER")
  where="kind cluster $CLUSTER"
fi
read -r -a load <<<"$IMAGE_LOAD"

echo "==> building the image"
docker build -q -t "$IMAGE_REPO:build" "$root" >/dev/null
# A tag derived from the image's content: a changed image gets a new tag, so helm rolls the pods.
tag=$(docker image inspect -f '{{.Id}}' "$IMAGE_REPO:build" | sed 's/^sha256://' | cut -c1-12)
image=$IMAGE_REPO:$tag
docker tag "$IMAGE_REPO:build" "$image"
images=("$image")
values=(--set image.registry= --set image.repository="$IMAGE_REPO" --set image.tag="$tag"
        --set image.pullPolicy=IfNotPresent)
if [[ $LOCAL_INFRA == 1 ]]; then
  echo "==> building the infrastructure stand-ins (hack/local-infra)"
  mapfile -t infra < <("$here/local-infra.sh")
  [[ ${#infra[@]} -eq 4 ]] || { echo "make up: building the infrastructure stand-ins failed (hack/local-infra.sh)" >&2; exit 1; }
  values+=(-f "$here/values-local-infra.yaml")
  for ref in "${infra[@]}"; do
    component=${ref#*/}; component=${component%%:*}
    values+=(--set "$component.image.repository=${ref%:*}" --set "$component.image.tag=${ref##*:}")
    images+=("$ref")
  done
else
  values+=(--set nats.enabled=true --set redis.enabled=true --set s3.enabled=true --set questdb.enabled=true)
fi
for ref in "${images[@]}"; do
  echo "==> loading $ref: ${load[*]} $ref"
  "${load[@]}" "$ref"
done

echo "==> helm upgrade --install $RELEASE into $NAMESPACE ($where)"
# shellcheck disable=SC2086 # HELM_ARGS is a list of words on purpose
"$helm" upgrade --install "$RELEASE" "$root/charts/tradingstack" "${helm_kube[@]}" \
  --namespace "$NAMESPACE" --create-namespace "${values[@]}" \
  --set sample.enabled=true --set sample.name=demo ${HELM_ARGS:-} \
  --wait --timeout "$TIMEOUT"

echo "==> waiting for tradingstack/demo to be Ready (timeout $TIMEOUT)"
# The operator may not have seen a changed spec yet: wait for it to report this generation.
generation=$("${kube[@]}" -n "$NAMESPACE" get tradingstack demo -o jsonpath='{.metadata.generation}')
"${kube[@]}" -n "$NAMESPACE" wait --for=jsonpath='{.status.observedGeneration}'="$generation" \
  tradingstack/demo --timeout="$TIMEOUT" >/dev/null 2>&1 || true
if ! "${kube[@]}" -n "$NAMESPACE" wait --for=condition=Ready tradingstack/demo --timeout="$TIMEOUT"; then
  echo "tradingstack/demo is not Ready. Its conditions and events:" >&2
  "${kube[@]}" -n "$NAMESPACE" describe tradingstack demo >&2 || true
  exit 1
fi
"${kube[@]}" -n "$NAMESPACE" rollout status deployment -l app.kubernetes.io/instance=demo --timeout="$TIMEOUT" >/dev/null
"${kube[@]}" -n "$NAMESPACE" get tradingstack demo

cat <<MSG

tradingstack is up on $where, image $image.
  ${kube[*]} -n $NAMESPACE get tstack,deploy,sts,svc
  ${kube[*]} -n $NAMESPACE describe tstack demo
  ${kube[*]} -n $NAMESPACE logs deploy/$RELEASE-operator
  ${kube[*]} -n $NAMESPACE port-forward svc/demo-gateway 8080:8080   # then http://127.0.0.1:8080/tickers
  $helm test $RELEASE ${helm_kube[*]} -n $NAMESPACE
Tear down with: make down$( [[ $CLUSTER == current ]] && echo " CLUSTER=current")
MSG
