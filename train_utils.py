"""Training helpers shared by train.py and train_ard.py: EMA, the run folder, its logger and a
step-indexed data order that makes resumption exact."""

import json
import logging
import os
from collections import OrderedDict
from glob import glob

import torch

import dist_util


@torch.no_grad()
def update_ema(ema_model, model, decay=0.9999):
    """Steps the EMA model towards the current model; buffers are copied."""
    ema_params = OrderedDict(ema_model.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)
    ema_buffers = OrderedDict(ema_model.named_buffers())
    for name, buf in model.named_buffers():
        ema_buffers[name].copy_(buf)


def requires_grad(model, flag=True):
    for p in model.parameters():
        p.requires_grad = flag


def new_run_dir(results_dir, name):
    """results_dir/NNN-name, with NNN one more than the highest index there (rank 0 picks, all agree)."""
    run_dir = None
    if dist_util.is_main():
        os.makedirs(results_dir, exist_ok=True)
        index = len(glob(os.path.join(results_dir, "*")))
        run_dir = os.path.join(results_dir, f"{index:03d}-{name}")
    return dist_util.broadcast_object(run_dir)


def write_json(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def create_logger(logging_dir):
    """A logger that writes to logging_dir/log.txt and stdout on rank 0 and does nothing elsewhere."""
    logger = logging.getLogger(f"run:{logging_dir}")
    logger.propagate = False
    logger.handlers.clear()
    if dist_util.is_main():
        logger.setLevel(logging.INFO)
        fmt = logging.Formatter("[\033[34m%(asctime)s\033[0m] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        for handler in (logging.StreamHandler(), logging.FileHandler(os.path.join(logging_dir, "log.txt"))):
            handler.setFormatter(fmt)
            logger.addHandler(handler)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


class StepBatchSampler(torch.utils.data.Sampler):
    """Index batches of one rank, as a pure function of the training step.

    Each epoch is a permutation of the dataset seeded by (seed, epoch); step s reads global batch
    s mod (N // global_batch) of epoch s // (N // global_batch), and rank r takes its contiguous
    slice. A run resumed at step s therefore sees exactly the data the uninterrupted run would have.
    """

    def __init__(self, num_items, global_batch, seed, rank, world_size, start_step, num_steps):
        assert global_batch % world_size == 0, "the global batch size must be divisible by the world size"
        self.steps_per_epoch = num_items // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"the global batch size {global_batch} exceeds the dataset size {num_items}")
        self.num_items, self.global_batch = num_items, global_batch
        self.seed, self.rank, self.local_batch = seed, rank, global_batch // world_size
        self.start_step, self.num_steps = start_step, num_steps

    def __len__(self):
        return max(0, self.num_steps - self.start_step)

    def __iter__(self):
        epoch, perm = None, None
        for step in range(self.start_step, self.num_steps):
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                perm = torch.randperm(self.num_items, generator=gen)
            start = (step % self.steps_per_epoch) * self.global_batch + self.rank * self.local_batch
            yield perm[start : start + self.local_batch].tolist()


def check_resume(args, ckpt, run_defining_args):
    """Stops with one sentence when a checkpoint was trained with other run-defining settings or is already done."""
    saved = ckpt["args"]
    diffs = [f"--{k.replace('_', '-')} {saved.get(k)!r} (now {getattr(args, k)!r})"
             for k in run_defining_args if saved.get(k) != getattr(args, k)]
    if diffs:
        raise ValueError(f"{args.resume} was trained with other settings; pass the same ones to resume: {', '.join(diffs)}")
    if ckpt["step"] >= args.max_steps:
        raise ValueError(f"{args.resume} is already at step {ckpt['step']}; pass a larger --max-steps to train further")


def optimizer_to(opt, device):
    """Moves an optimiser's state (loaded on the CPU) to the device; step counters stay where they are."""
    for state in opt.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and k != "step":
                state[k] = v.to(device)


def check_same_settings(path, settings, what):
    """If the JSON file at `path` exists, it must hold `settings`; else stop naming every difference."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        existing = json.load(f)
    diffs = [f"{k}: {existing.get(k)!r} there, {v!r} now" for k, v in settings.items() if existing.get(k) != v]
    diffs += [f"{k}: {existing[k]!r} there, absent now" for k in existing if k not in settings]
    if diffs:
        raise ValueError(f"{what} holds results made with other settings ({'; '.join(diffs)}); "
                         f"use a new output path, or remove it to start over")
