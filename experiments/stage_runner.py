"""Runs a pipeline of script stages: their dependencies, which run side by side, and live progress.

Each stage is a script run as its own process, whose output goes to RUN/logs/NAME.log. A stage whose
output exists is reused. A heavy stage (one that everything after it waits for: the teacher, the
trajectories) runs alone with every core, or shares them with the other heavy stages ready at the
same time (the two teachers of --full, then their trajectory writers); every other stage runs with
one thread, as many side by side as there are cores. Small models use two threads poorly, so two
one-thread stages side by side finish sooner than one after the other with two; and a one-thread
stage's numbers do not depend on how many cores the machine has. Ready stages start longest path
first (the stage's estimate plus the longest chain of stages that wait for it). While stages run,
one status line shows which stage of how many, each running stage's own progress (read from its tqdm
bar: steps, rate, time left) and an estimate for the whole run.

One-thread stages start as forks of a server process that has imported torch, numpy and scipy once:
the 2.5-4 s that a fresh Python process spends importing them is most of a sampling or evaluation
stage. Each fork runs its script as `python ARGS` would (sys.argv, sys.path[0], __main__, its own
environment, working folder and log), and computes the same numbers (tests/test_stage_runner.py).
Stages with more threads, whose count the OpenMP runtime fixes when it starts, are fresh processes.
"""

import json
import os
import re
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from ard.fileio import write_json
from ard.logs import PROGRESS_SECONDS
from ard.preemption import Preempted, StopRequest

TQDM = re.compile(r"(\d+)/(\d+) \[([\d:]+)<([\d:?]+),\s*([\d.]+)?\s*([a-zA-Z]+)/s")


@dataclass
class Stage:
    name: str
    output: str
    args: list
    after: tuple = ()  # names of the stages this one needs
    heavy: bool = False
    # Seconds on the reference machine (all cores if heavy, else one), for the whole-run estimate.
    estimate: float = 5.0
    threads: int = 0  # what it was started with
    progress: str = ""
    started: float = 0.0
    proc: object = None  # a subprocess.Popen, or a ForkedStage: poll(), returncode, terminate()
    log: object = None  # the stage's log, open for reading its progress
    tail: str = ""
    log_start: int = 0  # where this invocation's lines begin in the stage's log
    # user + system CPU time of the finished stage (its own children's included):
    cpu_seconds: float = None


def _seconds(text):
    """'01:23' or '1:02:03' -> seconds; '?' -> None."""
    if "?" in text:
        return None
    total = 0
    for part in text.split(":"):
        total = 60 * total + int(part)
    return total


# The fork server ----------------------------------------------------------------------------------

# What the stages import, none of this repository: torch._dynamo is imported by the first
# torch.optim optimiser (1.3-1.9 s in every training stage on the 2-core machine, as the machine's
# speed varies).
PRELOAD = ("torch", "torch._dynamo", "numpy", "scipy.linalg", "tqdm", "PIL.Image")


def _run_as_main(args):
    """Runs `python ARGS` in this process (args: a script and its arguments, '-m MODULE ...' or
    '-c CODE ...') as the interpreter would: sys.argv, sys.path[0] and __main__ as it sets them.
    Returns the exit status."""
    import runpy
    import traceback

    try:
        if args[0] == "-c":
            sys.argv, sys.path[0] = ["-c", *args[2:]], ""
            exec(
                compile(args[1], "<string>", "exec"),
                {"__name__": "__main__", "__builtins__": __builtins__},
            )
        elif args[0] == "-m":
            sys.argv, sys.path[0] = [args[1], *args[2:]], os.getcwd()
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv, sys.path[0] = list(args), os.path.dirname(os.path.abspath(args[0]))
            runpy.run_path(args[0], run_name="__main__")
        return 0
    except SystemExit as exit:
        if exit.code is None or isinstance(exit.code, int):
            return exit.code or 0
        print(exit.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1


def _child(request):
    """In the forked child: the stage's folder, environment, log, then its script; never returns."""
    import atexit
    import io
    import random

    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        sys.stdin = open(0, closefd=False)
        sys.stdout = io.TextIOWrapper(
            io.FileIO(1, "w", closefd=False),
            encoding="utf-8",
            line_buffering=True,
            write_through=True,
        )
        sys.stderr = io.TextIOWrapper(
            io.FileIO(2, "w", closefd=False),
            encoding="utf-8",
            errors="backslashreplace",
            line_buffering=True,
            write_through=True,
        )
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        # A fresh process draws these from the OS; the forks must not share the server's.
        random.seed()
        sys.modules["numpy"].random.seed()
        code = _run_as_main(request["args"])
        atexit._run_exitfuncs()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve():
    """The fork server: imports PRELOAD once, then for each request read from stdin (a JSON line:
    id, args, env, cwd, log) forks a child that runs the stage, and answers with JSON lines {id,
    pid} when it starts and {id, exit, cpu} when it ends (the exit status as subprocess gives it,
    negative for a signal; its user + system CPU seconds). Runs single-threaded (a fork copies only
    the calling thread); ends when stdin closes, terminating the children still running."""
    import importlib

    # On Ctrl-C the runner closes stdin, and it forwards a scheduler's stop signals to the stages:
    # the server stays to end the children and report their exit.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    for name in PRELOAD:
        importlib.import_module(name)
    children, buffer, open_ = {}, b"", True

    def answer(message):
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    while open_ or children:
        if open_ and select.select([0], [], [], 0.05)[0]:
            chunk = os.read(0, 65536)
            open_ = bool(chunk)
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in filter(None, lines):
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(request)
                children[pid] = request["id"]
                answer({"id": request["id"], "pid": pid})
            if not open_:
                for pid in children:
                    os.kill(pid, signal.SIGTERM)
        elif not open_:
            time.sleep(0.05)
        while children:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
            if pid == 0:
                break
            answer(
                {
                    "id": children.pop(pid),
                    "exit": os.waitstatus_to_exitcode(status),
                    "cpu": usage.ru_utime + usage.ru_stime,
                }
            )


class ForkedStage:
    """A stage run by the fork server, with the part of subprocess.Popen's interface runners use."""

    def __init__(self):
        self.pid, self.returncode, self.cpu_seconds = None, None, None
        self.started = threading.Event()

    def poll(self):
        return self.returncode

    def send_signal(self, signum):
        self.started.wait()
        if self.returncode is not None:
            return  # reaped by the server: its pid may be another process's by now
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def terminate(self):
        self.send_signal(signal.SIGTERM)


class ForkServer:
    """The runner's end of `serve`: starts it, sends it stages, reads its answers on a thread."""

    def __init__(self, root, env):
        # The repository root on sys.path just for the import; then sys.path[0] is '' again, as
        # `python -c` has it.
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        start = (
            f"import sys; sys.path.insert(0, {repo!r}); from experiments import stage_runner; "
            "del sys.path[0]; stage_runner.serve()"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", start],
            cwd=root,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.stages, self.next_id, self.lock = {}, 0, threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def start(self, args, env, cwd, log):
        stage = ForkedStage()
        with self.lock:
            self.next_id += 1
            self.stages[self.next_id] = stage
            request = dict(id=self.next_id, args=list(args), env=env, cwd=cwd, log=log)
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        return stage

    def _read(self):
        for line in self.proc.stdout:
            message = json.loads(line)
            with self.lock:
                stage = self.stages[message["id"]]
            if "pid" in message:
                stage.pid = message["pid"]
                stage.started.set()
            else:
                stage.cpu_seconds = message["cpu"]
                stage.returncode = message["exit"]
        with self.lock:  # the server is gone: whatever it did not report did not finish
            for stage in self.stages.values():
                if stage.returncode is None:
                    stage.returncode = -1
                stage.started.set()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()
        self.reader.join()


class StageRunner:
    def __init__(self, run_dir, root, cores=None, heavy_alone=True, fork=True):
        """heavy_alone=False runs heavy stages like the others, one thread each (tiny budgets, where
        each stage's time is mostly its start). With fork=False, or on a system other than Linux,
        every stage is a fresh process."""
        self.run_dir, self.root, self.heavy_alone = run_dir, root, heavy_alone
        # Forks only on Linux: on macOS, forks of frameworks are unsafe.
        self.fork, self.server = fork and sys.platform.startswith("linux"), None
        # The cores to use: the caller's, else OMP_NUM_THREADS if set, else every core this process
        # may run on.
        self.cores = (
            cores or int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))
        )
        self.stages, self.done, self.paths = {}, set(), {}
        os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
        self.timings_path = os.path.join(run_dir, "timings.json")
        # Each stage's CPU time (user + system).
        self.cpu_path = os.path.join(run_dir, "cpu_seconds.json")
        self.timings, self.cpu = {}, {}
        for attr, path in (("timings", self.timings_path), ("cpu", self.cpu_path)):
            if os.path.isfile(path):
                with open(path) as f:
                    setattr(self, attr, json.load(f))
        self.tty = sys.stdout.isatty()
        self.last_report = 0.0

    def path(self, *parts):
        return os.path.join(self.run_dir, *parts)

    def add(self, name, output, args, after=(), heavy=False, estimate=5.0):
        """Declares a stage; returns its output path."""
        assert name not in self.stages, f"stage {name} declared twice"
        self.stages[name] = Stage(
            name, output, list(args), tuple(after), heavy and self.heavy_alone, estimate
        )
        return output

    def keep(self, names):
        """Drops every declared stage but `names` and the stages they need."""
        kept, todo = set(), list(names)
        while todo:
            name = todo.pop()
            if name not in kept:
                kept.add(name)
                todo += self.stages[name].after
        self.stages = {name: stage for name, stage in self.stages.items() if name in kept}
        self.paths = {}

    # Running --------------------------------------------------------------------------------------

    def run(self):
        """Runs every declared stage that has no output yet, in dependency order; stops at the first
        failure. On SIGTERM or SIGUSR1 it passes the signal on to the running stages, starts no
        other, waits for them to save their work and raises Preempted: the same command then resumes
        (finished stages are reused, training stages resume from their last checkpoint if their
        command says --resume auto)."""
        for stage in self.stages.values():
            if os.path.exists(stage.output):
                self.done.add(stage.name)
                self._line(f"[{stage.name}] reusing {stage.output}")
        self.start_time, self.factor = time.time(), 1.0
        if self.fork and any(
            stage.name not in self.done and not stage.heavy for stage in self.stages.values()
        ):
            self._server()  # it imports while the first stages run
        running, self.stop, forwarded = [], StopRequest(("TERM", "USR1")), False
        try:
            while len(self.done) < len(self.stages):
                if self.stop.requested and not forwarded:
                    names = ", ".join(stage.name for stage in running) or "no stage"
                    self._line(f"[runner] {self.stop.requested}: passing it on to {names}")
                    for stage in running:
                        stage.proc.send_signal(getattr(signal, self.stop.requested))
                    forwarded = True
                if self.stop.requested and not running:
                    raise Preempted(
                        f"{self.stop.requested}: {len(self.done)} of {len(self.stages)} stages "
                        "are done and the stopped ones saved their work; the same command resumes "
                        f"the run in {self.run_dir}"
                    )
                start = [] if self.stop.requested else self._ready(running)
                heavy = sum(stage.heavy for stage in start)
                for stage in start:
                    self._start(stage, threads=self.cores // heavy if stage.heavy else 1)
                    running.append(stage)
                time.sleep(0.2)
                for stage in running:
                    self._read(stage)
                finished = [stage for stage in running if self._poll(stage) is not None]
                for stage in finished:
                    running.remove(stage)  # all of them first: none is stopped as still running
                for stage in finished:
                    self._finish(stage, running)
                self._status(running)
        finally:
            self.stop.close()
            if self.server:
                self.server.close()
                self.server = None

    def _path(self, stage):
        """Seconds from this stage's start to the end of the longest chain that waits for it."""
        if stage.name not in self.paths:
            waiting = [other for other in self.stages.values() if stage.name in other.after]
            self.paths[stage.name] = stage.estimate + max(
                (self._path(other) for other in waiting), default=0.0
            )
        return self.paths[stage.name]

    def _ready(self, running):
        """Stages whose dependencies are done, as many as may start now, longest path first: heavy
        stages only when nothing else runs, alone or with the other heavy stages ready, up to one
        per core (the others wait for the running ones to finish rather than start ahead of them),
        the others one per free core."""
        if any(stage.heavy for stage in running):
            return []
        waiting = sorted(
            (
                stage
                for stage in self.stages.values()
                if stage.name not in self.done
                and stage.proc is None
                and all(name in self.done for name in stage.after)
            ),
            key=self._path,
            reverse=True,
        )
        start, free = [], self.cores - len(running)
        for stage in waiting:
            if stage.heavy:
                if running or start:
                    return start
                return [other for other in waiting if other.heavy][: self.cores]
            if free == 0:
                break
            start.append(stage)
            free -= 1
        return start

    def _start(self, stage, threads):
        """Starts the stage with `threads` threads: a one-thread stage as a fork of the server, any
        other as a fresh process. Either way its output goes straight to its log."""
        self._line(f"[{stage.name}] {' '.join(stage.args)}")
        env = self._env(threads)
        log_path = self.path("logs", f"{stage.name}.log")
        stage.started, stage.threads = time.time(), threads
        # Appended to: an earlier invocation's lines (the error that stopped it) stay above.
        with open(log_path, "ab") as log:
            start = stage.log_start = log.tell()
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')}: started ===\n".encode())
            log.flush()
            if threads == 1 and self.fork:
                stage.proc = self._server().start(
                    stage.args, env, os.path.abspath(self.root), os.path.abspath(log_path)
                )
            else:
                stage.proc = subprocess.Popen(
                    [sys.executable, *stage.args],
                    cwd=self.root,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
        stage.log = open(log_path, "rb")
        stage.log.seek(start)  # progress is read from this invocation's lines only

    @staticmethod
    def _env(threads):
        # Stages write to log files: a progress line every 2 s keeps the status line current.
        return dict(
            os.environ,
            OMP_NUM_THREADS=str(threads),
            PYTHONUNBUFFERED="1",
            **{PROGRESS_SECONDS: "2"},
        )

    def _server(self):
        if self.server is None:
            # The one-thread stages' environment, for its imports.
            self.server = ForkServer(self.root, self._env(1))
        return self.server

    def _read(self, stage):
        """Reads what the stage logged since the last call; its last tqdm state is its progress."""
        chunk = stage.log.read()
        if chunk:
            stage.tail = (stage.tail + chunk.decode(errors="replace"))[-2000:]
            matches = TQDM.findall(stage.tail)
            if matches:
                stage.progress = matches[-1]

    @staticmethod
    def _poll(stage):
        """The stage's exit status, or None while it runs. A forked stage's CPU time comes from the
        fork server; a fresh process's is what the poll that reaps it adds to this process's
        children's rusage."""
        if isinstance(stage.proc, ForkedStage):
            code = stage.proc.poll()
            stage.cpu_seconds = stage.proc.cpu_seconds
            return code
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        code = stage.proc.poll()
        if code is not None and stage.cpu_seconds is None:
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            stage.cpu_seconds = (after.ru_utime + after.ru_stime) - (
                before.ru_utime + before.ru_stime
            )
        return code

    def _account(self, stage):
        """Adds the stage's wall and CPU seconds of this invocation to the run's: they add up over
        invocations, so a stage stopped and resumed counts both parts. Returns the wall seconds."""
        seconds = time.time() - stage.started
        stage.log.close()
        self.timings[stage.name] = self.timings.get(stage.name, 0.0) + seconds
        write_json(self.timings_path, self.timings)
        if stage.cpu_seconds is not None:
            self.cpu[stage.name] = self.cpu.get(stage.name, 0.0) + stage.cpu_seconds
            write_json(self.cpu_path, self.cpu)
        return seconds

    def _stop_others(self, running, wait=120.0):
        """After a failure: SIGTERM to the stages still running (a training stage saves a
        checkpoint on it), a wait of up to `wait` seconds for them to exit, and their time
        accounted like any stopped stage's; SIGKILL to any still running then, so that no stage
        outlives the runner (a rerun would start it again beside itself)."""
        for other in running:
            other.proc.terminate()
        deadline = time.time() + wait
        while time.time() < deadline and [self._poll(other) for other in running].count(None):
            time.sleep(0.2)
        for other in running:
            if self._poll(other) is None:
                self._line(f"[{other.name}] still running {wait:.0f} s after SIGTERM: killed")
                other.proc.send_signal(signal.SIGKILL)
            else:
                seconds = self._account(other)
                self._line(f"[{other.name}] stopped after {seconds:.0f} s, as another stage failed")

    def _finish(self, stage, running):
        seconds = self._account(stage)
        log_path = self.path("logs", f"{stage.name}.log")
        if stage.proc.returncode != 0 and self.stop.requested:
            self._line(
                f"[{stage.name}] stopped (exit {stage.proc.returncode}) after {seconds:.0f} s"
            )
            return
        if stage.proc.returncode != 0 or not os.path.exists(stage.output):
            self._stop_others(running)
            with open(log_path, "rb") as log:
                log.seek(stage.log_start)  # this invocation's lines: an earlier one's error is not
                tail = log.read().decode(errors="replace")[-3000:]
            raise SystemExit(
                f"\n[{stage.name}] failed (exit {stage.proc.returncode}); the last lines of "
                f"{log_path}:\n{tail}"
            )
        self.done.add(stage.name)
        # The machine's speed against the reference machine's, from the long stages that ran with
        # the threads their estimates assume (heavy stages sharing the cores are slower for that
        # reason, not for the machine's):
        if stage.estimate >= 20 and stage.threads == (self.cores if stage.heavy else 1):
            self.factor = 0.5 * self.factor + 0.5 * min(3.0, max(0.3, seconds / stage.estimate))
        cpu = f", {stage.cpu_seconds:.0f} s of CPU" if stage.cpu_seconds is not None else ""
        done = f"{len(self.done)}/{len(self.stages)} stages"
        self._line(f"[{stage.name}] done in {seconds:.0f} s{cpu} ({done})")

    # Reporting ------------------------------------------------------------------------------------

    def _left(self, stage):
        """Time a running stage has left: its tqdm estimate, else its scaled one less time run."""
        if stage.progress:
            left = _seconds(stage.progress[3])
            if left is not None:
                return left
        return max(0.0, stage.estimate * self.factor - (time.time() - stage.started))

    def _status(self, running):
        todo = [
            stage
            for stage in self.stages.values()
            if stage.name not in self.done and stage.proc is None
        ]
        heavy = sum(stage.estimate for stage in todo if stage.heavy) * self.factor
        light = sum(stage.estimate for stage in todo if not stage.heavy) * self.factor / self.cores
        total = heavy + light + max((self._left(stage) for stage in running), default=0.0)
        parts = []
        for stage in running:
            if stage.progress:
                done, of, _, left, rate, unit = stage.progress
                parts.append(f"{stage.name} {done}/{of} ({rate or '?'} {unit}/s, {left} left)")
            else:
                parts.append(f"{stage.name} ({time.time() - stage.started:.0f} s)")
        minutes = (time.time() - self.start_time) / 60
        line = (
            f"[{len(self.done)}/{len(self.stages)} done, {minutes:.1f} min] "
            f"{' | '.join(parts)} | run ~{total / 60:.1f} min left"
        )
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
