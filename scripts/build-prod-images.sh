#!/usr/bin/env bash
# The images of the production stack (docker-compose.yaml), built the way an air-gapped
# hospital network builds them: no container registry and no package index at build time.
#
#   1. raddeploy/base-services:bookworm: a Debian made by debootstrap with what the services
#      need (python3 + venv, python3-ldap, dcmtk, postgresql, redis-server, tini), kept as
#      $CACHE/base-services-bookworm.tar;
#   2. a wheel house ($CACHE/wheelhouse): this project and every pinned dependency
#      (constraints.txt), as wheels made on this host;
#   3. raddeploy/airflow (deploy/airflow/Dockerfile, pip --no-index from the wheel house),
#      raddeploy/postgres and raddeploy/redis, each FROM the base (BASE_IMAGE build argument);
#   4. raddeploy/busybox (the host's static busybox): the GPUs' network-namespace holders.
#
# --offline: make nothing from the network; the base tarball and the wheel house must be there
# already (copied in from a connected machine: docs/install-airgapped.md). --bundle FILE: also
# write FILE, a tarball of the two, for that copy. Idempotent: an image whose inputs did not
# change is not rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib-images.sh

offline="" bundle=""
while [ $# -gt 0 ]; do
  case "$1" in
    --offline) offline=1 ;;
    --bundle) bundle=$2; shift ;;
    *) echo "usage: $0 [--offline] [--bundle FILE]" >&2; exit 2 ;;
  esac
  shift
done

BASE=${RADDEPLOY_SERVICES_BASE_IMAGE:-raddeploy/base-services:bookworm}
WHEELS=${RADDEPLOY_WHEELHOUSE:-$CACHE/wheelhouse}
PY=${PYTHON:-.venv/bin/python}

if [ -n "$offline" ] && ! docker image inspect "$BASE" >/dev/null 2>&1 && [ ! -s "$CACHE/base-services-bookworm.tar" ]; then
  echo "images: --offline, and neither $BASE nor $CACHE/base-services-bookworm.tar is here: copy the tarball in" >&2
  exit 1
fi
debootstrap_image "$BASE" base-services-bookworm \
  python3,python3-venv,python3-ldap,ca-certificates,netbase,tini,dcmtk,postgresql,redis-server

# What the airflow image is made of: the project's sources and pins, the DAG file, deploy/airflow.
sources=(pyproject.toml constraints.txt README.md raddeploy_provider listener raddeploy dags deploy/airflow)
digest=$(inputs_digest "$BASE" "$(docker image inspect -f '{{.Id}}' "$BASE")" "${sources[@]}")
stamp="$WHEELS/.inputs"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$digest" ]; then
  if [ -n "$offline" ]; then
    [ -n "$(ls "$WHEELS"/raddeploy_provider-*.whl 2>/dev/null)" ] || {
      echo "images: --offline, and $WHEELS holds no raddeploy_provider wheel: copy the wheel house in" >&2; exit 1; }
  else
    echo "images: wheel house $WHEELS (this project and its pinned dependencies)"
    # Made afresh (the wheels of the last house are reused, not downloaded again), so it holds
    # exactly the pinned set: one version of each.
    rm -rf "$WHEELS.new" && mkdir -p "$WHEELS" "$WHEELS.new"
    "$PY" -m pip wheel -q --disable-pip-version-check -c constraints.txt --find-links "$WHEELS" -w "$WHEELS.new" '.[prod]' \
      2> >(grep -v -E "Location '|BuildBackendWarning|^\s*(!!|\*+|$)|Please |By 20|See https|corresp\(|editable|with strategy" >&2)
    rm -rf "$WHEELS" && mv "$WHEELS.new" "$WHEELS"
    echo "$digest" >"$stamp"
  fi
fi

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
mkdir -p "$context/deploy" "$context/wheels" "$context/project"
for wheel in "$WHEELS"/*.whl; do
  case "$(basename "$wheel")" in raddeploy_provider-*) to=project ;; *) to=wheels ;; esac
  ln "$wheel" "$context/$to/" 2>/dev/null || cp "$wheel" "$context/$to/"
done
cp -a dags "$context/dags"
cp -a deploy/airflow "$context/deploy/airflow"
build_if_changed raddeploy/airflow:latest "$digest" "$context" -f "$context/deploy/airflow/Dockerfile" \
  --build-arg BASE_IMAGE="$BASE"

for name in postgres redis; do
  build_if_changed "raddeploy/$name:latest" "$(inputs_digest "$BASE" "deploy/$name")" "deploy/$name" \
    --build-arg BASE_IMAGE="$BASE"
done

# raddeploy/busybox: the GPUs' network-namespace holders (RADDEPLOY_MODEL_NETNS_IMAGE) where models run.
if [ -x /bin/busybox ]; then
  busybox_image
else
  echo "images: WARNING: no /bin/busybox (Debian's busybox-static): raddeploy/busybox not built; each model" \
       "container then gets its own network sandbox (a slower start)" >&2
fi

if [ -n "$bundle" ]; then
  tar -C "$CACHE" -cf "$bundle" base-services-bookworm.tar "$(basename "$WHEELS")"
  echo "images: wrote $bundle (the base tarball and the wheel house, for an air-gapped host)"
fi
