"""Teacher training: checkpoints, exact resume, multi-process runs."""

import copy
import json
import os
import pickle

import pytest
import torch
from helpers import run_script, run_script_expect_failure

from ard.checkpoints import infer_dit_config, load_checkpoint, load_model, save_checkpoint
from ard.data import load_digits
from ard.seeding import step_seed
from ard.training import StepBatchSampler, update_ema
from diffusion import create_diffusion
from models import DiT_models

TINY = ["--model", "DiT-T/4", "--global-batch-size", "16", "--log-every", "1", "--ema-decay", "0.9"]

# one worker runs the module, its fixtures once
pytestmark = pytest.mark.xdist_group("test_training")


def test_checkpoint_round_trips_with_weights_only(tmp_path):
    model = DiT_models["DiT-T/2"](input_size=8, in_channels=1, num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([3, 4])).sum().backward()
    opt.step()
    state = {
        "model": model.state_dict(),
        "opt": opt.state_dict(),
        "step": 7,
        "args": {"lr": 1e-4, "data": "digits"},
        "config": {"kind": "dit", "model": "DiT-T/2"},
    }
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), state)
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # the temporary file was renamed
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 7 and loaded["args"] == state["args"]
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v)
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-4)
    opt2.load_state_dict(loaded["opt"])


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _Payload()}, f)
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(str(path))


def test_official_style_bare_state_dict_loads_strictly_with_inferred_config(tmp_path):
    torch.manual_seed(0)
    with torch.device("meta"):
        meta = DiT_models["DiT-S/8"]()
    config = infer_dit_config(meta.state_dict())
    assert config == dict(
        model="DiT-S/8", input_size=32, in_channels=4, num_classes=1000, learn_sigma=True
    )
    model = DiT_models["DiT-S/8"](input_size=16, num_classes=7)
    path = tmp_path / "DiT-S-8-official.pt"
    torch.save(model.state_dict(), path)  # official checkpoints are bare state dicts
    loaded, config = load_model(str(path), kind="dit")
    assert (
        config["model"] == "DiT-S/8" and config["input_size"] == 16 and config["num_classes"] == 7
    )
    assert config["space"] == "latent"
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A teacher trained for 6 steps, and one trained for 3 steps then resumed to 6."""
    root = tmp_path_factory.mktemp("teacher_runs")
    full, part = str(root / "full"), str(root / "part")
    run_script(["train.py", *TINY, "--max-steps", "6", "--run-dir", full])
    run_script(["train.py", *TINY, "--max-steps", "3", "--run-dir", part])
    run_script(
        [
            "train.py",
            *TINY,
            "--max-steps",
            "6",
            "--resume",
            os.path.join(part, "checkpoints", "0000003.pt"),
        ]
    )
    return full, part


def test_resume_after_k_of_n_steps_equals_n_uninterrupted_steps(runs):
    full, part = runs
    a = load_checkpoint(os.path.join(full, "checkpoints", "0000006.pt"))
    b = load_checkpoint(os.path.join(part, "checkpoints", "0000006.pt"))
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f"{key}.{name} differs after resuming"
    for pid, state in a["opt"]["state"].items():
        assert torch.equal(state["exp_avg"], b["opt"]["state"][pid]["exp_avg"])
    assert [m["loss"] for m in read_metrics(full)][3:] == [m["loss"] for m in read_metrics(part)][
        3:
    ]


def test_a_checkpoint_from_before_a_flag_existed_resumes_with_the_flags_old_behaviour(
    runs, tmp_path
):
    ckpt = load_checkpoint(os.path.join(runs[1], "checkpoints", "0000003.pt"))
    for added in ("objective", "lr_schedule", "warmup_steps"):
        del ckpt["args"][added]
    old = tmp_path / "run" / "checkpoints" / "0000003.pt"
    os.makedirs(old.parent)
    save_checkpoint(str(old), ckpt)
    run_script(["train.py", *TINY, "--max-steps", "4", "--resume", str(old)])
    assert "--objective 'ddpm' (now 'flow')" in run_script_expect_failure(
        ["train.py", *TINY, "--objective", "flow", "--max-steps", "4", "--resume", str(old)]
    )


def test_resume_with_other_settings_is_refused(runs):
    out = run_script_expect_failure(
        [
            "train.py",
            *TINY[:2],
            "--global-batch-size",
            "32",
            "--max-steps",
            "8",
            "--resume",
            os.path.join(runs[1], "checkpoints", "0000003.pt"),
        ]
    )
    assert "--global-batch-size 16" in out and "(now 32)" in out


def test_torchrun_two_processes_logs_loss_averaged_over_ranks(tmp_path):
    run = str(tmp_path / "ddp")
    run_script(["train.py", *TINY, "--max-steps", "2", "--run-dir", run], nproc=2)
    logged = read_metrics(run)[0]["loss"]
    # Recompute each rank's first-step loss: same initial weights, data slice and per-step seed.
    torch.manual_seed(0)
    model = DiT_models["DiT-T/4"](input_size=8, in_channels=1, num_classes=10).train()
    diffusion = create_diffusion("")
    x, y = load_digits("train")
    losses = []
    for rank in range(2):
        indices = next(iter(StepBatchSampler(len(x), 16, 0, rank, 2, 0, 1)))
        torch.manual_seed(step_seed(0, 0, rank))
        t = torch.randint(0, diffusion.num_timesteps, (len(indices),))
        loss = diffusion.training_losses(model, x[indices], t, dict(y=y[indices]))["loss"]
        losses.append(loss.mean().item())
    assert abs(losses[0] - losses[1]) > 1e-4  # the ranks do see different data
    assert logged == pytest.approx(sum(losses) / 2, rel=1e-5)


def test_step_batch_sampler_splits_global_batches_over_ranks_and_resumes_mid_epoch():
    whole = list(StepBatchSampler(50, 8, 3, 0, 1, 0, 12))
    ranks = [list(StepBatchSampler(50, 8, 3, r, 2, 0, 12)) for r in range(2)]
    for step in range(12):
        assert ranks[0][step] + ranks[1][step] == whole[step]
    assert list(StepBatchSampler(50, 8, 3, 0, 1, 7, 12)) == whole[7:]
    epoch = [i for batch in whole[:6] for i in batch]  # 6 steps per epoch of 50 items
    assert len(set(epoch)) == 48


def test_ema_update_is_the_per_tensor_average_bit_for_bit_and_copies_buffers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.Linear(7, 3)
    )
    ema = copy.deepcopy(model)
    model(torch.randn(4, 5))  # moves the model's batch-norm buffers away from the EMA copy's
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(torch.randn_like(p))
        expected = [
            a.clone().mul_(0.9).add_(p, alpha=1 - 0.9)
            for a, p in zip(ema.parameters(), model.parameters())
        ]
    update_ema(ema, model, decay=0.9)
    assert all(torch.equal(a, e) for a, e in zip(ema.parameters(), expected))
    assert all(torch.equal(a, b) for a, b in zip(ema.buffers(), model.buffers()))
    update_ema(ema, model, decay=0)
    assert all(torch.equal(a, p) for a, p in zip(ema.parameters(), model.parameters()))
