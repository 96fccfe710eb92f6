#!/usr/bin/env bash
# Run the shipped recipes that share one evaluation setting (every item of the five tasks) on the
# bundled model, compare them, and keep their reports under reports/recipes/.
#   bash benchmarks/recipe_reports.sh
# About 3.5 hours on 2 cores (a full evaluation of one model takes about half an hour). Rerun the
# same command after an interruption: finished stages, and finished tasks inside an evaluation,
# are reused from runs/. The quickstart (recipes/default.yaml, a quick 24-item evaluation) is
# reported by its own run: mi-opt run recipes/default.yaml --out runs.
# (The checkpoints stay in runs/: hundreds of MB each, not for the repository.)
set -euo pipefail
cd "$(dirname "$0")/.."
recipes=(drop-quarter-layers drop-quarter-layers-causal prune-third-heads task-aware-arithmetic bits-4-8-mix combined)
paths=()
for name in "${recipes[@]}"; do paths+=("recipes/$name.yaml"); done
mi-opt compare-recipes "${paths[@]}" --out runs --threads 2
for name in "${recipes[@]}" comparison; do
  rm -rf "reports/recipes/$name"
  mkdir -p "reports/recipes/$name"
  find "runs/$name" -maxdepth 1 -type f \( -name '*.md' -o -name '*.html' -o -name '*.png' -o -name '*.json' -o -name '*.yaml' \) \
    -exec cp {} "reports/recipes/$name/" \;
  if [ -f "runs/$name/checkpoint/README.md" ]; then cp "runs/$name/checkpoint/README.md" "reports/recipes/$name/model-card.md"; fi
done
echo "reports in reports/recipes/"
