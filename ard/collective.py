"""Decisions every rank takes together, for jobs whose ranks have unequal work (the trajectory
writer, the sampler): a stop signal that reaches any rank, an error on any rank, and the end of the
work.

A rank that acts alone leaves its peers waiting in the next collective, where no signal handler
runs, until the backend's timeout (NCCL) or a "connection closed by peer" error (gloo). So after
every batch a working rank calls `after_batch()`, and a rank whose share is done calls
`wait_for_peers()`, which keeps taking part, round after round, until every rank is done; each round
is one all-reduce of (stop requested, failed, still working). A rank that fails calls
`failed(error)` in its round; then every rank ends with the same sentence. Under plain `python` (a
world of one) the rounds cost nothing.
"""

from contextlib import contextmanager

import torch
import torch.distributed as dist

from ard import dist_util
from ard.cli import UserError
from ard.preemption import Preempted


class PeerFailed(UserError):
    """Another rank failed: this rank ends with that rank's sentence."""


class CollectiveStop:
    """The rounds of one job. `stop` is its StopRequest; `stopped_message` the sentence every rank
    ends with when a signal stops the job (where the work is kept, how to continue)."""

    def __init__(self, stop, device, stopped_message):
        self.stop, self.device, self.stopped_message = stop, device, stopped_message

    def _round(self, working, failed=False):
        """One round: (any rank asked to stop, any rank failed, any rank still working)."""
        votes = [float(self.stop.requested is not None), float(failed), float(working)]
        if dist.is_initialized():
            tensor = torch.tensor(votes, dtype=torch.float64, device=self.device)
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            votes = tensor.tolist()
        return votes[0] > 0, votes[1] > 0, votes[2] > 0

    def after_batch(self):
        """True when every rank must stop after this batch: a signal reached one of them. Keep what
        is complete, then raise `preempted()`. Raises if another rank failed."""
        stop, failed, _ = self._round(working=True)
        if failed:
            raise self._peer_failure(None)
        return stop

    def wait_for_peers(self):
        """Takes part in the rounds until every rank's share is done. Raises Preempted if a signal
        reaches any rank meanwhile, or the sentence of another rank's failure."""
        while True:
            stop, failed, working = self._round(working=False)
            if failed:
                raise self._peer_failure(None)
            if stop:
                raise self.preempted()
            if not working:
                return

    def failed(self, error):
        """Called by a rank whose work raised `error`, in place of its next round: every rank ends.
        Returns the exception this rank raises (its own error); the others raise its sentence."""
        self._round(working=False, failed=True)
        return self._peer_failure(error)

    def preempted(self):
        why = self.stop.requested or "a stop signal to another rank"
        return Preempted(f"{why}: {self.stopped_message}")

    def _peer_failure(self, error):
        """Every rank learns each failure's rank and sentence (one all_gather of objects); a rank
        that failed gets back its own error, the others a UserError naming the first failure."""
        mine = None if error is None else (dist_util.rank(), type(error).__name__, str(error))
        failures = [mine]
        if dist.is_initialized():
            failures = [None] * dist.get_world_size()
            dist.all_gather_object(failures, mine)
        if error is not None:
            return error
        rank, kind, message = next(f for f in failures if f is not None)
        what = message if kind == "UserError" else f"{kind}: {message}"
        return PeerFailed(f"rank {rank} stopped the job: {what}")

    @contextmanager
    def sharing_errors(self):
        """The work of this rank: an exception in it (but a stop or a peer's failure, which every
        rank already knows of) is shared with every rank in place of this rank's next round."""
        try:
            yield
        except (Preempted, PeerFailed):
            raise
        except Exception as error:
            raise self.failed(error)
