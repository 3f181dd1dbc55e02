#!/usr/bin/env bash
# The unit tests of the patched crates in vendor/ (upstream's and those of our patches,
# vendor/README.md), each in a copy of the crate: a path crate is no member of our workspace,
# and cargo runs no tests of a [patch] dependency. The copy gets an empty [workspace] and our
# Cargo.lock, so it builds the versions we ship. tokio-postgres's patches are tested by
# tests/it (store, refusals).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${CARGO_TARGET_DIR:-$root/target}/vendor-test
mkdir -p "$work"
for crate in amq-protocol-types lapin; do
	rm -rf "${work:?}/$crate"
	cp -r "$root/vendor/$crate" "$work/$crate"
	printf '\n[workspace]\n' >>"$work/$crate/Cargo.toml"
	cp "$root/Cargo.lock" "$work/$crate/Cargo.lock"
	echo "vendor-test: $crate"
	(cd "$work/$crate" && CARGO_TARGET_DIR="$work/target" cargo test --lib --quiet)
done
