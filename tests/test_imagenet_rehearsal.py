"""The ImageNet rehearsal, cut to one of DiT-XL/2's blocks: every command of docs/imagenet.md's
recipe runs at the real width and image size with only counts and paths changed, and a command the
rehearsal does not know stops it."""

import json
import math
import os

import numpy as np
import pytest
import torch
from helpers import run_script

from ard.cli import UserError
from benchmarks.imagenet_rehearsal import Plan, plan_stages, recipe_commands

pytestmark = pytest.mark.xdist_group("test_imagenet_rehearsal")
# What a rehearsal may change: counts, intervals, paths, one process for torchrun's eight, the
# history layers a cut DiT cannot hold, and what it adds (counts, an output, the checksum skip).
CHANGES = {
    "process count",
    "count",
    "interval",
    "path",
    "depth",
    "added: count",
    "added: interval",
    "added: output",
    "added: random weights",
}


def test_the_cut_rehearsal_runs_every_stage_and_each_writes_what_it_should(tmp_path):
    out = tmp_path / "rehearsal"
    run_script(
        ["-m", "benchmarks.imagenet_rehearsal", "--out", str(out), "--depth", "1"]
        + ["--trajectories", "1", "--samples", "4"],
        timeout=1800,  # about 400 CPU s; a loaded machine has taken 10.5 minutes
    )
    report = json.loads((out / "rehearsal.json").read_text())
    names = ["inputs", "trajectories", "regression", "gan", "sample", "evaluator"]
    assert [s["stage"] for s in report["stages"]] == names
    assert all(s["exit_code"] == 0 and s["peak_rss_bytes"] > 0 for s in report["stages"])
    assert {c["kind"] for c in report["changes"]} <= CHANGES, report["changes"]
    kept = {(c["stage"], c["flag"]) for c in report["changes"]}
    assert not kept & {("trajectories", "--precision"), ("trajectories", "--save-steps")}
    products = report["products"]
    manifest = json.loads(open(os.path.join(products["store"], "manifest.json")).read())
    assert manifest["save_steps"] == [0, 6, 12, 18, 25] and manifest["precision"] == "bf16"
    for name in ("regression_checkpoint", "gan_checkpoint"):
        assert torch.load(products[name], map_location="cpu", weights_only=True)["step"] == 2
    # The GAN stage's last step ran the student's adversarial loss (its warm-up cut to one step).
    gan_run = os.path.dirname(os.path.dirname(products["gan_checkpoint"]))
    with open(os.path.join(gan_run, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    # (one record, the mean of both steps: the first's are 0)
    assert logged[-1]["step"] == 2 and logged[-1]["grad_gan"] > 0 and logged[-1]["gan_weight"] > 0
    with np.load(products["samples"], allow_pickle=False) as samples:
        images = samples["arr_0"]
    assert images.shape == (4, 256, 256, 3) and images.dtype == np.uint8
    figures = json.loads(open(products["evaluator_json"]).read())
    assert math.isfinite(figures["fid"]) and figures["weights_checksum_skipped"]
    assert "WARNING: --skip-weights-checksum" in (out / "logs" / "evaluator.log").read_text()
    extrapolation = report["extrapolation"]
    assert extrapolation["trajectories"]["count"] == 1_200_000
    assert extrapolation["gan"]["gpu_hours"] is None  # never measured on a GPU
    assert (out / "rehearsal.md").read_text().startswith("# ImageNet recipe rehearsal")


def test_a_new_flag_or_command_in_the_recipe_stops_the_rehearsal(tmp_path):
    plan = Plan(tmp_path, 1, 1, 4)
    commands = recipe_commands()
    _, skipped = plan_stages(commands, plan)  # the page as it is
    assert [s["command"].split()[:2] for s in skipped] == [["python", "sample.py"]]
    for i, words in enumerate(commands):
        if words[:2] == ["python", "sample.py"]:  # not rehearsed: said so in the output
            continue
        with pytest.raises(UserError, match="--new-flag"):
            plan_stages(commands[:i] + [words + ["--new-flag", "1"]] + commands[i + 1 :], plan)
    with pytest.raises(UserError, match="does not know"):
        plan_stages(commands + [["python", "train.py", "--model", "DiT-XL/2"]], plan)
