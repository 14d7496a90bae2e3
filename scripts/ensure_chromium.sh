#!/usr/bin/env bash
# Makes sure headless Chromium and its WebDriver are there for the playground's browser test
# (tests/e2e/test_playground.py drives /usr/bin/chromium through /usr/bin/chromedriver). Installs Debian's
# `chromium` and `chromium-driver` with apt-get when running as root on Debian/Ubuntu; elsewhere it says how,
# and exits 0 so that `make test` goes on (the browser test then skips, naming what is missing).
set -euo pipefail

missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} with apt-get (for the playground's browser test)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
  exit 0
fi
echo "missing: ${missing[*]}: the playground's browser test will be skipped" >&2
echo "  Debian/Ubuntu: sudo apt-get install -y chromium chromium-driver" >&2
exit 0
