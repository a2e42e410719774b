#!/usr/bin/env bash
# The project's test command (the README's second command; .ci/run calls it).
# Installs what the tests need, then: format check, clippy with warnings as errors, every test.
set -euo pipefail
cd "$(dirname "$0")/.."

# The tests need the Rust toolchain and the tools installed below (the gRPC test service is
# written against tonic's runtime API; etcd-client's build script needs protoc).
need() { command -v "$1" >/dev/null 2>&1; }
if ! need cargo; then
    echo "cargo is required (rustup toolchain)" >&2
    exit 1
fi

# Installs Debian packages quietly (CI is a fresh Debian machine, as root); prints apt's
# output only when it fails.
apt_install() {
    if ! need apt-get; then
        echo "apt-get is unavailable: install $* with this system's package manager" >&2
        exit 1
    fi
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if ! need sudo; then
            echo "installing $* needs root (or sudo)" >&2
            exit 1
        fi
        sudo=(sudo)
    fi
    local log
    log="$(mktemp)"
    if ! { "${sudo[@]}" apt-get update -qq &&
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends "$@"; } >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "apt-get install $* failed" >&2
        exit 1
    fi
    rm -f "$log"
}

# mesh-proxy/tests/prometheus_e2e.rs runs a real Prometheus server against two sidecars. The
# test starts its own on a free port; the package's service (port 9090) is not used.
if ! need prometheus; then
    echo "== installing prometheus (Debian package)"
    apt_install prometheus
fi

# mesh-proxy/tests/capture_e2e.rs tests transparent capture for real: in a network namespace
# it creates (unshare, ip: util-linux and iproute2), `mesh-proxy iptables install` writes NAT
# rules with iptables, the proxy runs as UID 1337 (setpriv), and python3's http.server plays
# a host outside the mesh. Needs root, as CI runs.
missing=()
need iptables || missing+=(iptables)
need ip || missing+=(iproute2)
{ need unshare && need setpriv; } || missing+=(util-linux)
need python3 || missing+=(python3)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "== installing ${missing[*]} (Debian packages)"
    apt_install "${missing[@]}"
fi

# mesh-discovery and mesh-proxy/tests/etcd_e2e.rs start real etcd servers (Debian's
# etcd-server, 3.4, v3 API) on free loopback ports; etcd-client compiles etcd's protos with
# protoc (protobuf-compiler) and needs protobuf's well-known types (google/protobuf/*.proto,
# in libprotobuf-dev: only a Recommends of protobuf-compiler, which --no-install-recommends
# skips).
missing=()
need etcd || missing+=(etcd-server)
need protoc || missing+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || missing+=(libprotobuf-dev)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "== installing ${missing[*]} (Debian packages)"
    apt_install "${missing[@]}"
fi

echo "== cargo fmt --check"
cargo fmt --all --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

# Supply chain (deny.toml): permissive licenses only, one crypto provider (ring and OpenSSL
# banned), crates.io only. Advisories are left out: their database is on GitHub, which these
# machines cannot reach. cargo-deny is built from crates.io when missing (about 3 minutes).
if ! cargo deny --version >/dev/null 2>&1; then
    echo "== installing cargo-deny (crates.io)"
    cargo install cargo-deny --locked --version 0.20.2 --quiet
fi
echo "== cargo deny: licenses, bans, sources"
cargo fetch --locked --quiet # every target's crates, which cargo-deny reads offline
cargo deny --offline --locked check licenses bans sources

echo "== cargo test"
cargo test --workspace --locked
