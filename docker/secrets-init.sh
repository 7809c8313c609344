#!/bin/sh
# Make what docker/compose.yaml expects beside it and the repository does not hold:
#   secrets/  one random secret per file (Django, PostgreSQL, the broker's three accounts,
#             the S3 keys); the directory is 0700, the files 0644 so that the containers'
#             unprivileged user can read the copies compose mounts under /run/secrets
#   .env      from env.example, with the database password filled in (mode 0600)
# Files already there are kept: run it again after adding a secret, never to rotate one.
# Usage: docker/secrets-init.sh [DIR]   (DIR defaults to the directory of this script)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
target=${1:-$here}
umask 077
mkdir -p "$target/secrets"
chmod 0700 "$target/secrets"

random_hex() {  # random_hex BYTES: that many random bytes as hex
  od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'
}

secret() {  # secret NAME VALUE: write it unless the file exists
  if [ ! -s "$target/secrets/$1" ]; then
    printf '%s' "$2" >"$target/secrets/$1"
    chmod 0644 "$target/secrets/$1"
    echo "created secrets/$1"
  fi
}

secret secret_key "$(random_hex 48)"
secret postgres_password "$(random_hex 24)"
secret mqtt_admin_password "$(random_hex 24)"
secret mqtt_publisher_password "$(random_hex 24)"
secret mqtt_ingest_password "$(random_hex 24)"
secret s3_access_key "modelfleet-$(random_hex 6)"
secret s3_secret_key "$(random_hex 24)"

if [ ! -e "$target/.env" ]; then
  sed "s/@POSTGRES_PASSWORD@/$(cat "$target/secrets/postgres_password")/" "$here/env.example" >"$target/.env"
  chmod 0600 "$target/.env"
  echo "created .env: set the host names in it before the first start"
fi
