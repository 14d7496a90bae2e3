#!/usr/bin/env bash
# `make test-containers`: build the images and run the compose stack in Docker (tests/deploy/test_containers.py).
# Made for a CI machine like ours: root on Debian, no container registry (every pull fails), no GPU, and
# Docker's TLS traffic to PyPI inspected by a proxy whose CA only the host's bundle has. So it
#   - installs Docker Engine, Compose v1 and debootstrap from Debian's packages when they are missing;
#   - starts dockerd (storage driver vfs) when none answers, and stops it at the end;
#   - builds debian:bookworm-slim with debootstrap when the image is missing and the pull fails;
#   - builds with the host's CA bundle as the optional BuildKit secret `ca`, and the worker with the CPU torch
#     wheel: TORCH_INDEX_URL points at a loopback index holding the wheel found in TORCH_WHEEL_DIR (the host
#     pip's find-links folder), or at https://download.pytorch.org/whl/cpu where none is found;
#   - prints each image's size and each phase's time.
# Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
DOCKER=${DOCKER:-/usr/bin/docker}  # Debian's client: the `docker` first on PATH may lack BuildKit's builder
TAG=${SDXL_IMAGE_TAG:-local}
TORCH_VERSION=2.13.0
TORCH_WHEEL_DIR=${TORCH_WHEEL_DIR:-/opt/wheels}
CA=/etc/ssl/certs/ca-certificates.crt
export DOCKER SDXL_IMAGE_TAG=$TAG DOCKER_BUILDKIT=1

work=$(mktemp -d /tmp/sdxl-containers.XXXXXX)
dockerd_pid="" index_pid=""
# shellcheck disable=SC2329  # called by the trap below
cleanup() {
  [ -n "$index_pid" ] && kill "$index_pid" 2>/dev/null || true
  if [ -n "$dockerd_pid" ]; then
    echo "stopping the dockerd this run started" >&2
    kill "$dockerd_pid" 2>/dev/null && wait "$dockerd_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

t0=$(date +%s)
phase() { echo "== $1 ($(( $(date +%s) - t0 ))s since start)" >&2; }

phase "system packages"
missing=()
[ -x /usr/sbin/dockerd ] && [ -x "$DOCKER" ] || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "missing: ${missing[*]} (Debian: apt-get install ${missing[*]}, as root)" >&2
    exit 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

phase "docker engine"
if ! "$DOCKER" info >/dev/null 2>&1; then
  # vfs: works on any filesystem, in containers too (no overlay mounts); every layer is a full copy
  dockerd --storage-driver=vfs >"$work/dockerd.log" 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 60); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 1; done
  "$DOCKER" info >/dev/null 2>&1 || { tail -20 "$work/dockerd.log" >&2; exit 1; }
fi

phase "base image debian:bookworm-slim"
if ! "$DOCKER" image inspect debian:bookworm-slim >/dev/null 2>&1 \
    && ! timeout 60 "$DOCKER" pull -q debian:bookworm-slim >/dev/null 2>&1; then
  # the official image is a debootstrap of bookworm too (minbase); imported under the same name
  debootstrap --variant=minbase bookworm "$work/rootfs" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  # as the official image: / readable by every user, PATH set, bash by default
  chmod 0755 "$work/rootfs"
  tar -C "$work/rootfs" -c . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' --change 'CMD ["bash"]' \
    - debian:bookworm-slim >/dev/null
  rm -rf "$work/rootfs"
fi

# the CPU wheel of torch, served as a package index on loopback (the build runs on the host's network)
torch_index=https://download.pytorch.org/whl/cpu
wheel=""
for w in "$TORCH_WHEEL_DIR"/torch-"$TORCH_VERSION"+cpu-cp311-*.whl; do [ -f "$w" ] && wheel=$w; done
if [ -n "$wheel" ]; then
  mkdir -p "$work/index/torch" && ln -s "$wheel" "$work/index/torch/"
  # the same port run after run where it is free: the URL is part of the worker's build cache key
  port=$("$PY" -c '
import socket
s = socket.socket()
try:
    s.bind(("127.0.0.1", 38111))
except OSError:
    s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
  "$PY" -m http.server "$port" --bind 127.0.0.1 --directory "$work/index" >"$work/index.log" 2>&1 &
  index_pid=$!
  torch_index=http://127.0.0.1:$port/
fi

build() {  # target image context [args...]
  local target=$1 image=$2 context=$3 start secret=()
  shift 3
  start=$(date +%s)
  [ -s "$CA" ] && secret=(--secret "id=ca,src=$CA")
  "$DOCKER" build --network host "${secret[@]}" --target "$target" -t "$image:$TAG" "$@" "$context" \
    >"$work/build-$target.log" 2>&1 || { tail -40 "$work/build-$target.log" >&2; exit 1; }
  echo "built $image:$TAG in $(( $(date +%s) - start ))s" >&2
}
phase "images"
build api sdxl-api .
build worker sdxl-worker . --build-arg "TORCH_INDEX_URL=$torch_index"
build redis sdxl-ci-redis deploy/ci -f deploy/ci/Dockerfile
build gateway sdxl-ci-gateway deploy/ci -f deploy/ci/Dockerfile
build s3 sdxl-ci-s3 deploy/ci -f deploy/ci/Dockerfile --build-arg "API_IMAGE=sdxl-api:$TAG"
"$DOCKER" images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "^(sdxl|debian)" | sort >&2

phase "compose stack tests"
status=0
SDXL_REQUIRE_DOCKER=1 "$PY" -m pytest -q -p no:cacheprovider --durations=0 -m containers tests/deploy/test_containers.py "$@" || status=$?
phase "done"
exit $status
