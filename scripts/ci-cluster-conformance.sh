#!/usr/bin/env bash
# Cluster conformance: one named check per line of the conformance matrix's
# "CI Coverage" list (../shared/spec/cluster-conformance-matrix.txt), in order,
# ending with a PASS/FAIL table. Live Postgres lines need
# STACYVM_POSTGRES_TEST_DSN (scripts/test.sh provides a throwaway server);
# under CI=true they are mandatory, otherwise they print SKIP.
set -uo pipefail
cd "$(dirname "$0")/.."

cargo build --quiet --locked --bin stacyvm || exit 1
BIN="${CARGO_TARGET_DIR:-target}/debug/stacyvm"
WORK=$(mktemp -d /tmp/stacyvm-conformance.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
REPORTS="${CARGO_TARGET_DIR:-target}/conformance"
mkdir -p "$REPORTS"

declare -a LINES RESULTS
failed=0
run() {
  local line=$1; shift
  echo "==> $line" >&2
  if "$@" >"$WORK/out" 2>&1; then
    LINES+=("$line"); RESULTS+=(PASS)
  else
    LINES+=("$line"); RESULTS+=(FAIL); failed=1
    tail -n 40 "$WORK/out" >&2
  fi
}
pg() {
  local line=$1; shift
  if [ -z "${STACYVM_POSTGRES_TEST_DSN:-}" ]; then
    if [ "${CI:-}" = "true" ]; then
      LINES+=("$line"); RESULTS+=("FAIL (no Postgres under CI=true)"); failed=1
    else
      LINES+=("$line"); RESULTS+=("SKIP (no STACYVM_POSTGRES_TEST_DSN)")
    fi
    return
  fi
  run "$line" "$@"
}
t() { cargo nextest run --locked --no-fail-fast -p "$1" -E "$2"; }

# Secrets and configs the lint lines use.
umask 077
for f in api admin signing w1; do head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$WORK/$f"; done
echo "postgres://stacyvm@db.internal:5432/stacyvm" >"$WORK/dsn"
"$BIN" certs init --out "$WORK/certs" >/dev/null
"$BIN" certs issue node --id 1 --ca "$WORK/certs" --out "$WORK/certs" >/dev/null
"$BIN" certs issue client --name cp --ca "$WORK/certs" --out "$WORK/certs" >/dev/null
prod_config() { # $1: worker-auth yaml lines, $2: database yaml lines
  cat <<YAML
node:
  id: 1
  data_dir: /var/lib/stacyvm
  certs_dir: $WORK/certs
  bootstrap: true
  peers: ["1=10.0.0.1:7001=10.0.0.1:7423"]
auth:
  api_key_file: $WORK/api
  admin_api_key_file: $WORK/admin
$1
database:
$2
defaults:
  max_sandboxes: 1000
  max_sandboxes_per_owner: 50
  max_ttl: 24h
  max_exec_timeout: 10m
worker:
  rpc_tls:
    enabled: true
    ca_file: $WORK/certs/ca.pem
    client_cert_file: $WORK/certs/client-cp.pem
    client_key_file: $WORK/certs/client-cp-key.pem
YAML
}
SQLITE_DB=$'  driver: sqlite\n  path: /var/lib/stacyvm/stacyvm.db'
prod_config $'  worker_tokens_files:\n    w1: '"$WORK/w1" "$SQLITE_DB" >"$WORK/per-worker.yaml"
prod_config "  worker_signing_key_file: $WORK/signing" "$SQLITE_DB" >"$WORK/signed.yaml"
prod_config "  worker_signing_key_file: $WORK/signing" $'  driver: postgres\n  dsn_file: '"$WORK/dsn" >"$WORK/postgres.yaml"
prod_config $'  worker_signing_key: '"$(cat "$WORK/signing")"$'\n  worker_signing_keys: ['"$(cat "$WORK/signing")"$']\n  worker_token: '"$(cat "$WORK/w1")" "$SQLITE_DB" >"$WORK/migrating.yaml"

lint_prod() { "$BIN" config lint --production --file "$1"; }
lint_warns() {
  local out; out=$("$BIN" config lint --file "$1") || return 1
  grep -q "shared worker token still configured with signed worker tokens" <<<"$out" &&
    grep -q "rotation keys include the active worker signing key" <<<"$out" &&
    ! grep -q "$(cat "$WORK/signing")" <<<"$out"
}
certify() {
  scripts/certify-worker-identity.sh worker-a --format markdown --output "$REPORTS/worker-identity.md" --bin "$BIN" &&
    grep -q "^# Worker Identity Certification" "$REPORTS/worker-identity.md" &&
    ! grep -q "stacyvm-worker-v1\." "$REPORTS/worker-identity.md"
}
smoke_pg() {
  STACYVM_REMOTE_SMOKE_DATABASE_DRIVER=postgres STACYVM_REMOTE_SMOKE_DATABASE_DSN="$STACYVM_POSTGRES_TEST_DSN" \
    scripts/smoke-remote-worker.sh "$BIN" && \
  STACYVM_REMOTE_SMOKE_DATABASE_DRIVER=postgres STACYVM_REMOTE_SMOKE_DATABASE_DSN="$STACYVM_POSTGRES_TEST_DSN" \
    scripts/smoke-remote-worker.sh "$BIN" --mtls
}

ROUTES='test(=identity::credentials_are_checked_per_route)'
RPC='test(=identity::remote_spawn_over_signed_rpc_without_a_shared_token)'
run "SQLite passes the reusable store contract harness" t stacyvm-store 'test(/^contract::sqlite::/)'
run "Worker route authentication accepts per-worker credentials" t stacyvm-node "$ROUTES"
run "Worker-specific credentials override the shared staging token" t stacyvm-auth 'test(=tests::worker_route_credentials)'
run "Worker route authentication accepts short-lived signed worker tokens" t stacyvm-auth 'test(=tests::signed_tokens_on_routes_and_rotation)'
run "Worker route authentication rejects signed tokens scoped to the worker RPC audience" t stacyvm-node "$ROUTES"
run "Worker route authentication rejects revoked signed worker token IDs" t stacyvm-node "$ROUTES"
run "Worker RPC accepts short-lived signed control-plane-to-worker tokens" t stacyvm-node "$RPC"
run "Worker RPC rejects signed tokens scoped to the control-plane route audience" t stacyvm-auth 'test(=tests::rpc_tokens_bind_one_worker)'
run "Worker RPC rejects revoked signed worker token IDs" t stacyvm-node "$RPC"
run "Remote spawn can route through worker RPC using signed tokens without a shared worker token" t stacyvm-node "$RPC"
run "Worker RPC mTLS completes a real client-authenticated request using generated certificates" t stacyvm-node 'test(=identity::worker_rpc_mutual_tls)'
run "Worker lease renewal is guarded by worker:lease" t stacyvm-node "$ROUTES"
run "A production-aligned cluster config with auth.worker_tokens or auth.worker_signing_key passes stacyvm config lint --production" \
  bash -c "'$BIN' config lint --production --file '$WORK/per-worker.yaml' && '$BIN' config lint --production --file '$WORK/signed.yaml'"
run "Worker identity certification smoke produces a Markdown report without token values" certify
run "Signed-token migration lint warns when shared worker tokens or invalid signing-key rotation state remain configured" lint_warns "$WORK/migrating.yaml"
run "Postgres configuration with a valid DSN passes stacyvm config lint --production" lint_prod "$WORK/postgres.yaml"
pg "Live Postgres passes the reusable store contract when STACYVM_POSTGRES_TEST_DSN is set" t stacyvm-store 'test(/^contract::postgres::/)'
pg "Live Postgres proves one active lease holder under concurrent acquire and expired takeover attempts" t stacyvm-store 'test(=lease_race::postgres_sixteen_connections_one_winner_then_one_takeover)'
pg "Live Postgres proves migrations apply idempotently and record every expected schema version" t stacyvm-store 'test(=migrations::postgres_migration_rehearsal_concurrent_migrators_and_rerun)'
pg "A Postgres-backed remote worker smoke runs control plane plus worker against the mock provider (plain and --mtls)" smoke_pg

{
  echo "| # | Matrix line | Result |"
  echo "|---|---|---|"
  for i in "${!LINES[@]}"; do echo "| $((i + 1)) | ${LINES[$i]} | ${RESULTS[$i]} |"; done
} | tee "$REPORTS/cluster-conformance.md"
exit $failed
