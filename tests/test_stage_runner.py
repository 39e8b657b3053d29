"""The main job's stage runner: dependency order, heavy stages alone, reuse, progress from tqdm,
failures."""

import json
import os

import pytest

from experiments.stage_runner import TQDM, StageRunner


def writer(path, text="x", tqdm_line=""):
    """A stage: a tiny Python process that prints a tqdm-like line, records when it ran, writes."""
    code = (
        f"import time, os; print({tqdm_line!r}, flush=True); "
        f"open({path!r} + '.t', 'w').write(repr((time.time(), os.environ['OMP_NUM_THREADS']))); "
        f"time.sleep(0.3); open({path!r}, 'w').write({text!r})"
    )
    return ["-c", code]


def ran(path):
    with open(path + ".t") as f:
        return eval(f.read())  # (start time, threads)


def test_stages_run_after_their_dependencies_heavy_ones_alone_and_finished_ones_are_reused(
    tmp_path,
):
    runner = StageRunner(str(tmp_path / "run"), str(tmp_path), cores=2)
    out = {name: str(tmp_path / name) for name in ("a", "b", "c", "d")}
    runner.add("a", out["a"], writer(out["a"]), heavy=True)
    runner.add("b", out["b"], writer(out["b"]), after=["a"])
    runner.add("c", out["c"], writer(out["c"]), after=["a"])
    runner.add("d", out["d"], writer(out["d"]), after=["b", "c"], heavy=True)
    runner.run()
    (ta, threads_a), (tb, threads_b), (tc, _), (td, _) = (ran(out[name]) for name in "abcd")
    assert ta < tb and ta < tc and max(tb, tc) < td
    assert abs(tb - tc) < 0.3  # the two light stages ran side by side ...
    # ... with one thread each; the heavy one had both cores.
    assert (threads_a, threads_b) == ("2", "1")
    with open(tmp_path / "run" / "timings.json") as f:
        assert set(json.load(f)) == {"a", "b", "c", "d"}
    assert os.path.isfile(tmp_path / "run" / "logs" / "a.log")
    os.remove(out["d"])  # a second run redoes only what is missing
    os.remove(out["a"] + ".t")
    again = StageRunner(str(tmp_path / "run"), str(tmp_path), cores=2)
    for name, after in (("a", []), ("b", ["a"]), ("c", ["a"]), ("d", ["b", "c"])):
        again.add(name, out[name], writer(out[name]), after=after)
    again.run()
    assert not os.path.exists(out["a"] + ".t") and ran(out["d"])[0] > td


def test_a_failed_stage_stops_the_run_and_shows_its_log(tmp_path):
    runner = StageRunner(str(tmp_path / "run"), str(tmp_path), cores=2)
    runner.add(
        "bad", str(tmp_path / "never"), ["-c", "import sys; print('the reason'); sys.exit(3)"]
    )
    runner.add("after_bad", str(tmp_path / "x"), writer(str(tmp_path / "x")), after=["bad"])
    with pytest.raises(SystemExit, match="(?s)bad.*exit 3.*the reason"):
        runner.run()
    assert not os.path.exists(tmp_path / "x")


def test_progress_is_read_from_a_tqdm_line():
    line = "distil:  40%|####      | 320/800 [01:52<02:48,  2.85it/s, loss=0.0008]"
    # Steps done, of, elapsed, left, rate, unit.
    assert TQDM.findall(line)[-1] == ("320", "800", "01:52", "02:48", "2.85", "it")


def test_omp_num_threads_limits_the_cores(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert StageRunner(str(tmp_path / "a"), str(tmp_path)).cores == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert StageRunner(str(tmp_path / "b"), str(tmp_path)).cores == len(os.sched_getaffinity(0))


def test_light_stages_fill_every_core_with_one_thread_each_longest_path_first(tmp_path):
    out = {name: str(tmp_path / name) for name in ("a", "b", "c", "x", "y", "z")}
    runner = StageRunner(str(tmp_path / "run3"), str(tmp_path), cores=3)
    for name in "abc":
        runner.add(name, out[name], writer(out[name]))
    runner.run()
    starts = [ran(out[name]) for name in "abc"]
    assert max(start for start, _ in starts) - min(start for start, _ in starts) < 0.3
    assert {threads for _, threads in starts} == {"1"}
    one_core = StageRunner(str(tmp_path / "run1"), str(tmp_path), cores=1)
    # z is declared first, but x leads the longer chain (1 + 100).
    one_core.add("z", out["z"], writer(out["z"]), estimate=50)
    one_core.add("x", out["x"], writer(out["x"]), estimate=1)
    one_core.add("y", out["y"], writer(out["y"]), after=["x"], estimate=100)
    one_core.run()
    assert ran(out["x"])[0] < ran(out["y"])[0] < ran(out["z"])[0]


def reporter(path):
    """A stage that records what a fresh `python -c` would show it: whether torch was imported
    before it ran, sys.argv, sys.path[0], __name__, the working folder, an environment variable, a
    random draw and a torch result."""
    code = (
        "import sys; preloaded = 'torch' in sys.modules; import json, os, numpy, torch; "
        "torch.manual_seed(0); x = torch.randn(64, 64); "
        "json.dump(dict(preloaded=preloaded, argv=sys.argv, path0=sys.path[0], name=__name__, "
        "cwd=os.getcwd(), threads=os.environ['OMP_NUM_THREADS'], "
        "torch_threads=torch.get_num_threads(), draw=numpy.random.rand(), "
        f"result=(x @ x).sum().item()), open({path!r}, 'w'))"
    )
    return ["-c", code, "an argument"]


def test_one_thread_stages_are_forks_that_run_as_a_fresh_python_would(tmp_path):
    out = {name: str(tmp_path / f"{name}.json") for name in ("fresh", "fork1", "fork2")}
    runner = StageRunner(str(tmp_path / "run"), str(tmp_path), cores=2)
    # Alone, with both cores: a fresh process.
    runner.add("fresh", out["fresh"], reporter(out["fresh"]), heavy=True)
    runner.add("fork1", out["fork1"], reporter(out["fork1"]), after=["fresh"])
    runner.add("fork2", out["fork2"], reporter(out["fork2"]), after=["fresh"])
    runner.run()
    fresh, fork1, fork2 = (json.load(open(out[name])) for name in ("fresh", "fork1", "fork2"))
    assert not fresh["preloaded"] and fork1["preloaded"] and fork2["preloaded"]
    for fork in (fork1, fork2):
        assert fork["argv"] == fresh["argv"] == ["-c", "an argument"]
        assert (fork["path0"], fork["name"], fork["cwd"]) == (
            fresh["path0"],
            "__main__",
            str(tmp_path),
        )
        assert (fork["threads"], fork["torch_threads"]) == ("1", 1) and fresh["threads"] == "2"
        assert fork["result"] == fresh["result"]  # the same numbers
    assert fork1["draw"] != fork2["draw"]  # unseeded randomness is not shared between forks


def test_a_forked_stage_runs_scripts_and_modules_and_reports_failures(tmp_path):
    (tmp_path / "script.py").write_text(
        "import sys\nprint('script', sys.argv[1:], __name__)\nopen(sys.argv[1], 'w').write('x')\n"
    )
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "mod.py").write_text(
        "import sys\nif __name__ == '__main__':\n    open(sys.argv[1], 'w').write(sys.argv[0])\n"
    )
    runner = StageRunner(str(tmp_path / "run"), str(tmp_path), cores=2)
    runner.add("script", str(tmp_path / "s.out"), ["script.py", str(tmp_path / "s.out")])
    runner.add("module", str(tmp_path / "m.out"), ["-m", "pkg.mod", str(tmp_path / "m.out")])
    runner.run()
    assert "script ['" in (tmp_path / "run" / "logs" / "script.log").read_text()
    assert (tmp_path / "m.out").read_text() == str(tmp_path / "pkg" / "mod.py")
    failing = StageRunner(str(tmp_path / "run2"), str(tmp_path), cores=2)
    failing.add("raises", str(tmp_path / "never"), ["-c", "raise ValueError('the reason')"])
    with pytest.raises(SystemExit, match="(?s)raises.*exit 1.*ValueError: the reason"):
        failing.run()


def test_heavy_stages_ready_together_share_the_cores(tmp_path):
    out = {name: str(tmp_path / name) for name in ("a", "b", "c")}
    runner = StageRunner(str(tmp_path / "run"), str(tmp_path), cores=2)
    runner.add("a", out["a"], writer(out["a"]), heavy=True)
    runner.add("b", out["b"], writer(out["b"]), heavy=True)
    runner.add("c", out["c"], writer(out["c"]), after=["a"], heavy=True)
    runner.run()
    (ta, tha), (tb, thb), (tc, thc) = (ran(out[name]) for name in "abc")
    assert abs(ta - tb) < 0.3 and (tha, thb) == ("1", "1")  # side by side, one core each
    assert tc > max(ta, tb) and thc == "2"  # alone: every core


def test_only_stages_with_the_threads_their_estimates_assume_rescale_the_run_estimate(tmp_path):
    out = {name: str(tmp_path / name) for name in ("a", "b", "c")}
    sharing = StageRunner(str(tmp_path / "run"), str(tmp_path), cores=2)
    # a and b share the cores: no measure of speed.
    sharing.add("a", out["a"], writer(out["a"]), heavy=True, estimate=100)
    sharing.add("b", out["b"], writer(out["b"]), heavy=True, estimate=100)
    sharing.run()
    assert sharing.factor == 1.0
    alone = StageRunner(str(tmp_path / "run2"), str(tmp_path), cores=2)
    # Alone, with every core: 0.3 s of 100 is fast.
    alone.add("c", out["c"], writer(out["c"]), heavy=True, estimate=100)
    alone.run()
    assert alone.factor < 1.0


def test_each_stage_records_its_own_cpu_time_forked_or_fresh(tmp_path):
    """A stage that burns about 0.6 s of CPU beside one that sleeps 0.6 s, forked by the server and
    as fresh processes. Each stage's recorded CPU time is its own, not its neighbour's."""

    def burner(path, burn):
        loop = (
            "t = time.process_time()\nwhile time.process_time() - t < 0.6: pass"
            if burn
            else "time.sleep(0.6)"
        )
        return ["-c", f"import time\n{loop}\nopen({path!r}, 'w').write('x')"]

    for fork in (True, False):
        kind = "fork" if fork else "fresh"
        runner = StageRunner(str(tmp_path / kind), str(tmp_path), cores=2, fork=fork)
        for name, burn in ((f"{kind}_burn", True), (f"{kind}_sleep", False)):
            runner.add(name, str(tmp_path / name), burner(str(tmp_path / name), burn))
        runner.run()
        with open(tmp_path / kind / "cpu_seconds.json") as f:
            cpu = json.load(f)
        assert set(cpu) == {f"{kind}_burn", f"{kind}_sleep"}
        # Its 0.6 s, plus starting Python (and its imports, if fresh).
        assert 0.55 < cpu[f"{kind}_burn"] < 3.0, cpu
        assert cpu[f"{kind}_sleep"] < cpu[f"{kind}_burn"] - 0.4, cpu


def test_a_rerun_stage_keeps_its_earlier_log_and_adds_up_its_cpu_time(tmp_path):
    out, marker = str(tmp_path / "out"), str(tmp_path / "tried")
    # Fails the first time (after 0.6 s of CPU), succeeds the second (another 0.6 s).
    code = (
        "import os, sys, time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\n"
        f"if not os.path.exists({marker!r}):\n"
        f"    open({marker!r}, 'w').close(); print('the first reason'); sys.exit(3)\n"
        f"print('the second time'); open({out!r}, 'w').write('x')"
    )
    for attempt in range(2):
        runner = StageRunner(str(tmp_path / "run"), str(tmp_path), cores=2)
        runner.add("flaky", out, ["-c", code])
        if attempt == 0:
            with pytest.raises(SystemExit, match="the first reason"):
                runner.run()
        else:
            runner.run()
    log = (tmp_path / "run" / "logs" / "flaky.log").read_text()
    assert log.count("started ===") == 2
    assert log.index("the first reason") < log.index("the second time")
    with open(tmp_path / "run" / "cpu_seconds.json") as f:
        assert json.load(f)["flaky"] > 1.15  # both invocations' 0.6 s
    with open(tmp_path / "run" / "timings.json") as f:
        assert json.load(f)["flaky"] > 1.15


def test_a_failure_shows_this_invocations_log_lines_only(tmp_path):
    counter = str(tmp_path / "count")
    code = (
        "import os, sys\n"
        f"n = len(open({counter!r}).read()) if os.path.exists({counter!r}) else 0\n"
        f"open({counter!r}, 'a').write('x'); print(f'reason number {{n}}'); sys.exit(3)"
    )
    for attempt in range(2):
        runner = StageRunner(str(tmp_path / "run"), str(tmp_path), cores=2)
        runner.add("bad", str(tmp_path / "never"), ["-c", code])
        with pytest.raises(SystemExit) as failure:
            runner.run()
        assert f"reason number {attempt}" in str(failure.value)
    assert "reason number 0" not in str(failure.value)  # the first invocation's is in the log only
    assert "reason number 0" in (tmp_path / "run" / "logs" / "bad.log").read_text()


def test_a_failure_stops_the_other_running_stages_waits_for_them_and_counts_their_time(tmp_path):
    saved, ready = str(tmp_path / "saved"), str(tmp_path / "ready")
    # A stage that saves its work on SIGTERM, as a training stage does, after 0.5 s of CPU.
    patient = (
        "import signal, sys, time\n"
        "def stop(*_):\n"
        f"    open({saved!r}, 'w').write('x'); sys.exit(1)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "t = time.process_time()\nwhile time.process_time() - t < 0.5: pass\n"
        f"open({ready!r}, 'w').write('x')\n"
        "time.sleep(60)"
    )
    # It fails once the patient one is ready, however slowly a loaded machine starts it.
    failing = (
        "import os, sys, time\n"
        f"while not os.path.exists({ready!r}): time.sleep(0.01)\n"
        "time.sleep(1.0); sys.exit(3)"
    )
    for fork in (True, False):
        run = tmp_path / f"run_{fork}"
        runner = StageRunner(str(run), str(tmp_path), cores=2, fork=fork)
        runner.add("patient", str(tmp_path / "never"), ["-c", patient])
        runner.add("bad", str(tmp_path / "never2"), ["-c", failing])
        with pytest.raises(SystemExit, match="bad.*exit 3"):
            runner.run()
        assert os.path.exists(saved)  # it saved before the runner exited
        os.remove(saved)
        os.remove(ready)
        with open(run / "cpu_seconds.json") as f:
            assert json.load(f)["patient"] > 0.45
        with open(run / "timings.json") as f:
            assert json.load(f)["patient"] > 1.0
