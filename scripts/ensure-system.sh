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

# Orthanc (a real PACS peer for tests, and a receiver in bench/ingest.py), on its own: its
# package would start its system service (ports 4242 and 8042); tests and the benchmark run
# their own instances with their own config and ports, so a policy-rc.d forbids that start
# (the usual Debian way; kept if the machine has one), and under systemd it is not enabled
# at boot either.
# Debian installs it as /usr/sbin/Orthanc, not on a normal user's PATH.
if ! command -v Orthanc >/dev/null 2>&1 && [ ! -x /usr/sbin/Orthanc ]; then
  echo "ensure-system: installing orthanc (its system service left stopped)"
  made_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  status=0
  { [ ${#need[@]} -gt 0 ] || $SUDO apt-get update -qq; } &&
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq orthanc >/dev/null || status=$?
  [ -z "$made_policy" ] || $SUDO rm -f /usr/sbin/policy-rc.d
  [ "$status" -eq 0 ] || { echo "ensure-system: installing orthanc failed" >&2; exit "$status"; }
  # invoke-rc.d honours the policy; without invoke-rc.d the postinst runs the init script itself
  [ ! -x /etc/init.d/orthanc ] || $SUDO /etc/init.d/orthanc stop >/dev/null 2>&1 || true
  [ ! -d /run/systemd/system ] || $SUDO systemctl disable orthanc >/dev/null 2>&1 || true
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
