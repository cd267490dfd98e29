#!/usr/bin/env bash
# Deletes the kind cluster made by kind-up.sh (and with it every volume in it).
set -euo pipefail
CLUSTER=${CLUSTER:-tradingstack}
if ! command -v kind >/dev/null 2>&1; then
  echo "make down needs: kind (not found on PATH)" >&2
  exit 1
fi
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  kind delete cluster --name "$CLUSTER"
else
  echo "no kind cluster named $CLUSTER"
fi
