#!/usr/bin/env bash
# The whole test gate, identical locally and in CI (.ci/run calls it):
#   cargo fmt --check, cargo clippy -D warnings, cargo nextest run --workspace,
#   then the remote-worker smoke (real processes) on SQLite, the cluster
#   conformance script (every matrix line; the Postgres smoke, plain and mTLS),
#   runtime certification (scripts/certify-runtime.sh: mock, docker,
#   gvisor and proot must PASS; kata and firecracker report what this host lacks),
#   and the chaos `ci` profile (chaos/: >= 100 faults, zero violations) on
#   SQLite and on per-replica Postgres,
# with a throwaway Postgres (initdb + pg_ctl in a temp dir, free loopback port,
# stopped on exit) unless STACYVM_POSTGRES_TEST_DSN is already set, and a
# throwaway dockerd (--bridge=none --iptables=false, runsc registered) with a
# busybox-static image, plus proot, for the runtime suite (scripts/lib/docker.sh).
# Under CI=true nothing is skipped: missing Postgres binaries and runtime
# packages are installed, and a Postgres or dockerd that cannot start fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/postgres.sh
source scripts/lib/postgres.sh
# shellcheck source=scripts/lib/docker.sh
source scripts/lib/docker.sh

started=$(date +%s)
declare -a results=()
cleanup() { pg_throwaway_stop; runtimes_stop; }
trap cleanup EXIT

step() {
  local name=$1; shift
  local t0=$(date +%s)
  echo "==> $name: $*" >&2
  if "$@"; then
    results+=("PASS $name ($(( $(date +%s) - t0 ))s)")
  else
    results+=("FAIL $name ($(( $(date +%s) - t0 ))s)")
    summary
    exit 1
  fi
}

summary() {
  echo >&2
  echo "==> summary ($(( $(date +%s) - started ))s)" >&2
  printf '    %s\n' "${results[@]}" >&2
}

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "cargo-nextest not found; installing it" >&2
  cargo install --locked cargo-nextest
fi

if [ -z "${STACYVM_POSTGRES_TEST_DSN:-}" ]; then
  if ! pg_throwaway_start; then
    if [ "${CI:-}" = "true" ]; then
      echo "FAIL: CI=true and no Postgres could be started" >&2
      exit 1
    fi
    echo "WARNING: no Postgres: the live Postgres cases will print SKIP" >&2
  fi
fi
[ -n "${STACYVM_POSTGRES_TEST_DSN:-}" ] && echo "live Postgres tests: enabled" >&2

# Real runtimes: dockerd (runc + runsc), proot, a busybox image and rootfs.
if ! runtimes_provision; then
  if [ "${CI:-}" = "true" ]; then
    echo "FAIL: CI=true and Docker/gVisor/PRoot could not be provisioned" >&2
    exit 1
  fi
  echo "WARNING: no Docker/PRoot: their runtime cases will print SKIP" >&2
fi

step fmt cargo fmt --all --check
step clippy cargo clippy --workspace --all-targets --locked -- -D warnings
step nextest cargo nextest run --workspace --locked
step smoke-sqlite env STACYVM_REMOTE_SMOKE_DATABASE_DRIVER=sqlite scripts/smoke-remote-worker.sh
# Every line of the cluster conformance matrix, including the Postgres-backed
# remote-worker smoke (plain and --mtls); Postgres lines are mandatory in CI.
step conformance scripts/ci-cluster-conformance.sh
# Runtime certification through a real cluster; reports kept under target/.
for rt in mock docker gvisor proot kata firecracker; do
  step "certify-$rt" scripts/certify-runtime.sh "$rt" --format markdown --output "target/certify-runtime/$rt.md"
done
# Chaos (chaos/): the `ci` profile against the built binary, >= 100 faults
# across every nemesis; report under $CARGO_TARGET_DIR/chaos/<seed>.
# STACYVM_CHAOS_SEED replays a seed (default: a new one, printed).
step chaos-build cargo build --locked -p stacyvm-node -p stacyvm-chaos --bins
step chaos "${CARGO_TARGET_DIR:-target}/debug/stacyvm-chaos" --profile ci ${STACYVM_CHAOS_SEED:+--seed "$STACYVM_CHAOS_SEED"}
# The same profile with each replica on its own Postgres database (created
# and dropped by the harness on the throwaway server); report under
# $CARGO_TARGET_DIR/chaos/<seed>-postgres. Mandatory under CI=true.
if [ -n "${STACYVM_POSTGRES_TEST_DSN:-}" ]; then
  step chaos-postgres "${CARGO_TARGET_DIR:-target}/debug/stacyvm-chaos" --profile ci --database postgres ${STACYVM_CHAOS_SEED:+--seed "$STACYVM_CHAOS_SEED"}
else
  echo "SKIP chaos-postgres: no Postgres (STACYVM_POSTGRES_TEST_DSN unset)" >&2
fi
summary
