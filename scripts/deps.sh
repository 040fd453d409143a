#!/usr/bin/env bash
# Installs what building, running and testing Hive needs on Debian 12 (as root).
# Idempotent: packages already present are left as they are.
set -euo pipefail

apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if ((${#missing[@]})); then
    echo "deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -q
    apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}"
  fi
}

# gcc for crates that build C (ring, zstd); curl and jq for the scripts' checks.
apt_install build-essential pkg-config ca-certificates curl jq
# Containers: runc (the default OCI runtime), crun (the alternative), busybox-static (the test
# containers' userland).
apt_install runc crun busybox-static
# Images and the registry's tests and benchmarks: real clients, image building, the reference
# registry, load generators.
apt_install skopeo podman umoci docker-registry hey wrk
# Tenant networks: links, rules and shaping (iproute2, nftables' `nft`), and the network
# tests' and benchmarks' tools (iperf3, tcpdump, arping, iputils ping for DF pings).
apt_install iproute2 nftables iperf3 tcpdump arping iputils-ping
# HA control plane: etcd (the tested server) and protoc (the etcd client's build needs it,
# with the well-known types google/protobuf/*.proto, which Debian ships in libprotobuf-dev).
apt_install etcd-server protobuf-compiler libprotobuf-dev
# Fault tests: libfaketime (the `faketime` command and the LD_PRELOAD library it uses) runs a
# `hive server` with its clocks skewed and running at another rate (crates/hive/tests/ha.rs).
apt_install faketime

if ! command -v cargo >/dev/null 2>&1; then
  for d in "$HOME/.cargo/bin" /root/.cargo/bin /usr/local/cargo/bin; do
    [ -x "$d/cargo" ] && export PATH="$d:$PATH" && break
  done
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "deps: no Rust toolchain (cargo) found. Hive needs Rust >= 1.90 (edition 2024);" >&2
  echo "deps: Debian 12's own cargo is too old. Install one with rustup, then rerun." >&2
  exit 1
fi
need=1.90
have=$(rustc --version | awk '{print $2}')
if [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -1)" != "$need" ]; then
  echo "deps: rustc $have is older than $need; update the toolchain" >&2
  exit 1
fi
