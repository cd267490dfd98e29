"""Generates the TradingStack CustomResourceDefinition from the pydantic models in api.py.

pydantic emits JSON Schema; Kubernetes wants a *structural* OpenAPI v3 schema: no $ref, no
anyOf for optionals (nullable instead), no titles, every object typed. The conversion below
is generic; what is specific to the API lives in api.py.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from tradingstack import api

CRD_FILE = "crds/tradingstack.io_tradingstacks.yaml"

# Keys of JSON Schema that a Kubernetes structural schema accepts as they are.
_KEPT_KEYS = {
    "description", "type", "format", "enum", "pattern", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems", "minProperties",
    "maxProperties", "required", "default", "nullable",
    "x-kubernetes-validations", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string",
}  # fmt: skip


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        target: dict[str, Any] = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        # Sibling keys (a field's own description) win over the referenced model's.
        target.update({k: v for k, v in node.items() if k != "$ref"})
        return target
    return node


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    node = _resolve(node, defs)
    nullable = False
    if "anyOf" in node:
        variants = [v for v in node["anyOf"] if v.get("type") != "null"]
        if len(variants) != 1:
            raise ValueError(f"cannot express a union in a structural schema: {node['anyOf']}")
        nullable = len(variants) < len(node["anyOf"])
        merged = _resolve(variants[0], defs)
        merged.update({k: v for k, v in node.items() if k != "anyOf"})
        node = merged
    if "const" in node:
        node["enum"] = [node.pop("const")]
    out: dict[str, Any] = {k: v for k, v in node.items() if k in _KEPT_KEYS}
    # JSON Schema 2020 writes exclusive bounds as numbers; OpenAPI v3.0 as a flag on the bound.
    for bound, flag in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if flag in out and not isinstance(out[flag], bool):
            out[bound] = out[flag]
            out[flag] = True
    if nullable:
        out["nullable"] = True
        if out.get("default", 0) is None:
            # An optional field's absence already means None; the API server need not store nulls.
            del out["default"]
    if out.get("type") == "object" or "properties" in node:
        out["type"] = "object"
        props = node.get("properties", {})
        if props:
            out["properties"] = {name: _structural(sub, defs) for name, sub in props.items()}
            required = set(node.get("required", []))
            for name, sub in out["properties"].items():
                # Default nested objects to {} so their own field defaults apply on the server; not one
                # the user must give, or with required fields of its own ({} would not be valid).
                if sub.get("type") == "object" and "properties" in sub and not sub.get("nullable"):
                    if "default" in sub or name in required or sub.get("required"):
                        continue
                    sub["default"] = {}
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            out["additionalProperties"] = _structural(extra, defs)
    if out.get("type") == "array":
        out["items"] = _structural(node["items"], defs)
    if isinstance(out.get("default"), list):
        # List defaults are applied by the operator, not frozen into stored objects.
        del out["default"]
    return out


def openapi_schema() -> dict[str, Any]:
    spec = api.TradingStackSpec.model_json_schema(by_alias=True, mode="validation")
    status = api.TradingStackStatus.model_json_schema(by_alias=True, mode="serialization")
    spec_schema = _structural(spec, spec.get("$defs", {}))
    spec_schema["default"] = {}
    return {
        "type": "object",
        "description": "A trading data platform: its services, streams, buckets and tables.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": _structural(status, status.get("$defs", {})),
        },
    }


def _condition_column(condition: str) -> dict[str, Any]:
    return {
        "name": condition,
        "type": "string",
        "jsonPath": f'.status.conditions[?(@.type=="{condition}")].status',
        "description": f"Status of the {condition} condition.",
    }


def crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "labels": {"app.kubernetes.io/name": "tradingstack", "app.kubernetes.io/part-of": "tradingstack"},
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": api.SHORT_NAMES,
                "categories": ["all", "tradingstack"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        _condition_column("Ready"),
                        {
                            "name": "Phase",
                            "type": "string",
                            "jsonPath": ".status.phase",
                            "description": "Summary of the conditions.",
                        },
                        {
                            "name": "Services",
                            "type": "string",
                            "jsonPath": ".status.servicesReady",
                            "description": "Ready services out of desired.",
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


HEADER = "# Generated from operator/tradingstack/api.py by `tradingstack crd`; do not edit.\n"


def crd_yaml() -> str:
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=120)


# The operator version whose model a CRD was generated from: an operator never replaces the CRD of
# a newer one (a rollback would otherwise prune the newer fields from every stored TradingStack).
VERSION_ANNOTATION = "tradingstack.io/operator-version"
CRD_PATH = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{api.PLURAL}.{api.GROUP}"


def operator_version() -> str:
    from importlib.metadata import version

    return version("tradingstack")


def ensure(kube: Any, ours: str | None = None) -> str:
    """Server-side apply this operator's CRD unless the cluster's is of a newer operator; what was done.

    `helm upgrade` never updates a chart's `crds/`, so without this new fields would be refused
    (or pruned) after an upgrade until someone applied the CRD by hand.
    """
    from packaging.version import InvalidVersion, Version

    from tradingstack.kubeclient import KubeApiError

    ours = ours or operator_version()
    try:
        live = kube.request("GET", CRD_PATH)
    except KubeApiError as exc:
        if exc.status != 404:
            raise
        live = None
    theirs = ((live or {}).get("metadata", {}).get("annotations") or {}).get(VERSION_ANNOTATION)
    try:
        if theirs is not None and Version(theirs) > Version(ours):
            return f"kept the CRD of operator {theirs}, newer than this one ({ours})"
    except InvalidVersion:
        pass  # not ours to judge: applied over
    body = crd()
    body["metadata"]["annotations"] = {VERSION_ANNOTATION: ours}
    kube.request("PATCH", CRD_PATH, body=body, query={"fieldManager": "tradingstack-operator", "force": "true"},
                 content_type="application/apply-patch+yaml")  # fmt: skip
    return f"applied the CRD of operator {ours}" + (f" over {theirs}'s" if theirs else "")
