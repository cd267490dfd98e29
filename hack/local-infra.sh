#!/usr/bin/env bash
# Builds the infrastructure stand-ins of hack/local-infra/Dockerfile and prints their image names,
# each tagged with its own content (image ID), so an unchanged stand-in keeps its tag and is not
# loaded or rolled again. For `make up LOCAL_INFRA=1` and the cluster tests.
# usage: hack/local-infra.sh            (needs docker and the base images in the Dockerfile)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
ctx=$(mktemp -d); trap 'rm -rf "$ctx"' EXIT
cp "$root/hack/local-infra/Dockerfile" "$root/tests/questdb_double.py" "$ctx/"
for component in nats redis s3 questdb; do
  repo=tradingstack-local/$component
  docker build --quiet --target "$component" -t "$repo:build" "$ctx" >/dev/null 2>&1 \
    || docker build --target "$component" -t "$repo:build" "$ctx" >&2
  tag=$(docker image inspect -f '{{.Id}}' "$repo:build" | sed 's/^sha256://' | cut -c1-12)
  docker tag "$repo:build" "$repo:$tag"
  echo "$repo:$tag"
done
