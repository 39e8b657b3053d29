"""Runs a pipeline of script stages: their dependencies, which run side by side, and live progress.

Each stage is a script run as its own process, whose output goes to RUN/logs/NAME.log. A stage whose output
exists is reused. A heavy stage (one that everything after it waits for: the teacher, the trajectories) runs alone
with every core; every other stage runs with one thread, as many side by side as there are cores. Small models use
two threads poorly, so two one-thread stages side by side finish sooner than one after the other with two; and a
one-thread stage's numbers do not depend on how many cores the machine has. Ready stages start longest path first (the stage's
estimate plus the longest chain of stages that wait for it). While stages run, one status line shows which stage
of how many, each running stage's own progress (read from its tqdm bar: steps, rate, time left) and an estimate
for the whole run.
"""

import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from fileio import write_json

TQDM = re.compile(r"(\d+)/(\d+) \[([\d:]+)<([\d:?]+),\s*([\d.]+)?\s*([a-zA-Z]+)/s")


@dataclass
class Stage:
    name: str
    output: str
    args: list
    after: tuple = ()  # names of the stages this one needs
    heavy: bool = False
    estimate: float = 5.0  # seconds on the reference machine, for the whole-run estimate
    progress: str = ""
    started: float = 0.0
    proc: object = None
    reader: object = field(default=None, repr=False)


def _seconds(text):
    """'01:23' or '1:02:03' -> seconds; '?' -> None."""
    if "?" in text:
        return None
    total = 0
    for part in text.split(":"):
        total = 60 * total + int(part)
    return total


class StageRunner:
    def __init__(self, run_dir, root, cores=None, heavy_alone=True):
        """heavy_alone=False runs heavy stages like the others, one thread each (tiny budgets, where each stage's
        time is mostly its start)."""
        self.run_dir, self.root, self.heavy_alone = run_dir, root, heavy_alone
        # The cores to use: the caller's, else OMP_NUM_THREADS if set, else every core this process may run on.
        self.cores = cores or int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))
        self.stages, self.done, self.timings, self.paths = {}, set(), {}, {}
        os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
        self.timings_path = os.path.join(run_dir, "timings.json")
        if os.path.isfile(self.timings_path):
            with open(self.timings_path) as f:
                self.timings = json.load(f)
        self.tty = sys.stdout.isatty()
        self.last_report = 0.0

    def path(self, *parts):
        return os.path.join(self.run_dir, *parts)

    def add(self, name, output, args, after=(), heavy=False, estimate=5.0):
        """Declares a stage; returns its output path."""
        assert name not in self.stages, f"stage {name} declared twice"
        self.stages[name] = Stage(name, output, list(args), tuple(after), heavy and self.heavy_alone, estimate)
        return output

    # Running ------------------------------------------------------------------------------------------------

    def run(self):
        """Runs every declared stage that has no output yet, in dependency order; stops at the first failure."""
        for stage in self.stages.values():
            if os.path.exists(stage.output):
                self.done.add(stage.name)
                self._line(f"[{stage.name}] reusing {stage.output}")
        self.start_time, self.factor = time.time(), 1.0
        running = []
        while len(self.done) < len(self.stages):
            for stage in self._ready(running):
                self._start(stage, threads=self.cores if stage.heavy else 1)
                running.append(stage)
            time.sleep(0.2)
            for stage in [s for s in running if s.proc.poll() is not None]:
                running.remove(stage)
                self._finish(stage, running)
            self._status(running)

    def _path(self, stage):
        """Seconds from the start of this stage to the end of the longest chain of stages that wait for it."""
        if stage.name not in self.paths:
            waiting = [s for s in self.stages.values() if stage.name in s.after]
            self.paths[stage.name] = stage.estimate + max((self._path(s) for s in waiting), default=0.0)
        return self.paths[stage.name]

    def _ready(self, running):
        """Stages whose dependencies are done, as many as may start now, longest path first: a heavy stage only
        alone (the others wait for the running ones to finish rather than start ahead of it), the others one per
        free core."""
        if any(s.heavy for s in running):
            return []
        waiting = sorted((s for s in self.stages.values() if s.name not in self.done and s.proc is None
                          and all(d in self.done for d in s.after)), key=self._path, reverse=True)
        start, free = [], self.cores - len(running)
        for stage in waiting:
            if stage.heavy:
                return [stage] if not running and not start else start
            if free == 0:
                break
            start.append(stage)
            free -= 1
        return start

    def _start(self, stage, threads):
        self._line(f"[{stage.name}] {' '.join(stage.args)}")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
        log = open(self.path("logs", f"{stage.name}.log"), "w")
        stage.started = time.time()
        stage.proc = subprocess.Popen([sys.executable, *stage.args], cwd=self.root, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT)
        stage.reader = threading.Thread(target=self._read, args=(stage, log), daemon=True)
        stage.reader.start()

    def _read(self, stage, log):
        """Copies the stage's output to its log, keeping the last tqdm state as its progress."""
        buffer = b""
        with log:
            while chunk := stage.proc.stdout.read1(4096):
                log.write(chunk.decode(errors="replace"))
                log.flush()
                buffer = (buffer + chunk)[-2000:]
                matches = TQDM.findall(buffer.decode(errors="replace"))
                if matches:
                    stage.progress = matches[-1]

    def _finish(self, stage, running):
        stage.reader.join()
        seconds = time.time() - stage.started
        log_path = self.path("logs", f"{stage.name}.log")
        if stage.proc.returncode != 0 or not os.path.exists(stage.output):
            for other in running:
                other.proc.terminate()
            with open(log_path) as log:
                tail = log.read()[-3000:]
            raise SystemExit(f"\n[{stage.name}] failed (exit {stage.proc.returncode}); the last lines of {log_path}:\n{tail}")
        self.timings[stage.name] = seconds
        write_json(self.timings_path, self.timings)
        self.done.add(stage.name)
        if stage.estimate >= 20:  # the machine's speed against the reference machine's, from the long stages
            self.factor = 0.5 * self.factor + 0.5 * min(3.0, max(0.3, seconds / stage.estimate))
        self._line(f"[{stage.name}] done in {seconds:.0f} s ({len(self.done)}/{len(self.stages)} stages)")

    # Reporting ----------------------------------------------------------------------------------------------

    def _left(self, stage):
        """Seconds a running stage has left: its tqdm estimate, else its scaled estimate less the time spent."""
        if stage.progress:
            left = _seconds(stage.progress[3])
            if left is not None:
                return left
        return max(0.0, stage.estimate * self.factor - (time.time() - stage.started))

    def _status(self, running):
        todo = [s for s in self.stages.values() if s.name not in self.done and s.proc is None]
        heavy = sum(s.estimate for s in todo if s.heavy) * self.factor
        light = sum(s.estimate for s in todo if not s.heavy) * self.factor / self.cores
        total = heavy + light + max((self._left(s) for s in running), default=0.0)
        parts = []
        for s in running:
            if s.progress:
                n, of, _, left, rate, unit = s.progress
                parts.append(f"{s.name} {n}/{of} ({rate or '?'} {unit}/s, {left} left)")
            else:
                parts.append(f"{s.name} ({time.time() - s.started:.0f} s)")
        line = (f"[{len(self.done)}/{len(self.stages)} done, {(time.time() - self.start_time) / 60:.1f} min] "
                f"{' | '.join(parts)} | run ~{total / 60:.1f} min left")
        if self.tty:
            sys.stdout.write("\r\033[K" + line[: os.get_terminal_size().columns - 1])
            sys.stdout.flush()
        elif time.time() - self.last_report > 30:
            print(line, flush=True)
            self.last_report = time.time()

    def _line(self, text):
        if self.tty:
            sys.stdout.write("\r\033[K")
        print(text, flush=True)
