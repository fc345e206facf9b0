#!/usr/bin/env bash
# Container images without any registry but PyPI, Maven Central, the Go module proxy and Debian.
#   images.sh bases            Debian bookworm roots made with mmdebstrap (python, plain)
#   images.sh system           pause, CoreDNS, local-path provisioner, busybox (from $K8S_BIN)
#   images.sh build NAME       one of the chart's images: ctloop triton kafka postgresql s3
#   images.sh list             $IMAGES_DIR/images.txt: every image above with its id (what
#                              `cluster.sh up` streams from podman's store into containerd)
# Env: REGISTRY/TAG (the chart's image names), K8S_BIN, IMAGES_DIR, WHEELHOUSE, KAFKA_LIBS,
# VERSITYGW, COREDNS_VERSION. Runs as root (podman with runc, see containers.conf).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
export CONTAINERS_CONF=$here/containers.conf
: "${REGISTRY:=ghcr.io/ctloop}" "${TAG:?}" "${IMAGES_DIR:=$root/.ctloop/images}"
PY_BASE=localhost/ctloop-base/python:3.11-bookworm
DEB_BASE=localhost/ctloop-base/debian:bookworm
SYSTEM=(localhost/pause:3.10 localhost/coredns:local localhost/local-path-provisioner:local localhost/busybox:local)
APP=(ctloop ctloop-triton ctloop-kafka ctloop-postgresql ctloop-s3)

mmdebstrap_image() {  # name, packages (comma-separated)
  local t; t=$(mktemp -d)
  nice -n 10 mmdebstrap --quiet --variant=minbase --mode=root --format=tar --include="$2" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    bookworm "$t/root.tar"  # no mirror given: the host's own apt sources
  podman import --change 'CMD ["/bin/bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "$t/root.tar" "$1" >/dev/null
  rm -rf "$t"
}

static_image() {  # name, entrypoint, user, files...
  local name=$1 entry=$2 user=$3; shift 3
  local t; t=$(mktemp -d)
  mkdir -p "$t/bin" && cp "$@" "$t/bin/"
  tar -C "$t" -cf "$t/img.tar" bin
  podman import --change "ENTRYPOINT [\"$entry\"]" --change "USER $user" "$t/img.tar" "$name" >/dev/null
  rm -rf "$t"
}

bases() {
  mmdebstrap_image "$PY_BASE" python3,python3-venv,python-is-python3,libpython3.11,ca-certificates
  mmdebstrap_image "$DEB_BASE" ca-certificates
}

system() {
  : "${K8S_BIN:?}"
  static_image localhost/pause:3.10 /bin/pause 65535:65535 "$K8S_BIN/pause"
  static_image localhost/coredns:local /bin/coredns 65532:65532 "$K8S_BIN/coredns"
  static_image localhost/local-path-provisioner:local /bin/local-path-provisioner 0:0 "$K8S_BIN/local-path-provisioner"
  # busybox: the provisioner's helper pods (mkdir/rm of volume folders) and debugging
  local t; t=$(mktemp -d); mkdir -p "$t/bin"; cp /bin/busybox "$t/bin/"
  for a in sh ls cat echo sleep mkdir rm rmdir chmod wget nc; do ln -s busybox "$t/bin/$a"; done
  tar -C "$t" -cf "$t/bb.tar" bin
  podman import --change 'CMD ["/bin/sh"]' --change 'ENV PATH=/bin' "$t/bb.tar" localhost/busybox:local >/dev/null
  rm -rf "$t"
}

# The ctloop image's venv is ~5 GB, and podman copies a layer through /var/tmp while it commits
# it: without that room the build fails late with "no space left on device" (seen here).
need_space() {  # GiB, paths...
  local gib=$1 path free; shift
  for path in "$@"; do
    while [ ! -e "$path" ]; do path=$(dirname "$path"); done  # podman makes its store later
    free=$(df --output=avail -BG "$path" | tail -1 | tr -dc 0-9)
    if [ "$free" -lt "$gib" ]; then
      echo "[images] $path has ${free} GiB free; building this image needs about ${gib} GiB" \
           "(remove old images: podman image prune; or give podman's storage more room)" >&2
      exit 1
    fi
  done
}

# Every image this script builds carries this label; a rebuild leaves the previous one untagged
# (5.7 GB for ctloop's), and only those are pruned before the next build.
LABEL=io.ctloop.build=images.sh

build() {
  local name=$1 ctx repo
  podman image prune -f --filter "label=$LABEL" >/dev/null
  [ "$name" != ctloop ] || need_space 15 /var/lib/containers /var/tmp
  repo=$([ "$name" = ctloop ] && echo ctloop || echo "ctloop-$name")
  local args=(--pull=never --layers --label "$LABEL" --tag "$REGISTRY/$repo:$TAG"
              --build-arg BASE_IMAGE=$DEB_BASE)
  case $name in
    ctloop)
      : "${WHEELHOUSE:?}"
      podman build "${args[@]}" -f "$root/docker/Dockerfile" --build-arg PYTHON_IMAGE=$PY_BASE \
        --build-arg TORCH_INDEX_URL= --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels \
        --volume "$WHEELHOUSE:/wheels:ro" "$root"
      # PyPI's torch carries CUDA: the same image is the round Jobs' CUDA image
      podman tag "$REGISTRY/ctloop:$TAG" "$REGISTRY/ctloop-cuda:$TAG" ;;
    triton)
      podman build "${args[@]}" -f "$root/docker/Dockerfile.triton" \
        --build-arg CTLOOP_IMAGE="$REGISTRY/ctloop:$TAG" --build-arg PIP_NO_INDEX=1 \
        --build-arg PIP_FIND_LINKS=/wheels --volume "$WHEELHOUSE:/wheels:ro" "$root" ;;
    kafka)
      : "${KAFKA_LIBS:?}"; ctx=$(mktemp -d)
      cp -r "$KAFKA_LIBS" "$ctx/libs"; cp -r "$root/docker/kafka" "$ctx/kafka"
      podman build "${args[@]}" -f "$root/docker/Dockerfile.kafka" "$ctx"; rm -rf "$ctx" ;;
    postgresql)
      podman build "${args[@]}" -f "$root/docker/Dockerfile.postgresql" "$root/docker/postgresql" ;;
    s3)
      : "${VERSITYGW:?}"; ctx=$(mktemp -d); cp "$VERSITYGW" "$ctx/versitygw"; strip "$ctx/versitygw"
      podman build "${args[@]}" -f "$root/docker/Dockerfile.s3" "$ctx"; rm -rf "$ctx" ;;
    *) echo "unknown image $name (ctloop triton kafka postgresql s3)" >&2; exit 2 ;;
  esac
}

list() {
  mkdir -p "$IMAGES_DIR"
  local refs=("${SYSTEM[@]}") n
  for n in "${APP[@]}"; do refs+=("$REGISTRY/$n:$TAG"); done
  refs+=("$REGISTRY/ctloop-cuda:$TAG")
  for n in "${refs[@]}"; do printf '%s %s\n' "$n" "$(podman image inspect --format '{{.Id}}' "$n")"; done \
    > "$IMAGES_DIR/images.txt.part"
  mv "$IMAGES_DIR/images.txt.part" "$IMAGES_DIR/images.txt"
  podman images --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep -E '^(ghcr.io/ctloop|localhost/)' | sort
}

case ${1:-} in
  bases) bases ;;
  system) system ;;
  build) build "${2:?image name}" ;;
  list) list ;;
  *) sed -n '2,8p' "$0" >&2; exit 2 ;;
esac
