#!/usr/bin/env python3
"""Renders manifests/install.yaml from the Helm chart, so `kubectl apply` and `helm install`
install the same thing. `--check` exits 1 when the checked-in file is stale.

    python hack/render_manifests.py            # rewrite manifests/install.yaml
    python hack/render_manifests.py --check    # CI: fail when it differs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "tradingstack"
OUTPUT = ROOT / "manifests" / "install.yaml"
RELEASE, NAMESPACE = "tradingstack", "tradingstack-system"
HEADER = (
    "# Generated from charts/tradingstack by hack/render_manifests.py (`make manifests`); do not edit.\n"
    f"# The chart's defaults, as release {RELEASE!r} in namespace {NAMESPACE!r}:\n"
    "#   kubectl apply --server-side -f manifests/install.yaml   (or: kubectl apply -k manifests/)\n"
)


def render() -> str:
    helm.disable_logging()  # it notes the CRD symlink on every load
    chart = helm.Chart.load(str(CHART))
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
    ]
    for crd in chart.crds:
        docs += [d for d in yaml.safe_load_all(crd["data"]) if d]
    rendered = chart.render(None, name=RELEASE, namespace=NAMESPACE, is_install=True)
    for path in sorted(rendered):
        if path.endswith("NOTES.txt") or "/templates/tests/" in path:
            continue
        docs += [d for d in yaml.safe_load_all(rendered[path]) if d]
    return HEADER + yaml.safe_dump_all(docs, sort_keys=False, width=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when manifests/install.yaml is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT.relative_to(ROOT)} is stale: run `make manifests`", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
