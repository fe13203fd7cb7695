#!/usr/bin/env bash
# Worker identity certification: issues a signed token, inspects it (signature
# not verified), verifies it, verifies a token signed by the previous rotation
# key, shows a revoked token ID refused, and prints the rotation plan. The
# report (text, json or markdown) never contains a token or a key.
#
#   scripts/certify-worker-identity.sh [worker-id] [--format text|json|markdown] [--output FILE] [--bin PATH]
set -euo pipefail
cd "$(dirname "$0")/.."

WORKER=worker-a
FORMAT=text
OUTPUT=""
BIN=""
while [ $# -gt 0 ]; do
  case "$1" in
    --format) FORMAT=$2; shift 2 ;;
    --output) OUTPUT=$2; shift 2 ;;
    --bin) BIN=$2; shift 2 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) WORKER=$1; shift ;;
  esac
done
case "$FORMAT" in text|json|markdown) ;; *) echo "--format: text, json or markdown" >&2; exit 2 ;; esac
if [ -z "$BIN" ]; then
  cargo build --quiet --locked --bin stacyvm
  BIN="${CARGO_TARGET_DIR:-target}/debug/stacyvm"
fi

WORK=$(mktemp -d /tmp/stacyvm-certify.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
umask 077
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$WORK/new.key"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$WORK/old.key"

declare -a NAMES RESULTS DETAILS
check() { NAMES+=("$1"); RESULTS+=("$2"); DETAILS+=("$3"); }
field() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

T=$("$BIN" worker token issue "$WORKER" --signing-key-file "$WORK/new.key" --ttl 10m --scope worker:heartbeat --scope worker:lease)
# Outputs are captured before grep: with pipefail, `grep -q` closing the pipe
# early would fail the producer.
INSPECT=$("$BIN" worker token inspect - <<<"$T")
JTI=$(field token_id <<<"$INSPECT")
if grep -q '"signature_verified": false' <<<"$INSPECT"; then
  check issue PASS "signed token issued for $WORKER (10m, heartbeat+lease)"
  check inspect PASS "claims decoded without verification; token ID $JTI"
else
  check inspect FAIL "inspect did not decode the token"
fi
VERIFY=$("$BIN" worker token verify - --worker-id "$WORKER" --signing-key-file "$WORK/new.key" <<<"$T" || true)
if grep -q '"signature_verified": true' <<<"$VERIFY"; then
  check verify PASS "signature and claims verified with the active key"
else
  check verify FAIL "a freshly issued token did not verify"
fi
OLD=$("$BIN" worker token issue "$WORKER" --signing-key-file "$WORK/old.key" --ttl 5m)
if "$BIN" worker token verify - --worker-id "$WORKER" --signing-key-file "$WORK/new.key" --verification-key-file "$WORK/old.key" <<<"$OLD" >/dev/null; then
  check rotation-old-key PASS "a token signed by the previous key verifies during the rotation window"
else
  check rotation-old-key FAIL "the previous key's token was refused during rotation"
fi
if "$BIN" worker token verify - --worker-id "$WORKER" --signing-key-file "$WORK/new.key" <<<"$OLD" >/dev/null 2>&1; then
  check rotation-key-removed FAIL "the previous key's token still verifies after the key was removed"
else
  check rotation-key-removed PASS "after the previous key is removed its tokens are refused"
fi
if "$BIN" worker token verify - --worker-id "$WORKER" --signing-key-file "$WORK/new.key" --revoked-token-id "$JTI" <<<"$T" >/dev/null 2>"$WORK/revoked.err"; then
  check revoked FAIL "a revoked token ID was accepted"
else
  grep -q token_revoked "$WORK/revoked.err" && check revoked PASS "revoked token ID refused (token_revoked)" || check revoked FAIL "refused, but not for revocation"
fi
if "$BIN" worker token verify - --worker-id other-worker --signing-key-file "$WORK/new.key" <<<"$T" >/dev/null 2>&1; then
  check wrong-worker FAIL "a token was accepted for another worker"
else
  check wrong-worker PASS "a token for $WORKER is refused for another worker"
fi
"$BIN" worker token rotation-plan --format json > "$WORK/plan.json"
STEPS=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["steps"]))' "$WORK/plan.json")
[ "$STEPS" = 5 ] && check rotation-plan PASS "5-step rotation plan, no secrets" || check rotation-plan FAIL "rotation plan has $STEPS steps"

failed=0
for r in "${RESULTS[@]}"; do [ "$r" = PASS ] || failed=1; done
render() {
  case "$FORMAT" in
    text)
      echo "Worker Identity Certification ($WORKER)"
      for i in "${!NAMES[@]}"; do printf '%-22s %s  %s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${DETAILS[$i]}"; done ;;
    markdown)
      echo "# Worker Identity Certification"
      echo
      echo "Worker: \`$WORKER\` · $(date -u +%Y-%m-%dT%H:%M:%SZ) · no token or key values are included."
      echo
      echo "| Check | Result | Detail |"
      echo "|---|---|---|"
      for i in "${!NAMES[@]}"; do echo "| ${NAMES[$i]} | ${RESULTS[$i]} | ${DETAILS[$i]} |"; done
      echo
      echo "## Rotation plan"
      echo
      python3 -c 'import json,sys; [print("- " + s) for s in json.load(open(sys.argv[1]))["steps"]]' "$WORK/plan.json" ;;
    json)
      python3 - "$WORKER" "$WORK/plan.json" "${NAMES[@]}" -- "${RESULTS[@]}" -- "${DETAILS[@]}" <<'PY'
import json, sys
a = sys.argv[1:]
worker, plan = a[0], a[1]
rest = a[2:]
i = rest.index("--"); names = rest[:i]; rest = rest[i+1:]
j = rest.index("--"); results = rest[:j]; details = rest[j+1:]
print(json.dumps({"title": "Worker Identity Certification", "worker_id": worker,
  "checks": [{"name": n, "result": r, "detail": d} for n, r, d in zip(names, results, details)],
  "rotation_plan": json.load(open(plan))["steps"]}, indent=2))
PY
      ;;
  esac
}
if [ -n "$OUTPUT" ]; then
  mkdir -p "$(dirname "$OUTPUT")"
  render > "$OUTPUT"
  echo "report written to $OUTPUT" >&2
else
  render
fi
# Self-check: the report must not contain a token or a key.
REPORT=$(render)
if grep -q -e 'stacyvm-worker-v1\.' -e "$(cat "$WORK/new.key")" -e "$(cat "$WORK/old.key")" <<<"$REPORT"; then
  echo "FAIL: the report contains a secret" >&2
  exit 1
fi
exit $failed
