"""What the two trainers (train.py, train_ard.py) share: the run folder and its resume, the model being
optimised with its EMA copy and optimiser, the per-step data order, checkpoints, and metrics.

A run lives in one folder: args.json (and args-resume-STEP.json for each resume), log.txt, metrics.jsonl
(one JSON record per log step, every figure averaged over ranks) and checkpoints/STEP.pt. All the
randomness of a step is seeded by (seed, step, rank) (ard/seeding.py) and the data order is a function of
the step (StepBatchSampler), so a checkpoint holds everything needed to continue exactly.
"""

import argparse
import json
import math
import os
import shutil
import time
from collections import OrderedDict
from copy import deepcopy

import torch

from ard import dist_util
from ard.checkpoints import check_finite, load_checkpoint, save_checkpoint
from ard.cli import (
    NothingToDo,
    UserError,
    check_output_path,
    decay,
    non_negative_int,
    positive_float,
    positive_int,
)
from ard.fileio import remove_stale_temporaries, write_json
from ard.logs import create_logger
from ard.preemption import Preempted, add_stop_argument
from ard.seeding import epoch_permutation
from ard.vae import vae_encode
from diffusion.flow import FlowMatching


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


class StepBatchSampler(torch.utils.data.Sampler):
    """Index batches of one rank, as a pure function of the training step.

    Each epoch is a permutation of the dataset (seeding.epoch_permutation); step s reads global batch
    s mod (N // global_batch) of epoch s // (N // global_batch), and rank r takes its contiguous slice.
    A run resumed at step s therefore sees exactly the data the uninterrupted run would have.
    """

    def __init__(self, num_items, global_batch, seed, rank, world_size, start_step, num_steps):
        assert global_batch % world_size == 0, (
            "the global batch size must be divisible by the world size"
        )
        self.steps_per_epoch = num_items // global_batch
        if self.steps_per_epoch == 0:
            raise UserError(
                f"the global batch size {global_batch} exceeds the {num_items} items there are to draw from: use a smaller one"
            )
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
                perm = epoch_permutation(self.num_items, self.seed, epoch)
            start = (step % self.steps_per_epoch) * self.global_batch + self.rank * self.local_batch
            yield perm[start : start + self.local_batch].tolist()


def teacher_loss(model, diffusion, x, y, vae=None, random_flip=False):
    """A teacher's loss on one local batch of images x and labels y: random flips, VAE encoding, then DiT's
    (a uniform timestep per image, the hybrid MSE + VB loss) or, when `diffusion` is a FlowMatching process,
    the flow-matching velocity loss. Draws from the global RNG, which the loop seeds."""
    if random_flip:
        flip = torch.rand(x.shape[0], device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if vae is not None:
        x = vae_encode(vae, x)
    if isinstance(diffusion, FlowMatching):
        return diffusion.training_loss(model, x, y).mean()
    t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device)
    return diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()


#################################################################################
#                              The run folder                                   #
#################################################################################

# Run-defining flags added after runs were already trained, with the value that keeps what those runs did: a
# checkpoint whose saved arguments lack one was trained that way, and resumes.
ADDED_LATER = {
    "objective": "ddpm",
    "lr_schedule": "constant",
    "warmup_steps": 0,
    "boundary_schedule": "t",
}


def prepare_run(args, run_defining_args):
    """Checks, before any work, where the run will write, and returns the --resume checkpoint (None for a new
    run). A resume must agree with its checkpoint on the run-defining arguments and not be finished; a new run
    refuses a --run-dir that already holds files, unless --replace says to start it over. --resume auto picks the
    checkpoint itself (see auto_resume)."""
    if args.resume == "auto":
        decided = auto_resume(args, run_defining_args) if dist_util.is_main() else None
        args.resume, args.replace = dist_util.broadcast_object((decided, args.replace))
        if isinstance(args.resume, Exception):
            raise args.resume
    if not args.resume:
        # Rank 0 looks before any rank writes: the others would see the folder it is about to make.
        error = check_new_run_dir(args) if dist_util.is_main() else None
        error = dist_util.broadcast_object(error)
        if error:
            raise UserError(error)
        return None
    ckpt = load_checkpoint(args.resume)
    if not isinstance(ckpt, dict) or not {"model", "ema", "opt", "step", "args"} <= set(ckpt):
        raise UserError(
            f"--resume {args.resume} is not a training checkpoint of this script (it has no optimiser state)"
        )
    check_finite({k: ckpt[k] for k in ("model", "ema")}, args.resume)
    diffs = setting_differences(ckpt["args"], args, run_defining_args)
    if diffs:
        raise UserError(
            f"{args.resume} was trained with other settings; pass the same ones to resume: {', '.join(diffs)}"
        )
    if ckpt["step"] >= args.max_steps:
        raise UserError(
            f"{args.resume} is already at step {ckpt['step']}; pass a larger --max-steps to train further"
        )
    return ckpt


def setting_differences(saved, args, run_defining_args):
    """'--flag saved (now current)' for each run-defining argument on which the saved arguments and args differ."""
    saved = {**ADDED_LATER, **saved}
    return [
        f"--{k.replace('_', '-')} {saved.get(k)!r} (now {getattr(args, k)!r})"
        for k in run_defining_args
        if saved.get(k) != getattr(args, k)
    ]


def last_checkpoint(checkpoint_dir):
    """(step, path) of the newest checkpoint in a run's checkpoints/ (written atomically: complete if present), or None."""
    if not os.path.isdir(checkpoint_dir):
        return None
    steps = [
        int(f[:-3]) for f in os.listdir(checkpoint_dir) if f.endswith(".pt") and f[:-3].isdigit()
    ]
    return (max(steps), os.path.join(checkpoint_dir, f"{max(steps):07d}.pt")) if steps else None


def auto_resume(args, run_defining_args):
    """What --resume auto means for --run-dir, so that one command can be submitted any number of times: the path of
    its newest checkpoint; None to start a new run there (no folder, an empty one, or a run of the same settings
    that stopped before its first checkpoint, which is started over); else the exception to raise: NothingToDo when
    the run has reached --max-steps, a UserError when the folder holds something else."""
    if not args.run_dir:
        return UserError("--resume auto continues the run in --run-dir: pass --run-dir")
    run_dir = args.run_dir
    if not os.path.isdir(run_dir) or not os.listdir(run_dir):
        return None
    if not os.path.isfile(os.path.join(run_dir, "args.json")):
        return UserError(
            f"--run-dir {run_dir} holds files but no run (no args.json): pick a new --run-dir"
        )
    with open(os.path.join(run_dir, "args.json")) as f:
        diffs = setting_differences(json.load(f), args, run_defining_args)
    if diffs:
        return UserError(
            f"--run-dir {run_dir} holds a run of other settings ({', '.join(diffs)}): pass the same ones, "
            f"or another --run-dir"
        )
    last = last_checkpoint(os.path.join(run_dir, "checkpoints"))
    if last is None:
        args.replace = True  # nothing to continue from: the run starts over in its folder
        return None
    if last[0] >= args.max_steps:
        return NothingToDo(
            f"{run_dir} has reached step {last[0]} of --max-steps {args.max_steps} ({last[1]})"
        )
    return last[1]


def check_new_run_dir(args):
    """The one-sentence reason a new run cannot start in its folder, or None."""
    try:
        check_output_path(
            args.run_dir or args.results_dir,
            "--run-dir" if args.run_dir else "--results-dir",
            folder=True,
        )
    except UserError as e:
        return str(e)
    if args.run_dir and os.path.isdir(args.run_dir) and os.listdir(args.run_dir):
        if not args.replace:
            return (
                f"--run-dir {args.run_dir} already holds a run: pass --resume with one of its checkpoints to continue it, "
                f"--replace to start it over, or another --run-dir"
            )
        if not os.path.exists(os.path.join(args.run_dir, "args.json")):
            return f"--replace deletes a run folder, and {args.run_dir} holds files but no run (no args.json): pick a new --run-dir"
    return None


class NonFiniteError(RuntimeError):
    """The loss, the gradient or a weight became infinite or NaN."""


class Run:
    """A training run's folder: new (--run-dir, or RESULTS_DIR/NNN-name) or the one of the --resume checkpoint.
    Writes the resolved arguments, and offers the logger, the metrics file and checkpoint saving."""

    def __init__(self, args, ckpt, name, subfolders=()):
        self.args, self.start_step = args, (ckpt["step"] if ckpt is not None else 0)
        if ckpt is not None:
            self.dir = os.path.dirname(os.path.dirname(os.path.abspath(args.resume)))
        elif args.run_dir:
            self.dir = args.run_dir
        else:
            self.dir = self._numbered_dir(args.results_dir, name)
        self.checkpoint_dir = os.path.join(self.dir, "checkpoints")
        self.metrics_path = os.path.join(self.dir, "metrics.jsonl")
        if dist_util.is_main():
            if ckpt is None and os.path.isdir(self.dir):
                shutil.rmtree(
                    self.dir
                )  # --replace (prepare_run refused a non-empty folder without it)
            for folder in (self.checkpoint_dir, *(os.path.join(self.dir, s) for s in subfolders)):
                os.makedirs(folder, exist_ok=True)
            stale = remove_stale_temporaries(self.checkpoint_dir)
            args_name = "args.json" if ckpt is None else f"args-resume-{ckpt['step']}.json"
            write_json(os.path.join(self.dir, args_name), vars(args))
        dist_util.barrier()
        self.logger = create_logger(self.dir)
        self.logger.info(f"Run folder {self.dir}, world size {dist_util.world_size()}")
        if dist_util.is_main() and stale:
            self.logger.info(f"Removed {', '.join(stale)}, left by an interrupted checkpoint write")

    @staticmethod
    def _numbered_dir(results_dir, name):
        """results_dir/NNN-name, with NNN one more than the highest number there (rank 0 picks, all agree)."""
        run_dir = None
        if dist_util.is_main():
            os.makedirs(results_dir, exist_ok=True)
            numbers = [
                int(entry.split("-", 1)[0])
                for entry in os.listdir(results_dir)
                if entry.split("-", 1)[0].isdigit()
            ]
            run_dir = os.path.join(results_dir, f"{max(numbers, default=-1) + 1:03d}-{name}")
        return dist_util.broadcast_object(run_dir)

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def write_metrics(self, record):
        if dist_util.is_main():
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def last_checkpoint_step(self):
        last = last_checkpoint(self.checkpoint_dir)
        return last[0] if last else None

    def save(self, step, state):
        """Rank 0 writes checkpoints/STEP.pt (the step, the arguments and `state`); every rank waits for it, and every
        rank raises if it could not be written (a non-finite weight, a full disk)."""
        error = None
        if dist_util.is_main():
            path = os.path.join(self.checkpoint_dir, f"{step:07d}.pt")
            try:
                save_checkpoint(path, {"step": step, "args": vars(self.args), **state})
                self.logger.info(f"Saved checkpoint to {path}")
            except FloatingPointError as e:
                error = NonFiniteError(f"a weight became infinite or NaN by step {step}, {e}")
            except UserError as e:
                error = e
        error = dist_util.broadcast_object(error)
        if error:
            raise error


#################################################################################
#                         The model being optimised                             #
#################################################################################


def optimizer_to(opt, device):
    """Moves an optimiser's state (loaded on the CPU) to the device; step counters stay where they are."""
    for state in opt.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and k != "step":
                state[k] = v.to(device)


class Trainer:
    """A model under AdamW with an EMA copy (for sampling), wrapped in DDP across processes and optionally
    compiled. `step(loss)` does one update, and stops the run on a non-finite loss or gradient before
    the optimiser touches the weights. With a StopRequest `stop`, `stop_requested` says after each step whether
    any rank has been asked to stop (see stop_if_requested): every rank reads the same answer at the same step."""

    def __init__(
        self,
        model,
        device,
        lr,
        weight_decay=0.0,
        ema_decay=0.9999,
        grad_clip=None,
        compile=False,
        state=None,
        schedule=None,
        stop=None,
    ):
        self.raw, self.lr, self.schedule, self.stop, self.stop_requested = (
            model,
            lr,
            schedule,
            stop,
            False,
        )
        self.ema = deepcopy(model)
        requires_grad(self.ema, False)
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        if state is not None:
            model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.opt.load_state_dict(state["opt"])
        self.raw, self.ema = model.to(device), self.ema.to(device).eval()
        optimizer_to(self.opt, device)
        self.model = dist_util.wrap_ddp(self.raw, device)
        if compile:
            self.model = torch.compile(self.model)
        if state is None:
            update_ema(self.ema, self.raw, decay=0)  # the EMA starts from the initial weights
        self.device, self.ema_decay = device, ema_decay
        self.grad_clip = (
            grad_clip if grad_clip is not None else math.inf
        )  # inf: the norm is measured, nothing is clipped

    def load_optimizer(self, state, lr, weight_decay):
        """Continues from another run's optimiser state (its moments), with this run's learning rate and decay."""
        self.opt.load_state_dict(state)
        for group in self.opt.param_groups:
            group.update(lr=lr, weight_decay=weight_decay)
        optimizer_to(self.opt, self.device)

    def step(self, loss, step):
        """Backward, gradient clipping, a finiteness check on every rank, the optimiser and EMA updates.
        `step` is the 0-based step being taken; a NonFiniteError names it (1-based, as checkpoints count)."""
        if self.schedule is not None:
            for group in self.opt.param_groups:
                group["lr"] = self.lr * self.schedule(step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), self.grad_clip)
        # One reduction for both questions every rank must answer alike: is everything finite, is anyone stopping?
        finite, stop = dist_util.all_reduce_mean(
            [
                float(math.isfinite(loss.item()) and math.isfinite(grad_norm.item())),
                float(self.stop is not None and self.stop.requested is not None),
            ],
            self.device,
        )
        self.stop_requested = stop > 0
        if finite < 1.0:
            raise NonFiniteError(f"the loss or gradient became infinite or NaN at step {step + 1}")
        self.opt.step()
        update_ema(self.ema, self.raw, self.ema_decay)
        return grad_norm.item()

    def state_dict(self):
        return {
            "model": self.raw.state_dict(),
            "ema": self.ema.state_dict(),
            "opt": self.opt.state_dict(),
        }


def lr_schedule(name, warmup_steps, max_steps):
    """The factor on the learning rate at each (0-based) step, a pure function of the step so that a resumed run
    continues exactly: None for 'constant' without warm-up; a linear warm-up over warmup_steps; then constant, or a
    cosine decay to 0 at max_steps."""
    if name == "constant" and warmup_steps == 0:
        return None

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant":
            return 1.0
        return 0.5 * (
            1 + math.cos(math.pi * (step - warmup_steps) / max(1, max_steps - warmup_steps))
        )

    return factor


class MetricsAverager:
    """Sums per-step figures between log steps; `average()` returns their mean over the steps and over
    ranks, and the steps per second since the last call."""

    def __init__(self, device):
        self.device = device
        self._reset()

    def _reset(self):
        self.sums, self.count, self.start = None, 0, time.time()

    def add(self, figures):
        figures = torch.tensor(figures, dtype=torch.float64)
        self.sums = figures if self.sums is None else self.sums + figures
        self.count += 1

    def average(self):
        values = dist_util.all_reduce_mean((self.sums / self.count).tolist(), self.device)
        steps_per_sec = self.count / (time.time() - self.start)
        self._reset()
        return values, steps_per_sec


def log_due(done, every, max_steps):
    """Whether step number `done` (1-based) is one to log, validate or checkpoint at."""
    return bool(every) and (done % every == 0 or done == max_steps)


def stop_if_requested(trainer, run, done, max_steps, saved, save):
    """After step `done`: if a rank was asked to stop and the run is not finished, write the checkpoint of this step
    (unless `saved`: the loop just wrote it) and raise Preempted, which ends the process with EXIT_PREEMPTED."""
    if not trainer.stop_requested or done >= max_steps:
        return
    if not saved:
        save(done)
    why = trainer.stop.requested if trainer.stop.requested else "a signal to another rank"
    message = (
        f"{why} at step {done}: its checkpoint is {run.checkpoint_dir}/{done:07d}.pt; the same command with "
        f"--resume auto --run-dir {run.dir} continues it"
    )
    run.logger.info(f"Stopping: {message}")
    raise Preempted(message)


def stop_on_nonfinite(run, error):
    """A UserError for a NonFiniteError, naming the last good checkpoint (none is written after the fault)."""
    last = run.last_checkpoint_step()
    where = (
        f"step {last} in {run.checkpoint_dir}"
        if last is not None
        else f"none (nothing was saved in {run.checkpoint_dir})"
    )
    return UserError(
        f"{error}; stopping. The last good checkpoint is {where}; lower --lr or check the data, then resume from it"
    )


def add_run_arguments(parser, name, unit, batch_size, max_steps, lr=1e-4, ema_decay=0.9999):
    """The flags both trainers share: the run folder and resume, the budget, the optimiser, logging and precision.
    `name` is the run folder's pattern and `unit` what a batch holds, for the help texts."""
    parser.add_argument(
        "--results-dir", type=str, default="results", help=f"new runs go to RESULTS_DIR/NNN-{name}"
    )
    parser.add_argument(
        "--run-dir",
        type=str,
        default=None,
        help="use this run folder instead of a new numbered one",
    )
    parser.add_argument(
        "--replace",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="start over in a --run-dir that already holds a run, deleting it (without this, it is refused)",
    )
    parser.add_argument(
        "--resume",
        type=str,
        default=None,
        help="a checkpoint of this script to continue from, or 'auto': the newest in --run-dir, a new run "
        "if there is none, nothing if it is finished (the same command can be submitted again and again)",
    )
    parser.add_argument(
        "--max-steps",
        type=positive_int,
        default=max_steps,
        help="total optimiser steps (including resumed ones)",
    )
    parser.add_argument(
        "--global-batch-size",
        type=positive_int,
        default=batch_size,
        help=f"{unit} per step over all processes",
    )
    parser.add_argument(
        "--global-seed",
        type=non_negative_int,
        default=0,
        help="seed of the initial weights, the data order and every step",
    )
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=lr,
        help="AdamW learning rate (the peak, with a schedule)",
    )
    parser.add_argument(
        "--lr-schedule",
        type=str,
        choices=["constant", "cosine"],
        default="constant",
        help="the learning rate over the run: constant (DiT's), or a cosine decay to 0 at --max-steps",
    )
    parser.add_argument(
        "--warmup-steps",
        type=non_negative_int,
        default=0,
        help="linear learning-rate warm-up over these steps",
    )
    parser.add_argument("--ema-decay", type=decay, default=ema_decay, help="EMA decay per step")
    parser.add_argument(
        "--log-every", type=positive_int, default=100, help="log the losses every this many steps"
    )
    parser.add_argument(
        "--ckpt-every",
        type=positive_int,
        default=50_000,
        help="write a checkpoint every this many steps (and at the end)",
    )
    dist_util.add_precision_argument(parser, default="tf32")
    add_stop_argument(parser)
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the model",
    )
