#!/usr/bin/env bash
# Real control plane + worker smoke: three `stacyvm serve` replicas and one
# `stacyvm worker` as separate processes on loopback, then
# spawn -> running -> exec -> file round trip -> destroy, through the CLI.
#
#   scripts/smoke-remote-worker.sh [path/to/stacyvm] [--mtls]
#   STACYVM_REMOTE_SMOKE_DATABASE_DRIVER=sqlite|postgres   (default sqlite)
#   STACYVM_REMOTE_SMOKE_DATABASE_DSN=postgres://...       (postgres: a server DSN;
#       one database per replica is created from it and dropped afterwards)
#   STACYVM_SMOKE_RUNTIME=mock|docker|gvisor|proot|...    (default mock; the worker
#       offers only it and the spawn selects it)
#   STACYVM_SMOKE_IMAGE=busybox                            (the image spawned)
#   STACYVM_SMOKE_WORKER_ARGS="--proot-image busybox=DIR"  (extra worker flags)
#
# Every process it starts is stopped by PID on exit; on failure it prints the
# tail of every log.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=""
MTLS=0
for arg in "$@"; do
  case "$arg" in
    --mtls) MTLS=1 ;;
    *) BIN=$arg ;;
  esac
done
if [ -z "$BIN" ]; then
  cargo build --quiet --locked --bin stacyvm
  BIN="${CARGO_TARGET_DIR:-target}/debug/stacyvm"
fi
DRIVER=${STACYVM_REMOTE_SMOKE_DATABASE_DRIVER:-sqlite}
RUNTIME=${STACYVM_SMOKE_RUNTIME:-mock}
IMAGE=${STACYVM_SMOKE_IMAGE:-busybox}
read -r -a WORKER_EXTRA <<<"${STACYVM_SMOKE_WORKER_ARGS:-}"
DSN=${STACYVM_REMOTE_SMOKE_DATABASE_DSN:-}
case "$DRIVER" in
  sqlite) ;;
  postgres) [ -n "$DSN" ] || { echo "smoke: postgres needs STACYVM_REMOTE_SMOKE_DATABASE_DSN" >&2; exit 2; } ;;
  *) echo "smoke: unknown driver $DRIVER (sqlite|postgres)" >&2; exit 2 ;;
esac

WORK=$(mktemp -d /tmp/stacyvm-smoke.XXXXXX)
PIDS=()
DBS=()
ok=0

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
db_dsn() { echo "${DSN%/*}/$1"; }

cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  if [ "$ok" != 1 ]; then
    for f in "$WORK"/*.log; do echo "----- $f (tail)" >&2; tail -n 40 "$f" >&2 || true; done
  fi
  for db in "${DBS[@]}"; do psql -q "$DSN" -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

"$BIN" certs init --out "$WORK/certs" >/dev/null
PEERS=()
declare -a API RAFT
for i in 1 2 3; do
  "$BIN" certs issue node --id "$i" --ca "$WORK/certs" --out "$WORK/certs" >/dev/null
  API[$i]="127.0.0.1:$(free_port)"
  RAFT[$i]="127.0.0.1:$(free_port)"
  PEERS+=(--peer "$i=${RAFT[$i]}=${API[$i]}")
done
RPCTLS_SERVE=()
RPCTLS_WORKER=()
if [ "$MTLS" = 1 ]; then
  # Worker RPC over mutual TLS with certificates from the cluster CA.
  "$BIN" certs issue worker --id smoke-worker --ca "$WORK/certs" --out "$WORK/certs" >/dev/null
  "$BIN" certs issue client --name smoke-cp --ca "$WORK/certs" --out "$WORK/certs" >/dev/null
  RPCTLS_SERVE=(--worker-rpc-ca "$WORK/certs/ca.pem" --worker-rpc-client-cert "$WORK/certs/client-smoke-cp.pem" --worker-rpc-client-key "$WORK/certs/client-smoke-cp-key.pem")
  RPCTLS_WORKER=(--rpc-tls-cert "$WORK/certs/worker-smoke-worker.pem" --rpc-tls-key "$WORK/certs/worker-smoke-worker-key.pem" --rpc-tls-client-ca "$WORK/certs/ca.pem")
fi
for i in 1 2 3; do
  DBARGS=(--database-driver "$DRIVER")
  if [ "$DRIVER" = postgres ]; then
    db="stacyvm_smoke_$$_$i"
    psql -q "$DSN" -c "CREATE DATABASE $db" >/dev/null
    DBS+=("$db")
    DBARGS+=(--database-dsn "$(db_dsn "$db")")
  fi
  STACYVM_LOG=info "$BIN" serve --id "$i" --data-dir "$WORK/node-$i" --certs "$WORK/certs" \
    --raft-addr "${RAFT[$i]}" --api-addr "${API[$i]}" --bootstrap "${PEERS[@]}" "${DBARGS[@]}" ${RPCTLS_SERVE[@]+"${RPCTLS_SERVE[@]}"} \
    >"$WORK/node-$i.log" 2>&1 &
  PIDS+=($!)
done
SERVERS="http://${API[1]},http://${API[2]},http://${API[3]}"
export STACYVM_SERVER=$SERVERS

for _ in $(seq 150); do
  curl -fsS "http://${API[1]}/ready" >/dev/null 2>&1 && break
  sleep 0.2
done
curl -fsS "http://${API[1]}/ready" >/dev/null

STACYVM_LOG=info "$BIN" worker --id smoke-worker --bootstrap "${API[1]},${API[2]},${API[3]}" \
  --rpc-addr "127.0.0.1:$(free_port)" --state-dir "$WORK/worker" --destroy-on-exit --runtimes "$RUNTIME" \
  ${RPCTLS_WORKER[@]+"${RPCTLS_WORKER[@]}"} ${WORKER_EXTRA[@]+"${WORKER_EXTRA[@]}"} \
  >"$WORK/worker.log" 2>&1 &
PIDS+=($!)

for _ in $(seq 100); do
  W=$("$BIN" workers --output json 2>/dev/null || true)
  grep -q '"status": "online"' <<<"$W" && break
  sleep 0.2
done
"$BIN" workers
if [ "$MTLS" = 1 ]; then
  W=$("$BIN" workers --output json)
  grep -q '"rpc_url": "https://' <<<"$W" || { echo "smoke: worker RPC is not https" >&2; exit 1; }
fi

T0=$(date +%s%N)
ID=$("$BIN" spawn --image "$IMAGE" --runtime "$RUNTIME" --ttl 10m)
echo "smoke: spawned $ID ($RUNTIME, $IMAGE) in $(( ($(date +%s%N) - T0) / 1000000 )) ms"
read -r STATE GOT_RUNTIME < <("$BIN" get "$ID" --output json | python3 -c 'import json,sys; s=json.load(sys.stdin)[0]; print(s["state"], s["runtime"])')
[ "$STATE" = running ] || { echo "smoke: state is $STATE, want running" >&2; exit 1; }
[ "$GOT_RUNTIME" = "$RUNTIME" ] || { echo "smoke: runtime is $GOT_RUNTIME, want $RUNTIME" >&2; exit 1; }
OUT=$("$BIN" exec "$ID" 'echo hello from $SANDBOX_ID')
[ "$OUT" = "hello from $ID" ] || { echo "smoke: exec said '$OUT'" >&2; exit 1; }
head -c 5000000 /dev/urandom >"$WORK/in.bin"
"$BIN" cp "$WORK/in.bin" "$ID:/workspace/in.bin"
"$BIN" cp "$ID:/workspace/in.bin" "$WORK/out.bin"
cmp "$WORK/in.bin" "$WORK/out.bin"
"$BIN" kill "$ID"
if "$BIN" get "$ID" >/dev/null 2>&1; then echo "smoke: $ID still exists after kill" >&2; exit 1; fi
ok=1
echo "smoke ($DRIVER, $RUNTIME$([ "$MTLS" = 1 ] && echo ', mTLS')): spawn -> running -> exec -> file round trip -> destroy: OK"
