#!/usr/bin/env bash
# Install the pinned Node tools (tools/node/package-lock.json: Redocly CLI, which lints openapi/openapi.json, and
# @kubernetes-models/keda, which validates the KEDA objects of deploy/kubernetes)
# into tools/node/node_modules when they are missing or older than the lockfile. Without npm it says so and
# exits 0: the tests that need the tools skip with that reason.
set -euo pipefail
cd "$(dirname "$0")/../tools/node"
export REDOCLY_TELEMETRY=off NPM_CONFIG_UPDATE_NOTIFIER=false
if [[ -x node_modules/.bin/redocly && ! package-lock.json -nt node_modules/.package-lock.json ]]; then
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "ensure_node_tools: npm is not installed; the OpenAPI lint test will be skipped" >&2
  exit 0
fi
npm ci --no-audit --no-fund --loglevel=error
