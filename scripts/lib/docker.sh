# shellcheck shell=bash
# Runtimes for tests: a throwaway dockerd (runc + gVisor's runsc registered),
# PRoot, and a busybox-static image and rootfs built locally (no registry is
# reachable). Source this file, then call `runtimes_provision`; it exports
#
#   DOCKER_HOST                 unix socket of the dockerd (ours or one already answering)
#   STACYVM_TEST_DOCKER_IMAGE   busybox image imported with `docker import`
#   STACYVM_TEST_ROOTFS         the same busybox rootfs as a directory (PRoot)
#   STACYVM_FIRECRACKER_BIN     firecracker v1.12.1 (scripts/fetch-firecracker.sh)
#
# and registers `runtimes_stop` (stops only the dockerd it started, by PID).
# dockerd runs with --bridge=none --iptables=false: sandboxes get no network.
# Under CI=true (or as root) missing packages are installed.

STACYVM_TEST_IMAGE_TAG=${STACYVM_TEST_IMAGE_TAG:-stacyvm-test/busybox:1}

runtimes_install() {
  local missing=()
  command -v dockerd >/dev/null 2>&1 || [ -x /usr/sbin/dockerd ] || missing+=(docker.io)
  command -v runsc >/dev/null 2>&1 || missing+=(runsc)
  command -v proot >/dev/null 2>&1 || missing+=(proot)
  dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "${CI:-}" = "true" ] || [ "$(id -u)" = 0 ]; then
    echo "installing ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null \
      || { echo "apt-get install ${missing[*]} failed" >&2; return 1; }
  else
    echo "missing packages: ${missing[*]}" >&2
    return 1
  fi
}

# The busybox-static rootfs: /bin/* applets, /etc/passwd with root and a
# sandbox user (1000), /workspace and /tmp.
runtimes_rootfs() {
  local dir=$1
  [ -x "$dir/bin/sh" ] && return 0
  rm -rf "$dir.partial"
  mkdir -p "$dir.partial"/{bin,etc,tmp,workspace,proc,dev,sys,root,home/sandbox}
  cp /bin/busybox "$dir.partial/bin/busybox"
  "$dir.partial/bin/busybox" --list | while read -r applet; do
    [ "$applet" = busybox ] || ln -sf busybox "$dir.partial/bin/$applet"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nsandbox:x:1000:1000:sandbox:/home/sandbox:/bin/sh\n' \
    >"$dir.partial/etc/passwd"
  printf 'root:x:0:\nsandbox:x:1000:\n' >"$dir.partial/etc/group"
  chmod 1777 "$dir.partial/tmp"
  chown 1000:1000 "$dir.partial/workspace" "$dir.partial/home/sandbox" 2>/dev/null || true
  mv "$dir.partial" "$dir"
}

docker_answers() {
  timeout 10 docker version --format '{{.Server.Version}}' >/dev/null 2>&1
}

runtimes_provision() {
  runtimes_install || return 1
  local cache=${STACYVM_RUNTIME_CACHE:-/var/tmp/stacyvm-runtimes}
  mkdir -p "$cache"
  runtimes_rootfs "$cache/busybox-rootfs" || return 1
  export STACYVM_TEST_ROOTFS="$cache/busybox-rootfs"

  if [ -n "${DOCKER_HOST:-}" ] && docker_answers; then
    echo "using the dockerd at $DOCKER_HOST" >&2
  else
    DOCKERD_RUN=$(mktemp -d /tmp/stacyvm-dockerd.XXXXXX)
    cat >"$DOCKERD_RUN/daemon.json" <<EOF
{
  "runtimes": { "runsc": { "path": "$(command -v runsc)", "runtimeArgs": ["--network=none"] } }
}
EOF
    export DOCKER_HOST="unix://$DOCKERD_RUN/docker.sock"
    local dockerd
    dockerd=$(command -v dockerd || echo /usr/sbin/dockerd)
    "$dockerd" --host "$DOCKER_HOST" --config-file "$DOCKERD_RUN/daemon.json" \
      --data-root "$DOCKERD_RUN/data" --exec-root "$DOCKERD_RUN/exec" \
      --pidfile "$DOCKERD_RUN/dockerd.pid" --bridge=none --iptables=false --ip-masq=false \
      >"$DOCKERD_RUN/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    local i
    for i in $(seq 1 60); do
      docker_answers && break
      kill -0 "$DOCKERD_PID" 2>/dev/null || break
      sleep 0.5
    done
    if ! docker_answers; then
      echo "dockerd did not start; its log:" >&2
      tail -30 "$DOCKERD_RUN/dockerd.log" >&2
      return 1
    fi
    echo "throwaway dockerd (pid $DOCKERD_PID) at $DOCKER_HOST" >&2
  fi
  if ! docker image inspect "$STACYVM_TEST_IMAGE_TAG" >/dev/null 2>&1; then
    tar -C "$STACYVM_TEST_ROOTFS" -c . | docker import - "$STACYVM_TEST_IMAGE_TAG" >/dev/null \
      || { echo "docker import failed" >&2; return 1; }
  fi
  export STACYVM_TEST_DOCKER_IMAGE="$STACYVM_TEST_IMAGE_TAG"
  local fc
  fc=$("$(dirname "${BASH_SOURCE[0]}")/../fetch-firecracker.sh" "$cache/firecracker") \
    || { echo "cannot fetch the firecracker binary" >&2; return 1; }
  export STACYVM_FIRECRACKER_BIN="$fc"
}

runtimes_stop() {
  if [ -n "${DOCKERD_PID:-}" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
    kill -TERM "$DOCKERD_PID" 2>/dev/null || true
    local i
    for i in $(seq 1 40); do
      kill -0 "$DOCKERD_PID" 2>/dev/null || break
      sleep 0.25
    done
    kill -KILL "$DOCKERD_PID" 2>/dev/null || true
  fi
  [ -n "${DOCKERD_RUN:-}" ] && rm -rf "$DOCKERD_RUN" 2>/dev/null
  return 0
}
