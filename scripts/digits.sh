#!/usr/bin/env bash
# The main job on the embedded digits default, on CPU; finished stages are reused when run again.
# Stage 1 (this issue): train the tiny DiT teacher, draw a DDIM-25 CFG-1.5 sample grid and measure
# how often a classifier trained on real digits recognises the requested class.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=.venv/bin/python
RUN=${RUN:-runs/digits}
TEACHER_STEPS=${TEACHER_STEPS:-2000}
TEACHER=$RUN/teacher/checkpoints/$(printf %07d "$TEACHER_STEPS").pt

if [ ! -f "$TEACHER" ]; then
    $PY train.py --model DiT-T/2 --data digits --max-steps "$TEACHER_STEPS" --lr 1e-3 --ema-decay 0.995 \
        --log-every 250 --run-dir "$RUN/teacher"
fi
$PY sample.py --ckpt "$TEACHER" --num-sampling-steps 25 --cfg-scale 1.5 --out "$RUN/teacher_ddim25_cfg1.5.png"
$PY classify_digits.py --ckpt "$TEACHER" --num-sampling-steps 25 --cfg-scale 1.5 | tee "$RUN/teacher_class_accuracy.txt"
