"""What a job prints, fit for a terminal and for a file: the run's logger and progress bars.

Under a scheduler, stdout and stderr are files that people read with less and grep. There a progress
bar's carriage-return refreshes and a terminal's colour codes are noise, so when the stream is not a
terminal progress is a plain line every ARD_PROGRESS_SECONDS seconds (default 30, and at the end),
in tqdm's own figures ("train 350/1400 [00:30<01:20, 11.60it/s]", which the main job's stage runner
reads), and log lines carry no colour.
"""

import logging
import os
import sys
import time

from tqdm.auto import tqdm

from ard import dist_util

PROGRESS_SECONDS = "ARD_PROGRESS_SECONDS"


def is_terminal(stream):
    return hasattr(stream, "isatty") and stream.isatty()


def create_logger(logging_dir):
    """A logger that writes to logging_dir/log.txt and stdout on rank 0 and does nothing elsewhere;
    the time stamp is coloured on a terminal only."""
    logger = logging.getLogger(f"run:{logging_dir}")
    logger.propagate = False
    logger.handlers.clear()
    if dist_util.is_main():
        logger.setLevel(logging.INFO)
        stream = logging.StreamHandler(sys.stdout)
        for handler in (stream, logging.FileHandler(os.path.join(logging_dir, "log.txt"))):
            stamp = (
                "\033[34m%(asctime)s\033[0m"
                if handler is stream and is_terminal(sys.stdout)
                else "%(asctime)s"
            )
            handler.setFormatter(
                logging.Formatter(f"[{stamp}] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
            )
            logger.addHandler(handler)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


def _clock(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


class LineProgress:
    """tqdm's interface (update, set_postfix, close) printing one plain line every `every`
    seconds and at the end."""

    def __init__(self, total, initial=0, desc="", unit="it", every=30.0, stream=None):
        self.total, self.n, self.desc, self.unit, self.every = total, initial, desc, unit, every
        self.stream, self.postfix = stream or sys.stderr, ""
        self.start = self.last = time.time()
        self.start_n = initial

    def update(self, n=1):
        self.n += n
        if time.time() - self.last >= self.every:
            self._print()

    def set_postfix(self, **kwargs):
        self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def _print(self):
        self.last = now = time.time()
        elapsed = now - self.start
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        left = _clock((self.total - self.n) / rate) if rate > 0 and self.total else "?"
        postfix = f", {self.postfix}" if self.postfix else ""
        print(
            f"{self.desc} {self.n}/{self.total} [{_clock(elapsed)}<{left}, "
            f"{rate:.2f}{self.unit}/s{postfix}]",
            file=self.stream,
            flush=True,
        )

    def close(self):
        self._print()


class _Silent:
    def update(self, n=1):
        pass

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


def progress(total, desc, initial=0, unit="it", disable=False):
    """A progress bar on rank 0 (and not when `disable`): tqdm on a terminal, a
    LineProgress into a file."""
    if disable or not dist_util.is_main():
        return _Silent()
    if is_terminal(sys.stderr):
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
    return LineProgress(
        total, initial, desc, unit, every=float(os.environ.get(PROGRESS_SECONDS, 30))
    )
