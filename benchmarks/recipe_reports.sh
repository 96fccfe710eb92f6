#!/usr/bin/env bash
# Run the shipped recipes on the bundled model and keep their reports under reports/recipes/.
#   bash benchmarks/recipe_reports.sh              # the six recipes that share one evaluation
#   bash benchmarks/recipe_reports.sh --quickstart # the quickstart (recipes/default.yaml) alone
# The six (every item of the five tasks) are compared in one table (reports/recipes/comparison/);
# about 65 minutes on 2 cores. The quickstart has its own quicker evaluation (24 items per task),
# so it is reported by its own run (about 10 minutes). Rerun the same command after an
# interruption: finished stages, and finished tasks inside an evaluation, are reused from runs/.
# Run nothing else meanwhile: each report's speed rows come from A/B rounds that say when other
# processes took CPU time. (The checkpoints stay in runs/: hundreds of MB each, not for the repository.)
set -euo pipefail
cd "$(dirname "$0")/.."

keep_report() {  # runs/NAME -> reports/recipes/NAME (text, plots, JSON; the model card, not the weights)
  local name=$1
  rm -rf "reports/recipes/$name"
  mkdir -p "reports/recipes/$name"
  find "runs/$name" -maxdepth 1 -type f \( -name '*.md' -o -name '*.html' -o -name '*.png' -o -name '*.json' -o -name '*.yaml' \) \
    -exec cp {} "reports/recipes/$name/" \;
  if [ -f "runs/$name/checkpoint/README.md" ]; then cp "runs/$name/checkpoint/README.md" "reports/recipes/$name/model-card.md"; fi
}

if [ "${1:-}" = "--quickstart" ]; then
  mi-opt run recipes/default.yaml --out runs
  keep_report default
else
  recipes=(drop-quarter-layers drop-quarter-layers-causal prune-third-heads task-aware-arithmetic bits-4-8-mix combined)
  paths=()
  for name in "${recipes[@]}"; do paths+=("recipes/$name.yaml"); done
  mi-opt compare-recipes "${paths[@]}" --out runs --threads 2
  for name in "${recipes[@]}" comparison; do keep_report "$name"; done
fi
echo "reports in reports/recipes/"
