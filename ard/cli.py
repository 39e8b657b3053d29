"""The command line: user errors, argument types that refuse values that cannot work, output-path
checks.

A mistake a user can make and fix (a missing or wrong file, a value that cannot work, a file made by
another run or another teacher) raises UserError; `run` prints its one sentence and exits with
status 2, before any work where it can be checked up front. A job stopped by a scheduler's signal,
its work saved, exits with status 75 (ard.preemption); a job resubmitted after it finished says so
and exits with 0. Any other exception is a programming error and keeps its traceback.
"""

import argparse
import os
import shutil
import sys

from ard import dist_util
from ard.preemption import EXIT_PREEMPTED, Preempted


class UserError(ValueError):
    """Something the user can fix; its message is one sentence that says what to change."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class NothingToDo(Exception):
    """The job's work is already complete (a finished run submitted again); its message says where
    it is."""


def run(main, parse_args):
    """Every script's entry point: main(parse_args()), with a UserError shown as one line and exit
    status 2, a stop on a scheduler's signal as one line and status 75, and nothing left to do as
    one line and status 0."""
    try:
        main(parse_args())
    except UserError as e:
        print(f"error{_rank()}: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Preempted as e:
        print(f"stopped{_rank()}: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_PREEMPTED)
    except NothingToDo as e:
        if dist_util.is_main():
            print(f"nothing to do: {e}", flush=True)


class DefiningFlags:
    """`defining.add_argument(...)` is parser.add_argument(...) for a flag whose value defines what
    a training run computes: a resumed run must agree with its checkpoint on it
    (ard.training.TrainingRun compares them), and its help says so. Wraps a parser or an argument
    group. Two keywords of its own:

      identify=fn  compare fn(value) instead of the value: what a path holds, not where it is (a
                   store's manifest digest, a file's sha256), so a job that stages its data on
                   another disk resumes
      when=fn      compare only when fn(args) is true (the GAN flags with --gan, --max-steps when
                   the learning-rate schedule depends on it)
      was=name     the flag's dest before a rename, read from runs saved before it

    A flag that a saved run does not record was added after it, and counts as its default (unless
    that default is None, filled in from other flags: then it is not compared)."""

    def __init__(self, parser, when=None):
        self.parser, self.when = parser, when

    def add_argument(self, *args, identify=None, when=None, was=None, **kwargs):
        action = self.parser.add_argument(*args, **kwargs)
        action.defines_run = True
        action.identify, action.when, action.was = identify, when or self.when, was
        action.help = f"{action.help} [defines the run]"
        return action


def run_defining_flags(parser):
    """The actions of `parser` declared with DefiningFlags."""
    return [a for a in parser._actions if getattr(a, "defines_run", False)]


def add_dry_run_argument(parser):
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="resolve every setting, print them with the bytes the job will write and the free "
        "space there, and exit before loading any network weights",
    )


def print_dry_run(script, settings, writes):
    """What --dry-run prints: the resolved settings ({name: value}) and, for each (path, bytes) the
    job will write, the free space of the filesystem that will hold it; then NothingToDo ends it."""
    lines = [f"{script} --dry-run: the settings this command resolves to"]
    lines += [f"  {name}: {value}" for name, value in settings.items()]
    for path, size in writes:
        folder = os.path.abspath(path)
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        free = shutil.disk_usage(folder).free
        lines.append(
            f"  writes {path}: about {size / 2**30:.2f} GiB; {free / 2**30:.2f} GiB free on the "
            f"filesystem of {folder}"
        )
    if dist_util.is_main():
        print("\n".join(lines), flush=True)
    raise NothingToDo("a dry run: no network was loaded and nothing was written")


def _rank():
    return f" (rank {dist_util.rank()})" if dist_util.world_size() > 1 else ""


def _typed(kind, accept, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _typed(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _typed(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _typed(float, lambda v: v > 0, "a positive number")
non_negative_float = _typed(float, lambda v: v >= 0, "a non-negative number")
probability = _typed(float, lambda v: 0 <= v < 1, "at least 0 and below 1")
unit_float = _typed(float, lambda v: 0 <= v <= 1, "between 0 and 1")
decay = unit_float
diffusion_steps = _typed(
    int, lambda v: 1 <= v <= 1000, "between 1 and 1000 (DiT's diffusion has 1000 steps)"
)


def check_output_path(path, what, folder=False):
    """Refuses, before any work, an output path that cannot be written: a folder where a file is
    wanted (or the reverse), or a location under a file or in a folder this user cannot write to."""
    path = os.path.abspath(path)
    if os.path.exists(path) and os.path.isdir(path) != folder:
        raise UserError(
            f"{what} {path} is {'a file' if folder else 'a folder'}: give a "
            f"{'folder' if folder else 'file'} path"
        )
    parent = path if folder else os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{what} {path} cannot be made: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path} cannot be written: no write permission in {parent}")
