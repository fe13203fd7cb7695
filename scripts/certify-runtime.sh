#!/usr/bin/env bash
# Runtime certification: host checks, then a live smoke through a real cluster
# (three `stacyvm serve` replicas and one `stacyvm worker` offering only that
# runtime): spawn -> running -> exec -> file round trip -> destroy.
#
#   scripts/certify-runtime.sh [all|mock|docker|gvisor|kata|firecracker|proot]
#       [--format text|json|markdown] [--output FILE] [--bin path/to/stacyvm]
#
# Environment: DOCKER_HOST (docker/gvisor/kata), STACYVM_TEST_DOCKER_IMAGE (the
# image for docker/gvisor; default busybox), STACYVM_TEST_ROOTFS (proot's
# busybox rootfs), STACYVM_FIRECRACKER_BIN (firecracker). scripts/test.sh
# provides them.
#
# Verdicts: PASS, FAIL, or N/A (the runtime is not available on this host:
# kata without its runtime; firecracker's guest boot without hardware KVM).
# Exit code 1 when any selected runtime FAILs.
set -euo pipefail
cd "$(dirname "$0")/.."

WHICH=all
FORMAT=text
OUTPUT=""
BIN=""
while [ $# -gt 0 ]; do
  case "$1" in
    --format) FORMAT=$2; shift 2 ;;
    --output) OUTPUT=$2; shift 2 ;;
    --bin) BIN=$2; shift 2 ;;
    all|mock|docker|gvisor|kata|firecracker|proot) WHICH=$1; shift ;;
    *) echo "certify-runtime: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$FORMAT" in text|json|markdown) ;; *) echo "certify-runtime: --format text|json|markdown" >&2; exit 2 ;; esac
if [ -z "$BIN" ]; then
  cargo build --quiet --locked --bin stacyvm
  BIN="${CARGO_TARGET_DIR:-target}/debug/stacyvm"
fi
if [ "$WHICH" = all ]; then
  RUNTIMES=(mock docker gvisor kata firecracker proot)
else
  RUNTIMES=("$WHICH")
fi

WORK=$(mktemp -d /tmp/stacyvm-certify.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
# One line per check: runtime<TAB>check<TAB>PASS|FAIL|N/A<TAB>detail
CHECKS="$WORK/checks.tsv"
: >"$CHECKS"
check() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4//$'\t'/ }" >>"$CHECKS"; }

docker_runtimes() { timeout 10 docker info --format '{{json .Runtimes}}' 2>/dev/null || true; }

host_checks() {
  local rt=$1
  case "$rt" in
    mock)
      [ -r /proc/self/stat ] && check mock "/proc mounted" PASS "" || check mock "/proc mounted" FAIL "liveness reads /proc"
      command -v sh >/dev/null && check mock "sh present" PASS "$(command -v sh)" || check mock "sh present" FAIL "" ;;
    docker|gvisor|kata)
      local oci=runc
      [ "$rt" = gvisor ] && oci=runsc
      [ "$rt" = kata ] && oci=kata-runtime
      if command -v docker >/dev/null; then check "$rt" "docker CLI" PASS "$(docker --version 2>/dev/null | head -1)"; else check "$rt" "docker CLI" FAIL "not installed"; fi
      local v
      if v=$(timeout 10 docker version --format '{{.Server.Version}} (API {{.Server.APIVersion}})' 2>/dev/null); then
        check "$rt" "daemon answers" PASS "dockerd $v at ${DOCKER_HOST:-unix:///var/run/docker.sock}"
      else
        check "$rt" "daemon answers" FAIL "no dockerd at ${DOCKER_HOST:-unix:///var/run/docker.sock}"
        return
      fi
      if docker_runtimes | grep -q "\"$oci\""; then
        check "$rt" "OCI runtime $oci registered" PASS ""
      elif [ "$rt" = kata ]; then
        check "$rt" "OCI runtime $oci registered" N/A "not available on this host (no kata-runtime)"
      else
        check "$rt" "OCI runtime $oci registered" FAIL "add it to daemon.json runtimes"
      fi
      if [ "$rt" = gvisor ]; then
        command -v runsc >/dev/null && check gvisor "runsc binary" PASS "$(runsc --version 2>/dev/null | head -1)" || check gvisor "runsc binary" FAIL "not installed"
      fi
      local img=${STACYVM_TEST_DOCKER_IMAGE:-busybox}
      if timeout 10 docker image inspect "$img" >/dev/null 2>&1; then check "$rt" "image $img present" PASS ""; else check "$rt" "image $img present" FAIL "stacyvm image import ROOTFS.tar --tag $img"; fi ;;
    proot)
      if command -v proot >/dev/null; then check proot "proot binary" PASS "$(proot --version 2>/dev/null | grep -m1 -o 'v[0-9.]*' || true)"; else check proot "proot binary" FAIL "apt-get install proot"; fi
      if [ -n "${STACYVM_TEST_ROOTFS:-}" ] && [ -x "$STACYVM_TEST_ROOTFS/bin/sh" ]; then check proot "rootfs with /bin/sh" PASS "$STACYVM_TEST_ROOTFS"; else check proot "rootfs with /bin/sh" FAIL "set STACYVM_TEST_ROOTFS"; fi ;;
    firecracker)
      local fc=${STACYVM_FIRECRACKER_BIN:-}
      if [ -n "$fc" ] && [ -x "$fc" ]; then check firecracker "firecracker binary" PASS "$("$fc" --version 2>/dev/null | head -1)"; else check firecracker "firecracker binary" FAIL "scripts/fetch-firecracker.sh"; fi
      if [ -c /dev/kvm ]; then check firecracker "/dev/kvm" PASS "present"; else check firecracker "/dev/kvm" N/A "absent"; fi
      if [ -d /sys/module/kvm_pvm ]; then
        check firecracker "guest boot" N/A "/dev/kvm is PVM (kvm_pvm), which cannot run stock guest kernels: platform-gated"
      elif [ -c /dev/kvm ]; then
        check firecracker "guest boot" N/A "hardware KVM present; guest boot needs a kernel and rootfs image (not certified here)"
      else
        check firecracker "guest boot" N/A "no KVM"
      fi ;;
  esac
}

live_smoke() {
  local rt=$1 image=busybox extra=""
  case "$rt" in
    docker|gvisor|kata) image=${STACYVM_TEST_DOCKER_IMAGE:-busybox}; extra="--docker-pull never" ;;
    proot)
      # The image comes from the worker's config file (runtimes.proot.images).
      printf "runtimes:\n  proot:\n    images:\n      busybox: '%s'\n" "${STACYVM_TEST_ROOTFS:-/nonexistent}" >"$WORK/worker-proot.yaml"
      extra="--config $WORK/worker-proot.yaml" ;;
    firecracker)
      check firecracker "live smoke through the cluster" N/A "guest boot is platform-gated here; the API lifecycle runs in the runtime tests"
      return ;;
  esac
  if [ "$rt" = kata ] && ! docker_runtimes | grep -q '"kata-runtime"'; then
    check kata "live smoke through the cluster" N/A "not available on this host"
    return
  fi
  local t0 log="$WORK/smoke-$rt.log"
  t0=$(date +%s%N)
  if STACYVM_SMOKE_RUNTIME=$rt STACYVM_SMOKE_IMAGE=$image STACYVM_SMOKE_WORKER_ARGS=$extra \
      STACYVM_REMOTE_SMOKE_DATABASE_DRIVER=sqlite scripts/smoke-remote-worker.sh "$BIN" >"$log" 2>&1; then
    check "$rt" "live smoke through the cluster" PASS "3 replicas + 1 worker: spawn -> running -> exec -> 5 MB file round trip -> destroy in $(( ($(date +%s%N) - t0) / 1000000 )) ms; $(grep -m1 'spawned' "$log" | sed 's/^smoke: //')"
  else
    check "$rt" "live smoke through the cluster" FAIL "$(grep -v '^ ' "$log" | grep -m1 -i 'smoke:\|error' || tail -1 "$log")"
    echo "----- smoke log ($rt)" >&2
    tail -60 "$log" >&2
  fi
}

for rt in "${RUNTIMES[@]}"; do
  echo "certify-runtime: $rt" >&2
  host_checks "$rt"
  if grep -q "^$rt	[^	]*	FAIL" "$CHECKS"; then
    check "$rt" "live smoke through the cluster" FAIL "skipped: a host check failed"
  else
    live_smoke "$rt"
  fi
done

verdict() {
  if grep -q "^$1	[^	]*	FAIL" "$CHECKS"; then echo FAIL
  elif grep -q "^$1	live smoke through the cluster	PASS" "$CHECKS"; then echo PASS
  else echo N/A; fi
}

render() {
  local host kernel when
  host=$(uname -n); kernel=$(uname -r); when=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  case "$FORMAT" in
    text)
      echo "Runtime Certification ($when, $host, kernel $kernel)"
      for rt in "${RUNTIMES[@]}"; do
        echo "$rt: $(verdict "$rt")"
        awk -F'\t' -v r="$rt" '$1==r {printf "  %-5s %s%s\n", $3, $2, ($4!="" ? ": " $4 : "")}' "$CHECKS"
      done ;;
    json)
      python3 - "$CHECKS" "$when" "$host" "$kernel" "${RUNTIMES[@]}" <<'EOF'
import json, sys
checks, when, host, kernel, rts = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
rows = [l.rstrip("\n").split("\t") for l in open(checks) if l.strip()]
out = {"title": "Runtime Certification", "generated_at": when, "host": host, "kernel": kernel, "runtimes": []}
for rt in rts:
    mine = [r for r in rows if r[0] == rt]
    v = "FAIL" if any(r[2] == "FAIL" for r in mine) else ("PASS" if any(r[1] == "live smoke through the cluster" and r[2] == "PASS" for r in mine) else "N/A")
    out["runtimes"].append({"runtime": rt, "verdict": v, "checks": [{"name": r[1], "result": r[2], "detail": r[3] if len(r) > 3 else ""} for r in mine]})
print(json.dumps(out, indent=2))
EOF
      ;;
    markdown)
      echo "# Runtime Certification"
      echo
      echo "Generated $when on \`$host\` (kernel \`$kernel\`) by \`scripts/certify-runtime.sh\`."
      echo
      echo "| Runtime | Verdict |"
      echo "|---|---|"
      for rt in "${RUNTIMES[@]}"; do echo "| $rt | $(verdict "$rt") |"; done
      for rt in "${RUNTIMES[@]}"; do
        echo
        echo "## $rt"
        echo
        echo "| Check | Result | Detail |"
        echo "|---|---|---|"
        awk -F'\t' -v r="$rt" '$1==r {gsub(/\|/, "\\|", $4); printf "| %s | %s | %s |\n", $2, $3, $4}' "$CHECKS"
      done
      echo
      echo "## Operator sign-off"
      echo
      echo "- Reviewed by: ____________________"
      echo "- Date: ____________________"
      echo "- Runtimes approved for production: ____________________"
      echo "- Notes (isolation level accepted, host hardening, image policy): ____________________" ;;
  esac
}

if [ -n "$OUTPUT" ]; then
  mkdir -p "$(dirname "$OUTPUT")"
  render >"$OUTPUT"
  echo "certify-runtime: report written to $OUTPUT" >&2
else
  render
fi
failed=0
for rt in "${RUNTIMES[@]}"; do
  v=$(verdict "$rt")
  echo "certify-runtime: $rt $v" >&2
  [ "$v" = FAIL ] && failed=1
done
exit "$failed"
