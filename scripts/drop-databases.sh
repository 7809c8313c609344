#!/usr/bin/env bash
# drop-databases.sh NAME...: drop these PostgreSQL databases on 127.0.0.1:5432 if they exist.
# A NAME with % is a LIKE pattern (e.g. test_modelfleet_gw%). Used by `make clean`; does
# nothing (and says so) when PostgreSQL is not running.
set -euo pipefail
PSQL=(psql -h 127.0.0.1 -p 5432 -U "${PGUSER:-postgres}" -d postgres -v ON_ERROR_STOP=1 -qAt)
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "PostgreSQL is not running on 127.0.0.1:5432: no database dropped."
  exit 0
fi
for name in "$@"; do
  if [[ $name == *%* ]]; then  # LIKE: only % is a wildcard here, _ is literal
    name=${name//_/\\_}
    mapfile -t found < <("${PSQL[@]}" -c "SELECT datname FROM pg_database WHERE datname LIKE '$name'")
  else
    mapfile -t found < <("${PSQL[@]}" -c "SELECT datname FROM pg_database WHERE datname = '$name'")
  fi
  for db in "${found[@]}"; do
    [[ -n $db ]] || continue
    "${PSQL[@]}" -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)"
    echo "Dropped database $db."
  done
done
