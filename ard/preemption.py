"""Stopping when a cluster asks: a scheduler that preempts or times out a job sends SIGTERM (SLURM:
often SIGUSR1 first, with --signal), waits a grace period, then kills it. A long job turns the first
such signal into a request: the trainers finish the optimiser step in flight, write a checkpoint of
it and exit; the trajectory writer and the sampler finish the batch in flight and keep every
complete shard or chunk. They then exit with EXIT_PREEMPTED, so a job script can tell "stopped,
resubmit" from success and from failure, and the same command resumes (--resume auto for the
trainers). A second signal exits at once, as the signal would by default.
"""

import os
import signal
import time

# sysexits.h's EX_TEMPFAIL: "a temporary failure; the user is invited to retry", what a preempted
# job is.
EXIT_PREEMPTED = 75
STOP_SIGNALS = ("TERM", "USR1", "USR2", "INT", "HUP")
# A signal within this many seconds of the first is the same request: a scheduler signals every
# process of a job, and torchrun's agent forwards the SIGTERM it receives to its workers, so a
# worker may get two at once.
SAME_REQUEST_SECONDS = 1.0


# What a job stopped by a signal leaves in its folder (a training run's, a store, OUT.chunks/ of the
# sampler): torchrun's agent reports a worker's exit status 75 as 1, so a job script cannot tell a
# preempted job from a failed one by the status; it tests this file instead (docs/reliability.md).
MARKER = "PREEMPTED"


def mark_preempted(folder, message):
    """Leaves folder/PREEMPTED, holding the stop's message, once the work in flight is safe."""
    path = os.path.join(folder, MARKER)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(message + "\n")
    os.replace(tmp, path)


def clear_preempted(folder):
    """Removes folder/PREEMPTED when a job starts: the marker says how the last attempt ended."""
    path = os.path.join(folder, MARKER)
    if os.path.exists(path):
        os.remove(path)


class Preempted(Exception):
    """Raised once the work in flight is safe on disk; the message says where and how to continue.
    `ard.cli.run` prints it and exits with EXIT_PREEMPTED."""


class StopRequest:
    """Turns the first of `signals` (names such as 'TERM') into a request, `requested` (its name,
    such as 'SIGTERM', or None), that the job reads at its next safe point; a second one,
    SAME_REQUEST_SECONDS or more later, restores the default action and re-sends itself, which ends
    the process at once. A DataLoader worker ignores these signals (see ignore_in_worker): its
    parent stops it."""

    def __init__(self, signals=("TERM", "USR1")):
        self.requested, self.at = None, None
        self.signals = [getattr(signal, f"SIG{name}") for name in signals]
        self.previous = {signum: signal.signal(signum, self._handle) for signum in self.signals}

    def close(self):
        """Gives the signals back to the handlers they had before."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        if self.requested is None:
            self.requested, self.at = signal.Signals(signum).name, time.monotonic()
        elif time.monotonic() - self.at >= SAME_REQUEST_SECONDS:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def ignore_in_worker(self, worker_id=None):
        """A DataLoader worker_init_fn: a scheduler signals every process of the job, and a worker
        that died of it would fail the batch the trainer is finishing."""
        for signum in self.signals:
            signal.signal(signum, signal.SIG_IGN)


def add_stop_argument(parser):
    parser.add_argument(
        "--stop-signals",
        nargs="+",
        choices=STOP_SIGNALS,
        default=["TERM", "USR1"],
        metavar="SIGNAL",
        help="signals that stop the job cleanly (saving the work in flight, exit status "
        f"{EXIT_PREEMPTED}); a second one exits at once; one or more of {', '.join(STOP_SIGNALS)}",
    )
