#!/usr/bin/env bash
# Rebuild the chat page (bus/web/static/) from web/src with the locked npm packages.
# Needs Node 20+ and npm; commit bus/web/static afterwards. install.sh never runs this.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
npm ci --no-audit --no-fund
node build.mjs
