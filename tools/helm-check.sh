#!/usr/bin/env bash
# make helm-check: the Helm chart, offline.
#   1. helm lint --strict over the default values and each k8s/examples/*.yaml
#   2. helm template of each, every document validated with kubernetes-validate --strict
#      (custom resources against tools/crd-schemas), plus k8s/prerequisites/*.yaml
#   3. pytest tests/helm: the chart's invariants over the rendered output
set -euo pipefail
cd "$(dirname "$0")/.."

HELM=${HELM:-.ctloop/tools/bin/helm}
PY=${PY:-.venv/bin/python}
KUBE_VERSION=${KUBE_VERSION:-1.37.0}   # the newest Kubernetes kubernetes-validate ships schemas for
CHART=helm/ctloop
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
start=$(date +%s)

values=("")
for f in k8s/examples/*.yaml; do values+=("$f"); done

for v in "${values[@]}"; do
  name=$(basename "${v:-default}" .yaml)
  args=(--kube-version "$KUBE_VERSION" --namespace ctloop)
  [ -n "$v" ] && args+=(-f "$v")
  "$HELM" lint --strict "$CHART" "${args[@]}" >"$OUT/lint-$name.txt" 2>&1 \
    || { cat "$OUT/lint-$name.txt"; echo "helm lint failed: $name"; exit 1; }
  "$HELM" template ctloop "$CHART" "${args[@]}" >"$OUT/$name.yaml"
  echo "lint + template ok: $name ($(grep -c '^kind:' "$OUT/$name.yaml") objects)"
done

"$PY" tools/validate_manifests.py --kubernetes-version "$KUBE_VERSION" \
  "$OUT"/*.yaml k8s/prerequisites/*.yaml

HELM="$HELM" KUBE_VERSION="$KUBE_VERSION" "$PY" -m pytest -q -p no:cacheprovider tests/helm
echo "helm-check passed in $(( $(date +%s) - start ))s"
