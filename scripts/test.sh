#!/usr/bin/env bash
# The test suite: CPU only, tiny configs, a few minutes on 2 cores (two pytest workers). Sets up .venv first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadgroup tests "$@"
