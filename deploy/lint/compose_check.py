#!/usr/bin/env python3
"""What the Compose schema cannot say about compose.yaml (make lint):

- every published port is bound to 127.0.0.1 (Docker's published ports bypass the host
  firewall, so "5432:5432" would expose the database to the network);
- no service trusts connections without a password (POSTGRES_HOST_AUTH_METHOD=trust);
- passwords, secrets and tokens come from the env file (`${VAR}`), never literals.

    compose_check.py compose.yaml
"""

import re
import sys

import yaml

SECRET_KEY = re.compile(r"PASSWORD|PASS$|SECRET|TOKEN", re.IGNORECASE)
URL_WITH_PASSWORD = re.compile(r"://[^/:@\s]+:([^@\s]+)@")


def main() -> int:
    path = sys.argv[1] if len(sys.argv) > 1 else "compose.yaml"
    compose = yaml.safe_load(open(path, encoding="utf-8"))
    errors = []
    for name, service in (compose.get("services") or {}).items():
        for port in service.get("ports") or []:
            if isinstance(port, dict):
                if port.get("published") is not None and port.get("host_ip") != "127.0.0.1":
                    errors.append(f"{name}: port {port} is not bound to 127.0.0.1")
            elif not str(port).startswith("127.0.0.1:"):
                errors.append(f"{name}: port {port!r} is not bound to 127.0.0.1 (write \"127.0.0.1:{port}\")")
        environment = service.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) if "=" in item else (item, "") for item in environment)
        for key, value in environment.items():
            value = "" if value is None else str(value)
            if key == "POSTGRES_HOST_AUTH_METHOD" and value.strip().lower() == "trust":
                errors.append(f"{name}: POSTGRES_HOST_AUTH_METHOD=trust lets anyone who reaches the port in")
            if SECRET_KEY.search(key) and value and not value.startswith("${"):
                errors.append(f"{name}: {key} is a literal; take it from the env file (${{...}})")
            match = URL_WITH_PASSWORD.search(value)
            if match and not match.group(1).startswith("${"):
                errors.append(f"{name}: {key} holds a literal password; take it from the env file")
    for error in errors:
        print(f"compose: {error}", file=sys.stderr)
    if not errors:
        print(f"compose: {path}: ports on 127.0.0.1, no trust auth, secrets from the env file")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
