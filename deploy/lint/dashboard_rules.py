#!/usr/bin/env python3
"""Turns every PromQL expression of Grafana dashboards into a Prometheus rules file, so that
`promtool check rules` parses them all (make lint).

    dashboard_rules.py OUT.yml DASHBOARD.json...

Grafana's variables are replaced by values a query could have: $__rate_interval and friends by
a duration, $job by a regex, $queue by the default queue name. A panel without a query, or a
query on another data source than the provisioned Prometheus, is an error.
"""

import json
import re
import sys

import yaml

SUBSTITUTIONS = [
    (r"\$__rate_interval|\$__interval|\$__range|\$\{__rate_interval\}", "5m"),
    (r"\$\{?job\}?", ".+"),
    (r"\$\{?queue\}?", "catchall.events"),
]
DATASOURCE_UID = "prometheus"


def panels(items):
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    out, sources = sys.argv[1], sys.argv[2:]
    rules, errors = [], []
    for source in sources:
        dashboard = json.load(open(source, encoding="utf-8"))
        for panel in panels(dashboard.get("panels", [])):
            if panel.get("type") == "row":
                continue
            title = panel.get("title", "?")
            targets = panel.get("targets") or []
            if not targets:
                errors.append(f"{source}: panel {title!r} has no query")
            for target in targets:
                uid = (target.get("datasource") or panel.get("datasource") or {}).get("uid")
                expr = (target.get("expr") or "").strip()
                if uid != DATASOURCE_UID:
                    errors.append(f"{source}: panel {title!r} uses data source {uid!r}")
                if not expr:
                    errors.append(f"{source}: panel {title!r} query {target.get('refId')} is empty")
                    continue
                for pattern, value in SUBSTITUTIONS:
                    expr = re.sub(pattern, value, expr)
                if "$" in expr:
                    errors.append(f"{source}: panel {title!r}: unknown variable in {expr!r}")
                suffix = re.sub(r"[^a-zA-Z0-9_]", "_", f"{panel.get('id')}_{target.get('refId')}")
                rules.append({"record": f"dashboard:panel_{suffix}", "expr": expr})
    for error in errors:
        print(f"dashboard: {error}", file=sys.stderr)
    with open(out, "w", encoding="utf-8") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard-expressions", "rules": rules}]}, f, sort_keys=False)
    print(f"dashboard: {len(rules)} expressions written to {out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
