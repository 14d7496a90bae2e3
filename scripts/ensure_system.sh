#!/usr/bin/env bash
# Makes sure the system tools `make run` / `make test` need are there: python3-venv and redis-server.
# Installs them with apt-get when running as root on Debian/Ubuntu; elsewhere says exactly how to get them.
set -euo pipefail
need_redis="${1:-yes}"

have_venv() { python3 -c 'import ensurepip, venv' >/dev/null 2>&1; }
is_debian_root() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }

missing=()
have_venv || missing+=(python3-venv)
if [ "$need_redis" = yes ] && ! command -v redis-server >/dev/null 2>&1; then missing+=(redis-server); fi
[ ${#missing[@]} -eq 0 ] && exit 0

if is_debian_root; then
  echo "installing ${missing[*]} with apt-get" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  exit 0
fi
echo "missing: ${missing[*]}" >&2
echo "  Debian/Ubuntu: sudo apt-get install -y ${missing[*]}" >&2
echo "  Fedora/RHEL:   sudo dnf install -y python3 redis" >&2
echo "  macOS:         brew install python@3.11 redis" >&2
echo "  or set REDIS_URL=redis://host:port/0 to use an existing Redis (make run only)" >&2
exit 1
