#!/bin/sh
# Writes rendered/VARIANT.yaml for each overlay with kustomize (kubectl's built-in, or a
# standalone `kustomize` binary). tests/test_deploy.py validates these files and checks that they
# equal a fresh render, so re-run this after editing anything under base/, components/ or overlays/.
set -eu
cd "$(dirname "$0")"
if command -v kubectl >/dev/null 2>&1; then render="kubectl kustomize"; else render="kustomize build"; fi
for overlay in overlays/*/; do
  name=$(basename "$overlay")
  $render "$overlay" > "rendered/$name.yaml"
  echo "rendered/$name.yaml"
done
