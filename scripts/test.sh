#!/usr/bin/env bash
# The test suite: the linter and formatter (ruff, configured in .ruff.toml), then pytest on CPU with tiny
# configs, 10-13 minutes on 2 cores (two pytest workers). Sets up .venv first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadgroup tests "$@"
