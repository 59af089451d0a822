#!/bin/sh
# Entry point of every service of the raddeploy/airflow image (docker-compose.yaml).
# 1. Refuses to start while any setting still holds the example's placeholder: a known JWT
#    secret lets anyone who reaches the API mint an admin token, a known password is no password.
# 2. umask 027: what our services write is readable by the data dir's group, never by others.
set -eu
placeholders=$(env | grep -E '^[A-Za-z_][A-Za-z0-9_]*=(.*[^A-Za-z0-9])?change-me([^A-Za-z0-9].*)?$' | cut -d= -f1 || true)
if [ -n "$placeholders" ]; then
  for name in $placeholders; do
    echo "raddeploy: refusing to start: $name still holds the example's placeholder 'change-me'." >&2
  done
  echo "raddeploy: generate each secret (python3 -c 'import secrets; print(secrets.token_urlsafe(32))';" \
       "the Fernet key: see deploy/env.example), write it into .env, then docker-compose up -d again." >&2
  exit 78  # EX_CONFIG
fi
umask 027
exec "$@"
