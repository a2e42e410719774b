#!/usr/bin/env bash
# The project's test command (the README's second command; .ci/run calls it).
# Installs what the tests need, then: format check, clippy with warnings as errors, every test.
set -euo pipefail
cd "$(dirname "$0")/.."

# The tests need only the Rust toolchain today (the gRPC test service is written against
# tonic's runtime API, so no protoc). Later issues add their installs here (etcd, wrk, ...).
need() { command -v "$1" >/dev/null 2>&1; }
if ! need cargo; then
    echo "cargo is required (rustup toolchain)" >&2
    exit 1
fi

echo "== cargo fmt --check"
cargo fmt --all --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== one crypto provider: ring must not be in the graph"
# `cargo tree -i` exits 0 with "nothing to print" when ring is only an optional entry of the
# lock file (rustls-webpki lists it), so test what it prints, not its exit status.
ring_users="$(cargo tree --workspace --locked -e normal,build --target all -i ring 2>/dev/null || true)"
if [ -n "$ring_users" ]; then
    echo "$ring_users" >&2
    echo "ring is in the dependency graph; use the aws-lc-rs features" >&2
    exit 1
fi

echo "== cargo test"
cargo test --workspace --locked
