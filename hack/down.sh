#!/usr/bin/env bash
# Undoes make up. kind: deletes the cluster (and every volume in it). CLUSTER=current: deletes the
# sample TradingStack while the operator still runs (so its finalizer applies the deletion
# policy), then uninstalls the release and deletes its namespace.
set -euo pipefail
CLUSTER=${CLUSTER:-tradingstack}
NAMESPACE=${NAMESPACE:-tradingstack-system}
RELEASE=${RELEASE:-tradingstack}
here=$(cd "$(dirname "$0")" && pwd)
if [[ $CLUSTER == current ]]; then
  helm=$("$here/ensure-helm.sh") || { echo "make down needs: helm" >&2; exit 1; }
  command -v kubectl >/dev/null 2>&1 || { echo "make down needs: kubectl (not found on PATH)" >&2; exit 1; }
  kubectl -n "$NAMESPACE" delete tradingstacks --all --wait --timeout=5m || true
  "$helm" uninstall "$RELEASE" -n "$NAMESPACE" --wait || true
  kubectl delete namespace "$NAMESPACE" --wait --timeout=5m --ignore-not-found
  exit 0
fi
if ! command -v kind >/dev/null 2>&1; then
  echo "make down needs: kind (not found on PATH)" >&2
  exit 1
fi
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  kind delete cluster --name "$CLUSTER"
else
  echo "no kind cluster named $CLUSTER"
fi
