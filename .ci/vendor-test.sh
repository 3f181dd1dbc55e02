#!/usr/bin/env bash
# The unit tests of the patched crates in vendor/ (upstream's and those of our patches,
# vendor/README.md), each in a copy of the crate: a path crate is no member of our workspace,
# and cargo runs no tests of a [patch] dependency. The copy gets an empty [workspace], our
# [patch] of amq-protocol-types (lapin builds on it), our Cargo.lock, and lapin the features we
# ship (ring, not aws-lc). tokio-postgres's patches are tested by tests/it (store, refusals).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cargo=${CARGO:-cargo}
mkdir -p "${CARGO_TARGET_DIR:-$root/target}/vendor-test"
work=$(cd "${CARGO_TARGET_DIR:-$root/target}/vendor-test" && pwd)
test_copy() {
	local crate=$1
	shift
	rm -rf "${work:?}/$crate"
	cp -r "$root/vendor/$crate" "$work/$crate"
	printf '\n[workspace]\n' >>"$work/$crate/Cargo.toml"
	if [ "$crate" != amq-protocol-types ]; then
		printf '\n[patch.crates-io]\namq-protocol-types = { path = "%s" }\n' \
			"$root/vendor/amq-protocol-types" >>"$work/$crate/Cargo.toml"
	fi
	cp "$root/Cargo.lock" "$work/$crate/Cargo.lock"
	echo "vendor-test: $crate"
	(cd "$work/$crate" && CARGO_TARGET_DIR="$work/target" "$cargo" test --lib --quiet "$@")
}
test_copy amq-protocol-types
test_copy lapin --no-default-features --features default-runtime,rustls-native-certs,rustls--ring
