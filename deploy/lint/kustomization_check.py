#!/usr/bin/env python3
"""Checks deploy/kubernetes/kustomization.yaml without kubectl: every resource it lists exists
and parses as Kubernetes objects, and every manifest in the folder is listed (except the
example Secret, the files applied on their own and the schemas), so a new file cannot be
forgotten. Components (sub-folders with a kustomization.yaml of kind Component, such as
podmonitor/) are checked the same way, listed in the root's `components:` or not.

Then what no schema can see, across files:

- the files applied on their own (migrate-job.yaml), which kustomize does not render, name the
  namespace of the kustomization and the image its `images:` gives the Deployment;
- the migrate Job's pod reads the same ConfigMap and Secret and has the same security context as
  the Deployment's, and no selector of the Service, PodDisruptionBudget, Deployment or PodMonitor
  takes it for a worker;
- the PodMonitor selects the Deployment's pods, scrapes a port the worker names, and names the
  job after a pod label whose value is the job that deploy/prometheus/alerts.yml selects.

    kustomization_check.py DIR
"""

import pathlib
import re
import sys

import yaml

# Manifests of DIR that kustomization.yaml must not list, and why.
APPLIED_ALONE = {
    "migrate-job.yaml": "run once before a rollout; an apply cannot change a Job's pod template",
}


def load(path, errors, name):
    """The objects of a manifest, each with apiVersion, kind and metadata.name."""
    objects = []
    try:
        docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    except yaml.YAMLError as error:
        errors.append(f"{name}: does not parse: {error}")
        return objects
    for doc in docs:
        if not doc:
            continue
        if not (doc.get("apiVersion") and doc.get("kind") and (doc.get("metadata") or {}).get("name")):
            errors.append(f"{name}: an object without apiVersion, kind or metadata.name")
            continue
        objects.append(doc)
    return objects


def check_folder(root, kustomization, name, errors, exempt=(), prefix=""):
    """Listed resources exist and parse; every manifest beside them is listed. Returns the objects."""
    listed = kustomization.get("resources") or []
    objects = []
    for resource in listed:
        path = root / resource
        if not path.is_file():
            errors.append(f"{name} lists {resource}, which does not exist")
            continue
        objects += load(path, errors, prefix + resource)
    for path in sorted(root.glob("*.yaml")):
        if (
            path.name not in listed
            and path.name != "kustomization.yaml"
            and not path.name.endswith(".example.yaml")
            and path.name not in exempt
        ):
            errors.append(f"{prefix}{path.name} is not listed in {name} resources")
    return objects


def pod_template(obj):
    return (obj.get("spec") or {}).get("template") or {}


def selects(selector, labels):
    """Whether a matchLabels-style selector (a Service's, or `matchLabels`) picks these labels."""
    selector = selector or {}
    if "matchLabels" in selector or "matchExpressions" in selector:
        if selector.get("matchExpressions"):
            return None  # not judged here
        selector = selector.get("matchLabels") or {}
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def alert_jobs(path):
    """The values of every job="…" matcher of the alert rules."""
    if not path.is_file():
        return set()
    return set(re.findall(r'\bjob\s*=\s*"([^"]*)"', path.read_text(encoding="utf-8")))


def main() -> int:
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "deploy/kubernetes")
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text(encoding="utf-8"))
    errors = []
    if kustomization.get("kind") != "Kustomization":
        errors.append("kustomization.yaml: kind is not Kustomization")
    namespace = kustomization.get("namespace")
    objects = check_folder(root, kustomization, "kustomization.yaml", errors, exempt=APPLIED_ALONE)
    listed = kustomization.get("resources") or []
    for name in APPLIED_ALONE:
        if name in listed:
            errors.append(f"kustomization.yaml lists {name}, which is applied on its own: {APPLIED_ALONE[name]}")

    # Components: every sub-folder with a kustomization.yaml, whether the root uses it or not.
    components = {}
    for path in sorted(root.glob("*/kustomization.yaml")):
        folder = path.parent
        component = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if component.get("kind") != "Component":
            errors.append(f"{folder.name}/kustomization.yaml: kind is not Component")
        components[folder.name] = check_folder(
            folder, component, f"{folder.name}/kustomization.yaml", errors, prefix=f"{folder.name}/"
        )
    for name in kustomization.get("components") or []:
        if name not in components:
            errors.append(f"kustomization.yaml lists the component {name}: no {name}/kustomization.yaml")

    alone = {}
    for name in APPLIED_ALONE:
        path = root / name
        if not path.is_file():
            errors.append(f"{name} does not exist")
            continue
        alone[name] = load(path, errors, name)
        for obj in alone[name]:
            if obj["metadata"].get("namespace") != namespace:
                errors.append(
                    f"{name}: {obj['kind']} {obj['metadata']['name']} is not in the namespace {namespace!r} "
                    "(kustomize does not render this file)"
                )

    everything = objects + [o for group in (*components.values(), *alone.values()) for o in group]
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    if len(deployments) != 1:
        errors.append(f"expected one Deployment among the resources, found {len(deployments)}")
    else:
        deployment = deployments[0]
        template = pod_template(deployment)
        pod_labels = (template.get("metadata") or {}).get("labels") or {}
        pod_spec = template.get("spec") or {}
        containers = pod_spec.get("containers") or []
        worker = containers[0] if containers else {}
        port_names = {p.get("name") for c in containers for p in c.get("ports") or [] if p.get("name")}

        # The image the kustomization gives the Deployment's container.
        image = None
        for entry in kustomization.get("images") or []:
            if entry.get("name") == worker.get("image"):
                new_name = entry.get("newName", entry["name"])
                if entry.get("digest"):
                    image = f"{new_name}@{entry['digest']}"
                else:
                    image = f"{new_name}:{entry.get('newTag', 'latest')}"
                if not entry.get("digest") and str(entry.get("newTag", "latest")) == "latest":
                    errors.append(
                        "kustomization.yaml: the image's tag is latest, which imagePullPolicy IfNotPresent "
                        "never pulls again: give a version or a digest"
                    )

        selectors = [
            (f"{o['kind']} {o['metadata']['name']}", (o.get("spec") or {}).get("selector"))
            for o in everything
            if o["kind"] in ("Service", "PodDisruptionBudget", "Deployment", "PodMonitor")
        ]
        for name, objs in alone.items():
            for job in (o for o in objs if o["kind"] == "Job"):
                job_template = pod_template(job)
                job_spec = job_template.get("spec") or {}
                job_containers = job_spec.get("containers") or []
                job_labels = (job_template.get("metadata") or {}).get("labels") or {}
                if image and any(c.get("image") != image for c in job_containers):
                    errors.append(
                        f"{name}: the image is not {image}, the one kustomization.yaml gives the Deployment"
                    )
                if job_spec.get("securityContext") != pod_spec.get("securityContext"):
                    errors.append(f"{name}: the pod's securityContext differs from the Deployment's")
                for container in job_containers:
                    for key in ("securityContext", "envFrom"):
                        if container.get(key) != worker.get(key):
                            errors.append(
                                f"{name}: container {container.get('name')}'s {key} differs from the Deployment's"
                            )
                for selector_name, selector in selectors:
                    if selects(selector, job_labels):
                        errors.append(
                            f"{name}: its pods are selected by the {selector_name} (give them labels of their own)"
                        )

        jobs = alert_jobs(root.parent / "prometheus" / "alerts.yml")
        if len(jobs) > 1:
            errors.append(f"deploy/prometheus/alerts.yml selects several jobs: {sorted(jobs)}")
        for monitor in (o for o in everything if o["kind"] == "PodMonitor"):
            spec = monitor.get("spec") or {}
            name = f"PodMonitor {monitor['metadata']['name']}"
            if not selects(spec.get("selector"), pod_labels):
                errors.append(f"{name}: its selector does not select the Deployment's pods")
            for endpoint in spec.get("podMetricsEndpoints") or []:
                if endpoint.get("port") not in port_names:
                    errors.append(
                        f"{name}: port {endpoint.get('port')!r} is not a named port of the worker ({sorted(port_names)})"
                    )
            job_label = spec.get("jobLabel")
            job = pod_labels.get(job_label) if job_label else f"{namespace}/{monitor['metadata']['name']}"
            if job_label and job is None:
                errors.append(f"{name}: jobLabel {job_label!r} is not a label of the Deployment's pods")
            elif jobs and job not in jobs:
                errors.append(
                    f"{name}: scrapes as job={job!r}, but deploy/prometheus/alerts.yml selects job={sorted(jobs)[0]!r}"
                )

    for error in errors:
        print(f"kustomization: {error}", file=sys.stderr)
    if not errors:
        print(
            f"kustomization: {len(listed)} resources, all present and listed; "
            f"{len(alone)} applied on their own and {len(components)} component(s) consistent with them"
        )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
