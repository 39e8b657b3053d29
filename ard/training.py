"""What the two training scripts (train.py, train_ard.py) share: the EMA update, the per-step data
order, the learning-rate schedule, and TrainingRun: the one object behind which the operations of
a run sit.

The algorithm stays in the scripts: their loops hold the forward pass, the loss, zero_grad,
backward, clipping, the optimiser step and the EMA update. TrainingRun is what the loop calls at a
few points:

    run = TrainingRun(args, build_parser(), device)  # new or resumed; checks, writes nothing
    run.start(name)                                  # the run folder (locked), args.json, log.txt
    run.begin_loop()                                 # the clock of the steps per second
    run.check_finite(step, loss, grad_norm)          # before opt.step(): all stop on NaN or inf
    run.log(train_steps, figures)                    # mean over steps and ranks, to metrics.jsonl
    run.end_step(train_steps, checkpoint)            # checkpoints, and the stop a signal asks for
    run.finish()

A run lives in one folder: args.json (and args-resume-STEP.json for each resume), log.txt,
metrics.jsonl (one JSON record per log step, every figure averaged over ranks), checkpoints/STEP.pt,
LOCK while a job writes it, and PREEMPTED when a stop signal ended the last job. All the randomness
of a step is seeded by (seed, step, rank) (ard/seeding.py) and the data order is a function of the
step (StepBatchSampler), so a checkpoint holds everything needed to continue exactly.
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
from ard.cli import (
    NothingToDo,
    UserError,
    check_output_path,
    non_negative_int,
    positive_int,
    run_defining_flags,
)
from ard.fileio import WriterLock, remove_stale_temporaries, write_json
from ard.logs import create_logger, progress
from ard.preemption import (
    Preempted,
    StopRequest,
    add_stop_argument,
    clear_preempted,
    mark_preempted,
)
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
    `start_step` its step). The flags `parser` declares with cli.DefiningFlags must agree with the
    checkpoint's; --resume auto finds the checkpoint itself (the newest that loads), so that one
    command can be submitted again and again. Every rank gets the same answers: rank 0 decides and
    broadcasts, and an error on rank 0 ends every rank.
    """

    def __init__(self, args, parser, device):
        self.args, self.device = args, device
        # from here on a stop signal saves the step in flight
        self.stop = StopRequest(args.stop_signals)
        self.flags = run_defining_flags(parser)
        self.identities = _on_rank0(self._identities, "could not read the run's inputs")
        self.notes = []  # what --resume auto skipped, logged once the run folder is open
        self.checkpoint = self._resume_checkpoint()
        self.start_step = self.checkpoint["step"] if self.checkpoint is not None else 0
        self.dir = self.logger = self.lock = None
        self._stop_seen = False

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
            "--run-dir that loads, a new run if there is none, nothing if it is finished (the same "
            "command can be submitted again and again)",
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
        parser.add_argument(
            "--keep-last",
            type=non_negative_int,
            default=0,
            help="keep only the newest this many checkpoints (0: all, as DiT); a checkpoint with a "
            "file STEP.pt.keep beside it is always kept",
        )
        add_stop_argument(parser)

    # Before any work: new or resumed.

    def _identities(self):
        """{dest: identity} of the flags declared with identify=: what their paths hold."""
        return {
            a.dest: a.identify(getattr(self.args, a.dest))
            for a in self.flags
            if a.identify is not None and getattr(self.args, a.dest) is not None
        }

    def _resume_checkpoint(self):
        """The loaded --resume checkpoint, checked against this command; None for a new run."""
        args = self.args
        if args.resume == "auto":
            decided = _on_rank0(self._auto_resume, "could not read --run-dir")
            if isinstance(decided, Exception):
                raise decided
            candidates, args.replace = decided
            if not candidates:
                args.resume = None
            else:
                return self._first_loadable(candidates)
        if not args.resume:
            # Rank 0 looks before any rank writes: the others would see the folder it is about to
            # make.
            error = _on_rank0(self._new_run_dir_problem, "could not check --run-dir")
            if error:
                raise UserError(error)
            return None
        return self._checked(args.resume, load_checkpoint(args.resume))

    def _checked(self, path, ckpt):
        """`ckpt`, the checkpoint at `path`, if this command can continue it; else a UserError."""
        if not isinstance(ckpt, dict) or not {"model", "ema", "opt", "step", "args"} <= set(ckpt):
            raise UserError(
                f"--resume {path} is not a training checkpoint of this script "
                f"(it has no optimiser state)"
            )
        check_finite({k: ckpt[k] for k in ("model", "ema")}, path)
        diffs = self._setting_differences(ckpt["args"])
        if diffs:
            raise UserError(
                f"{path} was trained with other settings; pass the same ones to resume: "
                f"{', '.join(diffs)}"
            )
        if ckpt["step"] >= self.args.max_steps:
            raise UserError(
                f"{path} is already at step {ckpt['step']}; pass a larger --max-steps to train "
                f"further"
            )
        return ckpt

    def _first_loadable(self, candidates):
        """The newest of the --resume auto candidates that loads and fits: rank 0 tries them in
        turn (noting what it skips, and why), the others load the one it found."""
        found, ckpt = None, None
        if dist_util.is_main():
            for path in candidates:
                try:
                    found, ckpt = path, self._checked(path, load_checkpoint(path))
                    break
                except UserError as e:
                    self.notes.append(f"--resume auto skipped {path}: {e}")
        found, self.notes = dist_util.broadcast_object((found, self.notes))
        for note in self.notes:
            dist_util.print0(note)
        if found is None:
            raise UserError(
                f"no checkpoint in {self.args.run_dir}/checkpoints can be continued ("
                + "; ".join(self.notes)
                + "): fix or remove them, or start a new --run-dir"
            )
        self.args.resume = found
        return ckpt if ckpt is not None else load_checkpoint(found)

    def _setting_differences(self, saved):
        """'--flag saved (now current)' for each run-defining flag on which the saved arguments and
        args differ. A flag the saved arguments lack was added since (or renamed, `was`): it counts
        as its default, and is not compared when that default is filled in later (None). A flag
        with identify= is compared by what it holds where both sides know it."""
        saved_identities = saved.get("input_identities", {})
        diffs = []
        for action in self.flags:
            name, now = action.dest, getattr(self.args, action.dest)
            if action.when is not None and not action.when(self.args):
                continue
            key = name if name in saved or action.was is None else action.was
            if key not in saved and action.default is None:
                continue
            then = saved.get(key, action.default)
            flag = action.option_strings[0]
            if action.identify is not None and name in saved_identities and name in self.identities:
                if saved_identities[name] != self.identities[name]:
                    diffs.append(f"{flag} {then!r} (now {now!r}, which holds something else)")
            elif then != now:
                diffs.append(f"{flag} {then!r} (now {now!r})")
        return diffs

    def _auto_resume(self):
        """What --resume auto means for --run-dir: (its checkpoints, newest first, and whether to
        start over); no checkpoints means a new run there (no folder, an empty one, or a run of the
        same settings that stopped before its first checkpoint, which is started over). Else the
        exception to raise: NothingToDo when the run has reached --max-steps, a UserError when the
        folder holds something else."""
        args = self.args
        if not args.run_dir:
            return UserError("--resume auto continues the run in --run-dir: pass --run-dir")
        run_dir = args.run_dir
        if not os.path.isdir(run_dir) or not os.listdir(run_dir):
            return [], args.replace
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
        checkpoints = list_checkpoints(os.path.join(run_dir, "checkpoints"))
        if not checkpoints:
            return [], True  # nothing to continue from: the run starts over in its folder
        step, path = checkpoints[-1]
        if step >= args.max_steps:
            return NothingToDo(
                f"{run_dir} has reached step {step} of --max-steps {args.max_steps} ({path})"
            )
        return [path for _, path in reversed(checkpoints)], args.replace

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
        """Makes the run folder (--run-dir, RESULTS_DIR/NNN-name, or the resumed checkpoint's) and
        takes its lock (one job per run folder, whatever host it runs on), writes the resolved
        arguments into it, and opens the logger and the progress bar."""
        args, resumed = self.args, self.checkpoint is not None
        if resumed:
            self.dir = os.path.dirname(os.path.dirname(os.path.abspath(args.resume)))
        else:
            self.dir = args.run_dir or self._numbered_dir(args.results_dir, name)
        self.checkpoint_dir = os.path.join(self.dir, "checkpoints")
        self.metrics_path = os.path.join(self.dir, "metrics.jsonl")
        self.lock = WriterLock(self.dir, f"the run {self.dir}").__enter__()

        def prepare():
            if not resumed:  # --replace (a non-empty folder without it was refused)
                for entry in os.listdir(self.dir):
                    path = os.path.join(self.dir, entry)
                    if entry != "LOCK":
                        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            for folder in (self.checkpoint_dir, *(os.path.join(self.dir, s) for s in subfolders)):
                os.makedirs(folder, exist_ok=True)
            clear_preempted(self.dir)
            stale = remove_stale_temporaries(self.checkpoint_dir, all_but_mine=True)
            args_name = f"args-resume-{self.start_step}.json" if resumed else "args.json"
            write_json(os.path.join(self.dir, args_name), self._saved_args())
            return stale

        stale = _on_rank0(prepare, f"could not set up the run folder {self.dir}")
        self.logger = create_logger(self.dir)
        self.logger.info(f"Run folder {self.dir}, world size {dist_util.world_size()}")
        for note in self.notes:
            self.logger.info(note)
        if stale:
            self.logger.info(f"Removed {', '.join(stale)}, left by an interrupted checkpoint write")
        self.bar = progress(args.max_steps, progress_name, initial=self.start_step)
        self._sums, self._count, self._since = None, 0, time.time()

    def _saved_args(self):
        """The resolved arguments as a run records them, with what its input paths hold."""
        return {**vars(self.args), "input_identities": self.identities}

    @staticmethod
    def _numbered_dir(results_dir, name):
        """results_dir/NNN-name, NNN one more than the highest number there (rank 0 picks, all
        agree)."""

        def pick():
            os.makedirs(results_dir, exist_ok=True)
            numbers = [
                int(e.split("-", 1)[0])
                for e in os.listdir(results_dir)
                if e.split("-", 1)[0].isdigit()
            ]
            return os.path.join(results_dir, f"{max(numbers, default=-1) + 1:03d}-{name}")

        return _on_rank0(pick, f"could not make a run folder in {results_dir}")

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    # The loop's calls.

    def begin_loop(self):
        """Logs where training starts, and starts the clock of the first steps per second."""
        self.logger.info(
            f"Training from step {self.start_step} to {self.args.max_steps}, global batch "
            f"{self.args.global_batch_size}"
        )
        self._since = time.time()

    def check_finite(self, step, *values):
        """Stops the run, on every rank alike, when one of `values` of optimiser step `step`
        (0-based; the loss, the gradient norm, ...) is infinite or NaN on any rank; call it before
        opt.step(), so that no weight turns bad. Its one reduction also carries whether a stop
        signal reached this rank, which end_step acts on: one synchronisation per step."""
        finite = all(math.isfinite(float(torch.as_tensor(v).detach())) for v in values)
        signalled = self.stop.requested is not None
        finite_all, stop_any = dist_util.all_reduce_mean(
            [float(finite), float(signalled)], self.device
        )
        self._stop_seen = stop_any > 0
        if finite_all < 1.0:
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
        every --ckpt-every steps, at --max-steps, and when a stop signal reached any rank (as
        check_finite's reduction found); after that one, leaves PREEMPTED in the run folder for a
        job script to test and ends the process with EXIT_PREEMPTED (raises Preempted). Every rank
        decides alike."""
        stop = self._stop_seen
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
            if dist_util.is_main():
                mark_preempted(self.dir, message)
            raise Preempted(message)

    def save(self, train_steps, state):
        """Rank 0 writes checkpoints/STEP.pt (the step, the arguments and `state`) atomically, then
        removes what --keep-last no longer keeps; every rank waits for it, and every rank stops if
        it could not be written (a non-finite weight, a full disk, any other error)."""
        path = os.path.join(self.checkpoint_dir, f"{train_steps:07d}.pt")

        def write():
            try:
                save_checkpoint(path, {"step": train_steps, "args": self._saved_args(), **state})
            except FloatingPointError as e:
                raise self._nonfinite(f"a weight became infinite or NaN by step {train_steps}, {e}")
            self.logger.info(f"Saved checkpoint to {path}")
            for removed in self._retire_checkpoints():
                self.logger.info(f"Removed {removed} (--keep-last {self.args.keep_last})")

        _on_rank0(write, f"could not write {path}")

    def _retire_checkpoints(self):
        """Removes the checkpoints older than the newest --keep-last (none when it is 0), except
        those marked STEP.pt.keep; returns their paths."""
        if not self.args.keep_last:
            return []
        old = list_checkpoints(self.checkpoint_dir)[: -self.args.keep_last]
        retired = [path for _, path in old if not os.path.exists(f"{path}.keep")]
        for path in retired:
            os.remove(path)
        return retired

    def finish(self):
        self.bar.close()
        self.logger.info("Done!")
        self.stop.close()
        if self.lock is not None:
            self.lock.__exit__(None, None, None)
        dist_util.cleanup()


def _on_rank0(fn, what):
    """fn()'s result on rank 0, broadcast to every rank. An error there ends every rank: rank 0
    raises it, the others a UserError that says `what` and repeats its sentence, so that no rank is
    left waiting in a collective."""
    result, error = None, None
    if dist_util.is_main():
        try:
            result = fn()
        except Exception as e:  # every rank must hear of it
            error = e
    shared = dist_util.broadcast_object(
        (result, None if error is None else (type(error).__name__, str(error)))
    )
    if error is not None:
        raise error
    result, failure = shared
    if failure is not None:
        kind, message = failure
        raise UserError(
            message if kind in ("UserError", "MissingFileError") else f"{what}: {kind}: {message}"
        )
    return result


def list_checkpoints(checkpoint_dir):
    """[(step, path)] of a run's checkpoints (written atomically: complete if present), oldest
    first."""
    if not os.path.isdir(checkpoint_dir):
        return []
    steps = sorted(
        int(f[:-3]) for f in os.listdir(checkpoint_dir) if f.endswith(".pt") and f[:-3].isdigit()
    )
    return [(s, os.path.join(checkpoint_dir, f"{s:07d}.pt")) for s in steps]


def last_checkpoint(checkpoint_dir):
    """(step, path) of the newest checkpoint in a run's checkpoints/, or None."""
    checkpoints = list_checkpoints(checkpoint_dir)
    return checkpoints[-1] if checkpoints else None


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
