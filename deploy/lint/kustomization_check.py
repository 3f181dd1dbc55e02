#!/usr/bin/env python3
"""Checks deploy/kubernetes/kustomization.yaml without kubectl: every resource it lists exists
and parses as Kubernetes objects, and every manifest in the folder is listed (except the
example Secret and the schemas), so a new file cannot be forgotten.

    kustomization_check.py DIR
"""

import pathlib
import sys

import yaml


def main() -> int:
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "deploy/kubernetes")
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text(encoding="utf-8"))
    errors = []
    if kustomization.get("kind") != "Kustomization":
        errors.append("kustomization.yaml: kind is not Kustomization")
    listed = kustomization.get("resources") or []
    for name in listed:
        path = root / name
        if not path.is_file():
            errors.append(f"kustomization.yaml lists {name}, which does not exist")
            continue
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc and not (doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name")):
                errors.append(f"{name}: an object without apiVersion, kind or metadata.name")
    for path in sorted(root.glob("*.yaml")):
        if path.name not in listed and path.name != "kustomization.yaml" and not path.name.endswith(".example.yaml"):
            errors.append(f"{path.name} is not listed in kustomization.yaml resources")
    for error in errors:
        print(f"kustomization: {error}", file=sys.stderr)
    if not errors:
        print(f"kustomization: {len(listed)} resources, all present and listed")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
