#!/usr/bin/env bash
# Build the local images the example flow and the tests run, without any container registry:
# a minimal Debian made with debootstrap becomes the base image (docker import), and each
# model image under images/ is built FROM it (its Dockerfile takes the base as BASE_IMAGE).
# Idempotent: an image that exists with the current Dockerfile inputs is not rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=${RADDEPLOY_BASE_IMAGE:-raddeploy/base:bookworm}
CACHE=${RADDEPLOY_CACHE:-$HOME/.cache/raddeploy}
mkdir -p "$CACHE"

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  tarball="$CACHE/base-bookworm.tar"
  if [ ! -s "$tarball" ]; then
    root=$(mktemp -d)
    echo "build-images: debootstrap of a minimal Debian with python3, pydicom, numpy (~1 min)"
    # The same Debian mirror apt uses on this host (override with RADDEPLOY_DEBIAN_MIRROR).
    mirror=${RADDEPLOY_DEBIAN_MIRROR:-$(cat /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
      | grep -oE 'https?://[^ ]+/debian/?( |$)' | head -n1 | tr -d ' ' || true)}
    debootstrap --variant=minbase --include=python3,python3-pydicom,python3-numpy \
      bookworm "$root" $mirror >"$CACHE/debootstrap.log" 2>&1 || {
        echo "build-images: debootstrap failed; see $CACHE/debootstrap.log" >&2; exit 1; }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$root"
  fi
  docker import "$tarball" "$BASE_IMAGE" >/dev/null
fi

# A busybox-only image for plumbing tests (a shell and coreutils, 1 MB).
if ! docker image inspect raddeploy/busybox:latest >/dev/null 2>&1; then
  root=$(mktemp -d)
  mkdir -p "$root/bin"
  cp /bin/busybox "$root/bin/busybox"
  for applet in $("$root/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
  done
  tar -C "$root" -c . | docker import - raddeploy/busybox:latest >/dev/null
  rm -rf "$root"
fi

for dir in images/*/; do
  name=$(basename "$dir")
  tag="raddeploy/$name:latest"
  # Rebuild only when the image's inputs changed: their hash is a label on the image.
  digest=$( (echo "$BASE_IMAGE"; find "$dir" -type f | sort | xargs cat) | sha256sum | cut -c1-16)
  have=$(docker image inspect -f '{{ index .Config.Labels "org.raddeploy.inputs" }}' "$tag" 2>/dev/null || true)
  if [ "$have" != "$digest" ]; then
    echo "build-images: building $tag"
    DOCKER_BUILDKIT=0 docker build -q --build-arg BASE_IMAGE="$BASE_IMAGE" --label "org.raddeploy.inputs=$digest" \
      -t "$tag" "$dir" >/dev/null
  fi
done
