#!/usr/bin/env bash
# Install the Debian packages the product and its tests need, and make sure a Docker engine
# is answering. Idempotent and quick when everything is already there; needs root (or sudo).
set -euo pipefail

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

need=()
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v storescu >/dev/null 2>&1 || need+=(dcmtk)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
[ -x /bin/busybox ] || need+=(busybox-static)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
  echo "ensure-system: installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

# A Docker engine: use the one that answers, else start Debian's dockerd (no systemd here).
if ! docker info >/dev/null 2>&1; then
  echo "ensure-system: starting dockerd (log: /var/log/raddeploy-dockerd.log)"
  $SUDO setsid nohup dockerd >/var/log/raddeploy-dockerd.log 2>&1 < /dev/null &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || {
    echo "ensure-system: dockerd did not come up; see /var/log/raddeploy-dockerd.log" >&2
    exit 1
  }
fi
