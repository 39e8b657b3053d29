"""What the two training scripts (train.py, train_ard.py) share: the EMA update, the per-step data
order, the learning-rate schedule, and TrainingRun: the one object behind which the operations of
a run sit.

The algorithm stays in the scripts: their loops hold the forward pass, the loss, zero_grad,
backward, clipping, the optimiser step and the EMA update. TrainingRun is what the loop calls at a
few points:

    run = TrainingRun(args, build_parser(), device)  # new or resumed; checks, writes nothing
    run.start(name)                                  # the run folder, args.json, log.txt
    run.check_finite(step, loss, grad_norm)          # before opt.step(): all stop on NaN or inf
    run.log(train_steps, figures)                    # mean over steps and ranks, to metrics.jsonl
    run.end_step(train_steps, checkpoint)            # checkpoints, and the stop a signal asks for
    run.finish()

A run lives in one folder: args.json (and args-resume-STEP.json for each resume), log.txt,
metrics.jsonl (one JSON record per log step, every figure averaged over ranks) and
checkpoints/STEP.pt. All the randomness of a step is seeded by (seed, step, rank) (ard/seeding.py)
and the data order is a function of the step (StepBatchSampler), so a checkpoint holds everything
needed to continue exactly.
"""

import argparse
import json
import math
import os
import shutil
import time
from collections import OrderedDict

import torch

from ard import dist_util
from ard.checkpoints import check_finite, load_checkpoint, save_checkpoint
from ard.cli import NothingToDo, UserError, check_output_path, positive_int, run_defining_flags
from ard.fileio import remove_stale_temporaries, write_json
from ard.logs import create_logger, progress
from ard.preemption import Preempted, StopRequest, add_stop_argument
from ard.seeding import epoch_permutation


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

    Each epoch is a permutation of the dataset (seeding.epoch_permutation); step s reads global
    batch s mod (N // global_batch) of epoch s // (N // global_batch), and rank r takes its
    contiguous slice. A run resumed at step s therefore sees exactly the data the uninterrupted run
    would have.
    """

    def __init__(self, num_items, global_batch, seed, rank, world_size, start_step, num_steps):
        assert global_batch % world_size == 0, (
            "the global batch must be divisible by the world size"
        )
        self.steps_per_epoch = num_items // global_batch
        if self.steps_per_epoch == 0:
            raise UserError(
                f"the global batch size {global_batch} exceeds the {num_items} items there are to "
                f"draw from: use a smaller one"
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


def lr_factor(schedule, warmup_steps, max_steps):
    """The factor on the peak learning rate at each (0-based) optimiser step, a pure function of the
    step so that a resumed run continues exactly: a linear warm-up over warmup_steps, then constant
    (DiT's), or a cosine decay to 0 at max_steps."""

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        return 0.5 * (
            1 + math.cos(math.pi * (step - warmup_steps) / max(1, max_steps - warmup_steps))
        )

    return factor


def due(train_steps, every, max_steps):
    """Whether the run, `train_steps` optimiser steps in, is at a step to log, validate or
    checkpoint at: every `every` steps (never when 0) and at the last."""
    return bool(every) and (train_steps % every == 0 or train_steps == max_steps)


#################################################################################
#                                 The run                                       #
#################################################################################


class TrainingRun:
    """A training run's operations: its folder and resume, stop signals, the finiteness check,
    metrics averaged over steps and ranks, logging, progress and atomic checkpoints.

    Construction decides, before any work and without writing, what the command means: a new run
    (its folder is checked), or a resumed one (`checkpoint` holds the loaded --resume checkpoint,
    `start_step` its step). Flags marked with cli.defines_run in `parser` must agree with the
    checkpoint's; --resume auto finds the checkpoint itself, so that one command can be submitted
    again and again. Every rank gets the same answers: rank 0 decides and broadcasts.
    """

    def __init__(self, args, parser, device):
        self.args, self.device = args, device
        # from here on a stop signal saves the step in flight
        self.stop = StopRequest(args.stop_signals)
        self.run_defining = run_defining_flags(parser)
        self.checkpoint = self._resume_checkpoint()
        self.start_step = self.checkpoint["step"] if self.checkpoint is not None else 0
        self.dir = self.logger = None

    @staticmethod
    def add_arguments(parser, name):
        """The flags of the run's operations (none defines what is trained). `name` is the pattern
        of a new run's numbered folder."""
        parser.add_argument(
            "--results-dir",
            type=str,
            default="results",
            help=f"new runs go to RESULTS_DIR/NNN-{name}",
        )
        parser.add_argument(
            "--run-dir",
            type=str,
            default=None,
            help="this run folder instead of a new numbered one",
        )
        parser.add_argument(
            "--replace",
            action=argparse.BooleanOptionalAction,
            default=False,
            help="start over in a --run-dir that already holds a run, deleting it (without this, "
            "it is refused)",
        )
        parser.add_argument(
            "--resume",
            type=str,
            default=None,
            help="a checkpoint of this script to continue from, or 'auto': the newest in "
            "--run-dir, a new run if there is none, nothing if it is finished (the same command "
            "can be submitted again and again)",
        )
        parser.add_argument(
            "--log-every",
            type=positive_int,
            default=100,
            help="log the losses every this many steps",
        )
        parser.add_argument(
            "--ckpt-every",
            type=positive_int,
            default=50_000,
            help="write a checkpoint every this many steps (and at the end)",
        )
        add_stop_argument(parser)

    # Before any work: new or resumed.

    def _resume_checkpoint(self):
        """The loaded --resume checkpoint, checked against this command; None for a new run."""
        args = self.args
        if args.resume == "auto":
            decided = self._auto_resume() if dist_util.is_main() else None
            args.resume, args.replace = dist_util.broadcast_object((decided, args.replace))
            if isinstance(args.resume, Exception):
                raise args.resume
        if not args.resume:
            # Rank 0 looks before any rank writes: the others would see the folder it is about to
            # make.
            error = self._new_run_dir_problem() if dist_util.is_main() else None
            error = dist_util.broadcast_object(error)
            if error:
                raise UserError(error)
            return None
        ckpt = load_checkpoint(args.resume)
        if not isinstance(ckpt, dict) or not {"model", "ema", "opt", "step", "args"} <= set(ckpt):
            raise UserError(
                f"--resume {args.resume} is not a training checkpoint of this script "
                f"(it has no optimiser state)"
            )
        check_finite({k: ckpt[k] for k in ("model", "ema")}, args.resume)
        diffs = self._setting_differences(ckpt["args"])
        if diffs:
            raise UserError(
                f"{args.resume} was trained with other settings; pass the same ones to resume: "
                f"{', '.join(diffs)}"
            )
        if ckpt["step"] >= args.max_steps:
            raise UserError(
                f"{args.resume} is already at step {ckpt['step']}; pass a larger --max-steps to "
                f"train further"
            )
        return ckpt

    def _setting_differences(self, saved):
        """'--flag saved (now current)' for each run-defining flag on which saved arguments and args
        differ; a flag the saved arguments lack was added since, and counts as its default."""
        return [
            f"--{k.replace('_', '-')} {saved.get(k, default)!r} (now {getattr(self.args, k)!r})"
            for k, default in self.run_defining.items()
            if saved.get(k, default) != getattr(self.args, k)
        ]

    def _auto_resume(self):
        """What --resume auto means for --run-dir: the path of its newest checkpoint; None to start
        a new run there (no folder, an empty one, or a run of the same settings that stopped before
        its first checkpoint, which is started over); else the exception to raise: NothingToDo when
        the run has reached --max-steps, a UserError when the folder holds something else."""
        args = self.args
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
            diffs = self._setting_differences(json.load(f))
        if diffs:
            return UserError(
                f"--run-dir {run_dir} holds a run of other settings ({', '.join(diffs)}): pass the "
                f"same ones, or another --run-dir"
            )
        last = last_checkpoint(os.path.join(run_dir, "checkpoints"))
        if last is None:
            args.replace = True  # nothing to continue from: the run starts over in its folder
            return None
        step, path = last
        if step >= args.max_steps:
            return NothingToDo(
                f"{run_dir} has reached step {step} of --max-steps {args.max_steps} ({path})"
            )
        return path

    def _new_run_dir_problem(self):
        """The one-sentence reason a new run cannot start in its folder, or None."""
        args = self.args
        try:
            if args.run_dir:
                check_output_path(args.run_dir, "--run-dir", folder=True)
            else:
                check_output_path(args.results_dir, "--results-dir", folder=True)
        except UserError as e:
            return str(e)
        if args.run_dir and os.path.isdir(args.run_dir) and os.listdir(args.run_dir):
            if not args.replace:
                return (
                    f"--run-dir {args.run_dir} already holds a run: pass --resume with one of its "
                    f"checkpoints to continue it, --replace to start it over, or another --run-dir"
                )
            if not os.path.exists(os.path.join(args.run_dir, "args.json")):
                return (
                    f"--replace deletes a run folder, and {args.run_dir} holds files but no run "
                    f"(no args.json): pick a new --run-dir"
                )
        return None

    # From here on the run writes.

    def start(self, name, subfolders=(), progress_name="train"):
        """Makes the run folder (--run-dir, RESULTS_DIR/NNN-name, or the resumed checkpoint's),
        writes the resolved arguments into it, and opens the logger and the progress bar."""
        args, resumed = self.args, self.checkpoint is not None
        if resumed:
            self.dir = os.path.dirname(os.path.dirname(os.path.abspath(args.resume)))
        else:
            self.dir = args.run_dir or self._numbered_dir(args.results_dir, name)
        self.checkpoint_dir = os.path.join(self.dir, "checkpoints")
        self.metrics_path = os.path.join(self.dir, "metrics.jsonl")
        stale = []
        if dist_util.is_main():
            if not resumed and os.path.isdir(self.dir):
                shutil.rmtree(self.dir)  # --replace (a non-empty folder without it was refused)
            for folder in (self.checkpoint_dir, *(os.path.join(self.dir, s) for s in subfolders)):
                os.makedirs(folder, exist_ok=True)
            stale = remove_stale_temporaries(self.checkpoint_dir)
            args_name = f"args-resume-{self.start_step}.json" if resumed else "args.json"
            write_json(os.path.join(self.dir, args_name), vars(args))
        dist_util.barrier()
        self.logger = create_logger(self.dir)
        self.logger.info(f"Run folder {self.dir}, world size {dist_util.world_size()}")
        if stale:
            self.logger.info(f"Removed {', '.join(stale)}, left by an interrupted checkpoint write")
        self.bar = progress(args.max_steps, progress_name, initial=self.start_step)
        self._sums, self._count, self._since = None, 0, time.time()

    @staticmethod
    def _numbered_dir(results_dir, name):
        """results_dir/NNN-name, NNN one more than the highest number there (rank 0 picks, all
        agree)."""
        run_dir = None
        if dist_util.is_main():
            os.makedirs(results_dir, exist_ok=True)
            numbers = [
                int(e.split("-", 1)[0])
                for e in os.listdir(results_dir)
                if e.split("-", 1)[0].isdigit()
            ]
            run_dir = os.path.join(results_dir, f"{max(numbers, default=-1) + 1:03d}-{name}")
        return dist_util.broadcast_object(run_dir)

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    # The loop's calls.

    def check_finite(self, step, loss, grad_norm):
        """Stops the run, on every rank alike, when the loss or the gradient of optimiser step
        `step` (0-based) is infinite or NaN on any rank; call it before opt.step(), so no weight
        turns bad."""
        finite = float(math.isfinite(loss.item()) and math.isfinite(grad_norm.item()))
        if dist_util.all_reduce_mean(finite, self.device) < 1.0:
            raise self._nonfinite(f"the loss or gradient became infinite or NaN at step {step + 1}")

    def _nonfinite(self, what):
        last = last_checkpoint(self.checkpoint_dir)
        where = (
            f"step {last[0]} in {self.checkpoint_dir}"
            if last is not None
            else f"none (nothing was saved in {self.checkpoint_dir})"
        )
        return UserError(
            f"{what}; stopping. The last good checkpoint is {where}; lower --lr or check the data, "
            f"then resume from it"
        )

    def log(self, train_steps, figures, validation=None):
        """Adds this step's figures ({name: a float or a list of floats}); every --log-every steps
        and at the last, writes their mean over the steps since the last log and over the ranks,
        with `validation` ({name: value}, figures computed once) and the speed, to metrics.jsonl and
        the log. Returns that record, or None between log steps. Every rank must call it at every
        step."""
        self.bar.update(1)
        flat = torch.tensor(_flatten(figures), dtype=torch.float64)
        self._sums = flat if self._sums is None else self._sums + flat
        self._count += 1
        if not due(train_steps, self.args.log_every, self.args.max_steps):
            return None
        means = dist_util.all_reduce_mean((self._sums / self._count).tolist(), self.device)
        steps_per_sec = self._count / (time.time() - self._since)
        self._sums, self._count, self._since = None, 0, time.time()
        record = {"step": train_steps, **_unflatten(figures, means), "steps_per_sec": steps_per_sec}
        record.update(validation or {})
        if dist_util.is_main():
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.logger.info(
            f"(step={train_steps:07d}) "
            + ", ".join(_shown(k, v) for k, v in record.items() if k != "step")
        )
        self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}")
        return record

    def end_step(self, train_steps, checkpoint):
        """After optimiser step `train_steps`: writes checkpoint() (the training state, a dict)
        every --ckpt-every steps, at --max-steps, and when a stop signal reached any rank; after
        that one, ends the process with EXIT_PREEMPTED (raises Preempted). Every rank decides
        alike."""
        stop = self._stop_requested()
        finished = train_steps >= self.args.max_steps
        if due(train_steps, self.args.ckpt_every, self.args.max_steps) or (stop and not finished):
            self.save(train_steps, checkpoint())
        if stop and not finished:
            why = self.stop.requested or "a signal to another rank"
            message = (
                f"{why} at step {train_steps}: its checkpoint is {self.checkpoint_dir}/"
                f"{train_steps:07d}.pt; the same command with --resume auto --run-dir {self.dir} "
                f"continues it"
            )
            self.logger.info(f"Stopping: {message}")
            raise Preempted(message)

    def _stop_requested(self):
        """Whether any rank has been asked to stop (one reduction: all ranks read the same
        answer)."""
        return dist_util.all_reduce_mean(float(self.stop.requested is not None), self.device) > 0

    def save(self, train_steps, state):
        """Rank 0 writes checkpoints/STEP.pt (the step, the arguments and `state`) atomically; every
        rank waits for it, and every rank raises if it could not be written (a non-finite weight, a
        full disk)."""
        error = None
        if dist_util.is_main():
            path = os.path.join(self.checkpoint_dir, f"{train_steps:07d}.pt")
            try:
                save_checkpoint(path, {"step": train_steps, "args": vars(self.args), **state})
                self.logger.info(f"Saved checkpoint to {path}")
            except FloatingPointError as e:
                error = self._nonfinite(
                    f"a weight became infinite or NaN by step {train_steps}, {e}"
                )
            except UserError as e:
                error = e
        error = dist_util.broadcast_object(error)
        if error:
            raise error

    def finish(self):
        self.bar.close()
        self.logger.info("Done!")
        self.stop.close()
        dist_util.cleanup()


def last_checkpoint(checkpoint_dir):
    """(step, path) of the newest checkpoint in a run's checkpoints/ (written atomically: complete
    if present), or None."""
    if not os.path.isdir(checkpoint_dir):
        return None
    steps = [
        int(f[:-3]) for f in os.listdir(checkpoint_dir) if f.endswith(".pt") and f[:-3].isdigit()
    ]
    return (max(steps), os.path.join(checkpoint_dir, f"{max(steps):07d}.pt")) if steps else None


def _flatten(figures):
    return [
        v for value in figures.values() for v in (value if isinstance(value, list) else [value])
    ]


def _unflatten(figures, values):
    """{name: value} in the shape of `figures` (floats and lists), filled from the flat `values`."""
    out, i = {}, 0
    for name, value in figures.items():
        n = len(value) if isinstance(value, list) else 1
        out[name] = values[i : i + n] if isinstance(value, list) else values[i]
        i += n
    return out


def _shown(name, value):
    if isinstance(value, list):
        return f"{name} [{', '.join(f'{v:.4g}' for v in value)}]"
    return f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}"
