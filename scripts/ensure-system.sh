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
# dciodvfy: an independent DICOM object validator the tests check model output with (raddeploy/rtcheck.py)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
# a real browser for the UI checks and the docs' screenshots (driven by the playwright wheel)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  echo "ensure-system: installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Packages whose install would start a system service we never use: tests and the benchmarks
# run their own instances with their own config and ports. A policy-rc.d forbids that start
# (the usual Debian way; kept if the machine has one), and under systemd it is not enabled at
# boot either. install_without_service PACKAGE SERVICE
install_without_service() {
  local package=$1 service=$2 made_policy="" status=0
  echo "ensure-system: installing $package (its system service left stopped)"
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  { [ -n "$updated" ] || $SUDO apt-get update -qq; } &&
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$package" >/dev/null || status=$?
  updated=1
  [ -z "$made_policy" ] || $SUDO rm -f /usr/sbin/policy-rc.d
  [ "$status" -eq 0 ] || { echo "ensure-system: installing $package failed" >&2; exit "$status"; }
  # invoke-rc.d honours the policy; without invoke-rc.d the postinst runs the init script itself
  [ ! -x "/etc/init.d/$service" ] || $SUDO "/etc/init.d/$service" stop >/dev/null 2>&1 || true
  [ ! -d /run/systemd/system ] || $SUDO systemctl disable "$service" >/dev/null 2>&1 || true
}
updated=""
[ ${#need[@]} -eq 0 ] || updated=1

# Orthanc: a real PACS peer for tests, and a receiver in bench/ingest.py (ports 4242 and 8042).
# Debian installs it as /usr/sbin/Orthanc, not on a normal user's PATH.
if ! command -v Orthanc >/dev/null 2>&1 && [ ! -x /usr/sbin/Orthanc ]; then
  install_without_service orthanc orthanc
fi

# PostgreSQL's server: the study index's second backend (RADDEPLOY_INDEX_URL), which the tests
# and bench/ingest.py run in a cluster of their own (tests/postgres.py; port 5432 stays free).
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  install_without_service postgresql postgresql
fi

# slapd (OpenLDAP): a real directory for the production stack's LDAP sign-in test, run as an
# instance of the test's own (tests/directory.py).
if [ ! -x /usr/sbin/slapd ]; then
  install_without_service slapd slapd
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
