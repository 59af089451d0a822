#!/usr/bin/env bash
# Build the local images the example flow and the tests run, without any container registry:
# a minimal Debian made with debootstrap becomes the base image (docker import), and each
# model image under images/ is built FROM it (its Dockerfile takes the base as BASE_IMAGE).
# Model images that install wheels get them from this host's pip download (see below).
# Idempotent: an image that exists with the current Dockerfile inputs is not rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/lib-images.sh
BASE_IMAGE=${RADDEPLOY_BASE_IMAGE:-raddeploy/base:bookworm}
# Debian's python3, pydicom 2.3 and numpy, and pip for the images that install wheels; no codec
# (no Pillow, no GDCM): the tests' "model without codecs" is a model on this base.
debootstrap_image "$BASE_IMAGE" base-bookworm \
  python3,python3-pydicom,python3-numpy,python3-pip,python3-packaging,python3-typing-extensions

# A busybox-only image (a shell and coreutils, 1 MB): plumbing tests, and the GPUs' network-namespace
# holders (RADDEPLOY_MODEL_NETNS_IMAGE).
busybox_image

# A model image with a requirements.txt (images/body-contour: scipy, highdicom) installs those
# wheels offline: they are downloaded on this host into its wheels/ folder first (once; again
# only when requirements.txt changes). Without them (no package index) that image is left out,
# with a warning, and the others are still built.
base_id=$(docker image inspect -f '{{.Id}}' "$BASE_IMAGE")  # a new base rebuilds every model image
for dir in images/*/; do
  if [ -f "${dir}requirements.txt" ]; then
    download_wheels "${dir}requirements.txt" "${dir}wheels" || {
      echo "images: WARNING: raddeploy/$(basename "$dir"):latest not built (its wheels are missing)" >&2; continue; }
  fi
  build_if_changed "raddeploy/$(basename "$dir"):latest" "$(inputs_digest "$BASE_IMAGE" "$base_id" "$dir")" \
    "$dir" --build-arg BASE_IMAGE="$BASE_IMAGE"
done
