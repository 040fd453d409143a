#!/usr/bin/env bash
# Installs what is needed, then runs every check CI runs: formatting, clippy, all tests.
# Run as root on Debian 12 (integration tests start real processes).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh

export CARGO_TERM_COLOR=never
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# What the host holds that tests could leave behind: mounts, links, network namespaces,
# nftables tables, cgroups, processes of the runtimes and supervisors.
host_state() {
  {
    awk '{print "mount " $5}' /proc/self/mountinfo
    ip -o link show | awk -F': ' '{sub(/@.*/, "", $2); print "link " $2}'
    ls /run/netns 2>/dev/null | sed 's/^/netns /'
    nft list tables 2>/dev/null | sed 's/^/nft /'
    find /sys/fs/cgroup -mindepth 2 -maxdepth 4 -type d 2>/dev/null | sed 's/^/cgroup /'
    ps -eo pid=,comm= | awk '$2 ~ /^(hive|crun|runc|iperf3)/ {print "process " $1 " " $2}'
  } | sort
}

echo "== tests"
before=$(host_state)
rc=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast || rc=$?
else
  cargo test --workspace --locked --no-fail-fast || rc=$?
fi
echo "== nothing left behind"
# (A namespace's devices and a container's cgroups go a moment after their owner: the
# kernel tears a network namespace down in the background.)
for _ in $(seq 20); do
  left=$(comm -13 <(echo "$before") <(host_state))
  [ -z "$left" ] && break
  sleep 0.5
done
if [ -n "$left" ]; then
  echo "the tests left these behind:"
  echo "$left"
  exit 1
fi
echo "ok"
exit "$rc"
