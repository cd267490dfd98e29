#!/usr/bin/env bash
# Builds the infrastructure stand-ins of hack/local-infra/Dockerfile and prints their image names
# (tag derived from their inputs), for `make up LOCAL_INFRA=1` and the cluster tests.
# usage: hack/local-infra.sh            (needs docker and the base images in the Dockerfile)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
ctx=$(mktemp -d); trap 'rm -rf "$ctx"' EXIT
cp "$root/hack/local-infra/Dockerfile" "$root/tests/questdb_double.py" "$ctx/"
tag=$(cat "$ctx/Dockerfile" "$ctx/questdb_double.py" | sha256sum | cut -c1-12)
for component in nats redis s3 questdb; do
  image=tradingstack-local/$component:$tag
  if ! docker image inspect "$image" >/dev/null 2>&1; then
    docker build --quiet --target "$component" -t "$image" "$ctx" >/dev/null
  fi
  echo "$image"
done
