#!/usr/bin/env bash
# Build the local images the example flow and the tests run, without any container registry:
# a minimal Debian made with debootstrap becomes the base image (docker import), and each
# model image under images/ is built FROM it (its Dockerfile takes the base as BASE_IMAGE).
# Idempotent: an image that exists with the current Dockerfile inputs is not rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/lib-images.sh
BASE_IMAGE=${RADDEPLOY_BASE_IMAGE:-raddeploy/base:bookworm}
debootstrap_image "$BASE_IMAGE" base-bookworm python3,python3-pydicom,python3-numpy

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
  build_if_changed "raddeploy/$(basename "$dir"):latest" "$(inputs_digest "$BASE_IMAGE" "$dir")" \
    "$dir" --build-arg BASE_IMAGE="$BASE_IMAGE"
done
