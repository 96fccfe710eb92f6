#!/usr/bin/env bash
# Run the shipped recipes on the bundled model and keep their reports under reports/recipes/.
# (The checkpoints stay in runs/: hundreds of MB each, not for the repository.)
#   bash benchmarks/recipe_reports.sh
set -euo pipefail
cd "$(dirname "$0")/.."
recipes=(default drop-quarter-layers-causal prune-third-heads task-aware-arithmetic bits-4-8-mix combined)
paths=()
for name in "${recipes[@]}"; do paths+=("recipes/$name.yaml"); done
mi-opt compare-recipes "${paths[@]}" --out runs --threads 2
for name in "${recipes[@]}" comparison; do
  mkdir -p "reports/recipes/$name"
  find "runs/$name" -maxdepth 1 -type f \( -name '*.md' -o -name '*.html' -o -name '*.png' -o -name '*.json' -o -name '*.yaml' \) \
    -exec cp {} "reports/recipes/$name/" \;
  [ -f "runs/$name/checkpoint/README.md" ] && cp "runs/$name/checkpoint/README.md" "reports/recipes/$name/model-card.md"
done
echo "reports in reports/recipes/"
