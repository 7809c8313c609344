#!/usr/bin/env bash
# Install the Debian packages Modelfleet needs, only when they are missing.
set -euo pipefail

declare -A want=(
  [redis-server]=redis-server
  [mosquitto]=mosquitto
  [zstd]=zstd
  [pg_ctlcluster]=postgresql
  [python3]=python3
  # the browser tests (tests/browser) drive Debian's own Chromium through its driver
  [chromium]=chromium
  [chromedriver]=chromium-driver
)
missing=()
for cmd in "${!want[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${want[$cmd]}")
done
python3 -c "import venv, ensurepip" 2>/dev/null || missing+=(python3-venv)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "Installing missing system packages: ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
