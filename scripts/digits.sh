#!/usr/bin/env bash
# The main job on the embedded digits default, on CPU: teacher, trajectories, step-distillation and ARD
# students, samples, evaluation and the results table (python -m experiments.digits). Sets up .venv first.
# Extra arguments go to experiments/digits.py: --quick (smoke test, tiny budgets), --headroom, --history
# (depth of history and history noise), --flow (a flow-matching teacher) or --full (seeds, targets, GAN,
# 2-5 steps, flow); the figures go to runs/digits/figures/, and --assets-dir assets also refreshes the
# README's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m experiments.digits "$@"
