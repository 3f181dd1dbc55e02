#!/usr/bin/env python3
"""Turns a CustomResourceDefinition's openAPIV3Schema into a JSON Schema for check-jsonschema.

    crd_schema.py CRD.yaml VERSION OUT.json

The API server prunes unknown fields, so the CRD's schema allows them; a linter should not
(a misspelt `minReplicaCount` would silently do nothing). Like kubeconform's strict mode, every
object schema that lists its properties gets `additionalProperties: false`, except the
free-form `metadata`. apiVersion and kind are pinned to the CRD's group/version and kind.
"""

import json
import sys

import yaml


def strict(node, path=()):
    if isinstance(node, dict):
        if (
            node.get("type") == "object"
            and "properties" in node
            and "additionalProperties" not in node
            and path[-1:] != ("metadata",)
        ):
            node["additionalProperties"] = False
        for key, child in node.items():
            strict(child, path + (key,))
    elif isinstance(node, list):
        for child in node:
            strict(child, path)
    return node


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    source, version, out = sys.argv[1:]
    crds = [d for d in yaml.safe_load_all(open(source, encoding="utf-8")) if d]
    if len(crds) != 1 or crds[0].get("kind") != "CustomResourceDefinition":
        print(f"{source}: expected one CustomResourceDefinition", file=sys.stderr)
        return 1
    spec = crds[0]["spec"]
    versions = {v["name"]: v for v in spec["versions"]}
    if version not in versions:
        print(f"{source}: no version {version} (has {', '.join(versions)})", file=sys.stderr)
        return 1
    schema = strict(versions[version]["schema"]["openAPIV3Schema"])
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    schema["properties"]["apiVersion"]["const"] = f"{spec['group']}/{version}"
    schema["properties"]["kind"]["const"] = spec["names"]["kind"]
    schema.setdefault("required", [])
    schema["required"] = sorted(set(schema["required"]) | {"apiVersion", "kind", "metadata"})
    with open(out, "w", encoding="utf-8") as f:
        json.dump(schema, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
