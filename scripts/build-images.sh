#!/usr/bin/env bash
# Build the local images the example flow and the tests run, without any container registry:
# a minimal Debian made with debootstrap becomes the base image (docker import), and each
# model image under images/ is built FROM it (its Dockerfile takes the base as BASE_IMAGE).
# Model images that install wheels get a second base with pip (see below).
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

# A model image with a requirements.txt (images/body-contour: scipy, highdicom) is built FROM a
# base that also has pip, and installs those wheels offline: they are downloaded on this host
# into its wheels/ folder first (once; again only when requirements.txt changes). Without them
# (no package index) that image is left out, with a warning, and the others are still built.
PIP_BASE_IMAGE=${RADDEPLOY_PIP_BASE_IMAGE:-raddeploy/base-pip:bookworm}
PIP_BASE_PACKAGES=python3,python3-pip,python3-numpy,python3-pydicom,python3-pil,python3-packaging,python3-typing-extensions

for dir in images/*/; do
  base=$BASE_IMAGE
  if [ -f "${dir}requirements.txt" ]; then
    debootstrap_image "$PIP_BASE_IMAGE" base-pip-bookworm "$PIP_BASE_PACKAGES"
    download_wheels "${dir}requirements.txt" "${dir}wheels" || {
      echo "images: WARNING: raddeploy/$(basename "$dir"):latest not built (its wheels are missing)" >&2; continue; }
    base=$PIP_BASE_IMAGE
  fi
  build_if_changed "raddeploy/$(basename "$dir"):latest" "$(inputs_digest "$base" "$dir")" \
    "$dir" --build-arg BASE_IMAGE="$base"
done
