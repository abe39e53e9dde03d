#!/bin/bash
# The whole test suite: install what is needed, lint, type-check, run every tier.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash packaging/dev/bootstrap.sh
echo "== ruff"; .venv/bin/ruff check milters tests bench
echo "== mypy"; .venv/bin/mypy
echo "== pytest"; .venv/bin/python -m pytest -q "$@"
