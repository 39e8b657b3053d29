"""The main job on the embedded digits default, end to end, as the project's own scripts run it:

    teacher (train.py) -> trajectories (train_teacher_traj.py) -> 4-step students, step distillation (N = 0)
    and ARD (N > 0) (train_ard.py), each also fine-tuned by the GAN stage (train_ard.py --gan) -> samples
    (sample_ddp.py) -> evaluation against held-out real digits and against the teacher's own samples with the digits
    feature network (python -m evaluator --features digits) -> the history probe -> tables in the paper's form.

    python -m experiments.digits              # the default (about 8 minutes on 2 CPU cores)
    python -m experiments.digits --quick      # every stage with tiny budgets: an end-to-end smoke test (about 35 s)
    python -m experiments.digits --quick --flow   # the same with the flow teacher's stages (one seed; the test suite runs it)
    python -m experiments.digits --headroom   # the default plus N = 0 and ARD after 400 steps, 3 seeds (about 4 min more)
    python -m experiments.digits --flow       # the default plus a flow-matching teacher and its students, 3 seeds (about 15 min more)
    python -m experiments.digits --full       # 3 seeds, both targets, GAN, headroom, 2-5 step students, flow (about 44 min)

Finished stages are reused when the command is run again (each is skipped when its output exists; the trajectory
writer and the sampler resume partial work; an interrupted training stage resumes from its last checkpoint,
--resume auto). On SIGTERM or SIGUSR1 the running stages save their work and the job exits with status 75; the same
command continues it. Everything goes to
--run-dir: checkpoints, stores, samples, logs/ (one per stage), timings.json, results.md and results.json;
--assets-dir receives the figures. Set OMP_NUM_THREADS only to limit the cores: the runner gives the teacher and
the trajectory writer all of them (--full's two teachers, and then their writers, share them), and every other stage
a single thread, as many side by side as there are cores.
"""

import argparse
import json
import os
import statistics
import time

import numpy as np

from ard import cli
from ard.checkpoints import load_model
from ard.cli import check_output_path
from ard.cost import sampling_cost
from ard.fileio import write_json
from diffusion.sampling import model_evaluations
from experiments.stage_runner import StageRunner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: where the stages run

BUDGETS = {
    # teacher steps, trajectories, student steps, samples per model, GAN steps
    "quick": dict(teacher_steps=40, trajectories=128, student_steps=12, samples=100, gan_steps=6, gan_warmup=3, headroom_steps=6,
                  val_count=32, teacher_batch=32, student_batch=16, net_epochs=2, cost_batch=20, bootstrap=10),
    "default": dict(teacher_steps=1400, trajectories=6000, student_steps=800, samples=2000, gan_steps=120,
                    gan_warmup=40, headroom_steps=400, val_count=500, teacher_batch=128, student_batch=64, net_epochs=40, cost_batch=500,
                    bootstrap=100),
}
# The tiny teacher: DiT-T (depth 6, width 128) with 4x4 patches, four tokens per 8x8 digit. It reaches a better FID
# than 2x2 patches (16 tokens) at the same 1,400 steps, and every stage after it runs 2.5-4x faster.
DIGITS_MODEL = "DiT-T/4"
HISTORY_LAYERS = 3  # of the tiny teacher's 6 blocks
STUDENT_LR = 3e-3  # constant: the headroom rows read a student's checkpoint half-way as a shorter run
CFG = 1.5
# The flow-matching teacher (train.py --objective flow) writes its trajectories with Heun over FLOW_STEPS uniform steps
# in t: 2 * FLOW_STEPS - 1 model evaluations, about the 25 of the DDIM teacher.
FLOW_SOLVER, FLOW_STEPS = "heun", 13
FLOW_TEACHER = f"flow_teacher_{FLOW_SOLVER}{FLOW_STEPS}"


# Seconds per stage on the reference machine (2 cores), for the run's time estimate: the runner rescales them by how
# fast this machine turns out to be.
ESTIMATES = {
    "quick": dict(teacher=8, digits_net=6, reference=3, trajectories=7, student=8, gan=8, sample=4, sample_teacher25=6, eval=3,
                  probe=5),
    "default": dict(teacher=130, digits_net=18, reference=5, trajectories=55, student=180, gan=70, sample=6,
                    sample_teacher25=32, eval=8, probe=35),
}


def train_teacher(p, b, est, name="teacher", objective="ddpm"):
    """The tiny teacher (DIGITS_MODEL on the digits): DiT's objective, or flow matching with the same budget."""
    return p.add(name, p.path(name, "checkpoints", f"{b['teacher_steps']:07d}.pt"), [
        "train.py", "--model", DIGITS_MODEL, "--data", "digits", "--objective", objective, "--max-steps", str(b["teacher_steps"]),
        "--lr", "2e-3", "--ema-decay", "0.99", "--global-batch-size", str(b["teacher_batch"]), "--log-every", "250",
        "--ckpt-every", str(max(1, b["teacher_steps"] // 4)),
        "--run-dir", p.path(name), "--resume", "auto"], heavy=True, estimate=est["teacher"])


def prepare(p, b, est):
    """The teacher, the feature network, the reference batches and the trajectories; returns (teacher, ref, net, traj)."""
    teacher = train_teacher(p, b, est)
    net = p.add("digits_net", p.path("digits_net.pt"), ["-m", "evaluator.train_digits_net", "--out", p.path("digits_net.pt"),
                                                         "--epochs", str(b["net_epochs"])], estimate=est["digits_net"])
    ref = p.add("reference", p.path("ref_test.npz"), ["-m", "evaluator.make_reference", "--data", "digits",
                                                       "--split", "test", "--out", p.path("ref_test.npz")], estimate=est["reference"])
    p.add("real_train", p.path("real_train.npz"), ["-m", "evaluator.make_reference", "--data", "digits",
                                                    "--split", "train", "--out", p.path("real_train.npz")], estimate=est["reference"])
    traj = p.path("traj")
    p.add("trajectories", os.path.join(traj, "shard-%05d" % ((b["trajectories"] - 1) // 1000)), [
        "train_teacher_traj.py", "--ckpt", teacher, "--out", traj, "--num-trajectories", str(b["trajectories"]),
        "--num-sampling-steps", "25", "--cfg-scale", str(CFG)], after=["teacher"], heavy=True, estimate=est["trajectories"])
    return teacher, ref, net, traj


def flow_rows(p, b, est, seeds):
    """The flow-matching teacher, its trajectories (Heun), its 4-step students N = 0 and ARD over the seeds, and its
    own samples at a few step counts (only the trajectories' solver for a single seed: --quick); returns the rows."""
    teacher = train_teacher(p, b, est, "flow_teacher", "flow")
    traj = p.path("traj_flow")
    p.add("flow_trajectories", os.path.join(traj, "shard-%05d" % ((b["trajectories"] - 1) // 1000)), [
        "train_teacher_traj.py", "--ckpt", teacher, "--out", traj, "--num-trajectories", str(b["trajectories"]),
        "--solver", FLOW_SOLVER, "--num-sampling-steps", str(FLOW_STEPS), "--cfg-scale", str(CFG)],
        after=["flow_teacher"], heavy=True, estimate=est["trajectories"])
    samplers = [(FLOW_SOLVER, FLOW_STEPS)] if len(seeds) == 1 else [("heun", 2), ("heun", 4), (FLOW_SOLVER, FLOW_STEPS), ("euler", 25)]
    rows = [(f"flow_teacher_{sampler}{s}", s, "teacher", teacher, f"flow_teacher_{sampler}{s}") for sampler, s in samplers]
    rows.append((f"{FLOW_TEACHER}_s1", FLOW_STEPS, "teacher", teacher, f"{FLOW_TEACHER}_s1"))
    for seed in seeds:
        for n in (0, HISTORY_LAYERS):
            name = f"flow_k4_n{n}_state_s{seed}"
            rows.append((name, 4, "student", student_stage(p, b, est, name, traj, teacher, n, seed, after="flow_trajectories"),
                         f"flow_k4_n{n}_state"))
    return rows


def student_stage(p, b, est, name, traj, teacher, history_layers, seed=0, target="state", num_steps=4, steps=None, after="trajectories"):
    """A student distilled from a store by train_ard.py; returns its last checkpoint."""
    steps = steps or b["student_steps"]
    return p.add(f"student_{name}", p.path("students", name, "checkpoints", f"{steps:07d}.pt"), [
        "train_ard.py", "--traj", traj, "--teacher-ckpt", teacher, "--history-layers", str(history_layers),
        "--target", target, "--num-steps", str(num_steps), "--global-batch-size", str(b["student_batch"]),
        "--lr", str(STUDENT_LR), "--ema-decay", "0.99", "--max-steps", str(steps), "--val-count", str(b["val_count"]),
        "--val-every", str(max(1, steps // 4)), "--log-every", str(max(1, steps // 20)), "--sample-every", "0",
        "--ckpt-every", str(max(1, steps // 4)),  # the default's students keep their headroom_steps checkpoint
        "--global-seed", str(seed), "--run-dir", p.path("students", name), "--resume", "auto"],
        after=[after], estimate=est["student"] * num_steps / 4 * steps / b["student_steps"])


def distil(p, b, args, teacher, traj, est):
    """Every student of the mode; returns the rows (label, steps, kind, checkpoint, group) of the table's students."""
    def student(name, history_layers, seed=0, target="state", num_steps=4, steps=None):
        return student_stage(p, b, est, name, traj, teacher, history_layers, seed, target, num_steps, steps)

    def gan(name, history_layers, seed):
        init = p.path("students", name, "checkpoints", f"{b['student_steps']:07d}.pt")
        steps = b["gan_steps"]
        return p.add(f"student_gan_{name}", p.path("students", f"gan_{name}", "checkpoints", f"{steps:07d}.pt"), [
            "train_ard.py", "--gan", "--init-ckpt", init, "--traj", traj, "--teacher-ckpt", teacher,
            "--history-layers", str(history_layers), "--global-batch-size", str(b["student_batch"]), "--lr", "1e-4",
            "--ema-decay", "0.99", "--max-steps", str(steps), "--gan-warmup", str(b["gan_warmup"]), "--global-seed", str(seed),
            "--val-count", str(b["val_count"]), "--val-every", str(steps), "--log-every", str(max(1, steps // 20)),
            "--sample-every", str(steps), "--run-dir", p.path("students", f"gan_{name}"), "--resume", "auto"],
            after=[f"student_{name}"], estimate=est["gan"])

    rows = []
    seeds = [0, 1, 2] if args.full else [0]
    for target in (["state", "x0"] if args.full else ["state"]):
        for seed in seeds:
            for n in (0, HISTORY_LAYERS):
                name = f"k4_n{n}_{target}_s{seed}"
                rows.append((name, 4, "student", student(name, n, seed, target), f"k4_n{n}_{target}"))
    if args.full or args.headroom:
        # The setting with headroom: the same students after headroom_steps of their steps, where step distillation
        # still falls short of its teacher. A constant learning rate makes that checkpoint the same as a run of
        # headroom_steps; --headroom trains seeds 1 and 2 only that far.
        for seed in (0, 1, 2):
            for n in (0, HISTORY_LAYERS):
                name = f"k4_n{n}_state_s{seed}"
                if seed not in seeds:
                    student(name, n, seed, steps=b["headroom_steps"])
                source = p.path("students", name, "checkpoints", f"{b['headroom_steps']:07d}.pt")
                rows.append((f"short_{name}", 4, "student", source, f"k4_n{n}_short"))
    for seed in seeds:  # the GAN stage, from step distillation and from ARD (state target)
        for n in (0, HISTORY_LAYERS):
            name = f"k4_n{n}_state_s{seed}"
            rows.append((f"gan_{name}", 4, "student", gan(name, n, seed), f"k4_n{n}_state_gan"))
    if args.full:
        for k in (2, 3, 5):
            for n in (0, HISTORY_LAYERS):
                name = f"k{k}_n{n}_state_s0"
                rows.append((name, k, "student", student(name, n, 0, "state", k), f"k{k}_n{n}_state"))
    return rows


def teacher_sampler(name):
    """The sampler a teacher row's name says: 'teacher_ddim25', 'flow_teacher_heun13', 'flow_teacher_euler25_s1'."""
    return next(s for s in ("heun", "euler", "ddim") if f"_{s}" in name)


def evaluate(p, b, rows, ref, net, est):
    """Samples of every row and their figures against the held-out digits and against the samples of the row's own
    teacher (the DDIM teacher's 25 steps, or the flow teacher's FLOW_TEACHER); returns {name: path of its figures}."""
    figures = {}
    for name, steps, kind, source, group in rows:
        samples = p.path("samples", f"{name}.npz")
        cmd = ["sample_ddp.py", "--ckpt", source, "--out", samples, "--num-samples", str(b["samples"]),
               "--per-proc-batch-size", "500"]
        if kind == "teacher":
            cmd += ["--sampler", teacher_sampler(name), "--num-sampling-steps", str(steps), "--cfg-scale", str(CFG),
                    "--global-seed", "1" if name.endswith("_s1") else "0", "--label-seed", "0"]
        flow = name.startswith("flow_")
        source_stage = (("flow_teacher" if flow else "teacher") if kind == "teacher" else f"student_gan_{name[4:]}" if name.startswith("gan_")
                        else f"student_{name[6:]}" if name.startswith("short_") else f"student_{name}")
        evaluations = model_evaluations(teacher_sampler(name), steps) if kind == "teacher" else steps
        long = kind == "teacher" and evaluations > 8
        p.add(f"sample_{name}", samples, cmd, after=[source_stage],
              estimate=est["sample_teacher25"] * evaluations / 25 if long else est["sample"])
        own = FLOW_TEACHER if flow else "teacher_ddim25"
        figures[name] = p.add(f"eval_{name}", p.path("eval", f"{name}.json"), [
            "-m", "evaluator", ref, samples, "--features", "digits", "--digits-net", net, "--json", p.path("eval", f"{name}.json"),
            "--teacher-ref", p.path("samples", f"{own}.npz"), "--bootstrap", str(b["bootstrap"])],
            after=[f"sample_{name}", f"sample_{own}", "digits_net", "reference"], estimate=est["eval"])
    return figures


def measure_costs(p, b, rows):
    """FLOPs and CPU time per image of each model type (one process, a batch of cost_batch), kept in costs.json; a
    later run with more rows measures only the groups that are new."""
    path = p.path("costs.json")
    costs = {}
    if os.path.isfile(path):
        with open(path) as f:
            costs = {group: tuple(value) for group, value in json.load(f).items()}
        print(f"[costs] reusing {path}", flush=True)
    measured = {}
    for name, steps, kind, source, group in rows:
        if group in costs:
            continue
        # The GAN stage, the target and the seed change no cost; a teacher's is that of its sampler and steps.
        sampler = teacher_sampler(name) if kind == "teacher" else None
        flow = "flow_" if name.startswith("flow_") else ""
        same = (f"{flow}teacher_{sampler}{steps}" if kind == "teacher"
                else "_".join(part for part in group.split("_") if part not in ("state", "x0", "short", "gan")))
        if same not in measured:
            model, config = load_model(source)
            measured[same] = sampling_cost(model, config, steps, CFG, b["cost_batch"], sampler or "ddim")
        costs[group] = measured[same]
    if measured:
        write_json(path, costs)
    return costs


def main(args):
    check_output_path(args.assets_dir, "--assets-dir", folder=True)
    if args.run_dir:
        check_output_path(args.run_dir, "--run-dir", folder=True)
    mode = "quick" if args.quick else "default"
    b, est = BUDGETS[mode], ESTIMATES[mode]
    run_dir = args.run_dir or os.path.join("runs", "digits-quick" if args.quick else "digits")
    p = StageRunner(run_dir, ROOT, heavy_alone=not args.quick, fork=not args.no_fork)
    start_all = time.time()

    # Declare every stage, then run them (in dependency order, light ones side by side):
    rows, figures_of, real = declare(p, b, est, args)
    p.run()

    # The table, the figures and the costs:
    results = {name: dict(json.load(open(figures_of[name])), steps=steps, kind=kind, source=source, group=group)
               for name, steps, kind, source, group in rows}
    costs = measure_costs(p, b, rows)
    table = summarise(results, costs, json.load(open(real)), rows, args, b, step_mse(rows))
    with open(p.path("results.md"), "w") as f:
        f.write(table["markdown"])
    write_json(p.path("results.json"), table["json"])
    print("\n" + table["markdown"])
    if not args.quick:
        figures(p, rows, results, args)
    print(f"\nTotal wall time of this invocation: {(time.time() - start_all) / 60:.1f} min; stage timings in {p.timings_path}")


def declare(p, b, est, args):
    """Every stage of the mode, declared on the runner p; returns (the table's rows, {row: its figures' path}, the
    real training digits' figures' path)."""
    teacher, ref, net, traj = prepare(p, b, est)
    rows = distil(p, b, args, teacher, traj, est)
    ddim_steps = [2, 3, 4, 5, 8, 16, 25] if args.full else [2, 3, 4, 25] if args.flow else [4, 25]  # --flow: the steps each teacher needs
    rows += [(f"teacher_ddim{s}", s, "teacher", teacher, f"teacher_ddim{s}") for s in ddim_steps]
    rows.append(("teacher_ddim25_s1", 25, "teacher", teacher, "teacher_ddim25_s1"))  # other noises: the teacher-fidelity floor
    if args.full or args.flow:
        rows += flow_rows(p, b, est, seeds=(0,) if args.quick else (0, 1, 2))
    figures_of = evaluate(p, b, rows, ref, net, est)
    real = p.add("eval_real_train", p.path("eval", "real_train.json"), [
        "-m", "evaluator", ref, p.path("real_train.npz"), "--features", "digits", "--digits-net", net,
        "--json", p.path("eval", "real_train.json")], after=["real_train", "digits_net", "reference"], estimate=est["eval"])
    for prefix, suffix in [("", "")] + ([("short_", "_short")] if args.full or args.headroom else []):
        p.add(f"history_probe{suffix}", p.path(f"history_probe{suffix}.json"), [
            "-m", "experiments.history_probe", "--traj", traj, "--val-count", str(b["val_count"]),
            "--json", p.path(f"history_probe{suffix}.json"), "--figure", os.path.join(args.assets_dir, f"digits_history_probe{suffix}.png"),
            "--students", *[source for name, _, _, source, _ in rows if name in (f"{prefix}k4_n0_state_s0", f"{prefix}k4_n{HISTORY_LAYERS}_state_s0")]],
            after=["student_k4_n0_state_s0", f"student_k4_n{HISTORY_LAYERS}_state_s0"], estimate=est["probe"])
    return rows, figures_of, real


def mean_spread(values):
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def cell(results, names, key, digits):
    """One figure of a table: over several seeds their mean ± standard deviation; for one, the value and its 95%
    bootstrap interval over samples."""
    values = [results[n][key] for n in names if key in results[n]]
    if not values:
        return "-"
    if len(values) > 1:
        m, s = mean_spread(values)
        return f"{m:.{digits}f} ± {s:.{digits}f}"
    ci = results[names[0]].get(f"{key}_ci")
    return f"{values[0]:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def row_label(group, b):
    """'teacher_ddim25' -> 'Teacher DDIM, CFG 1.5'; 'k4_n3_x0' -> 'ARD (N=3), x0 target'; 'flow_teacher_heun13' ->
    'Flow teacher Heun, CFG 1.5'; 'flow_k4_n0_state' -> 'Flow teacher's step distillation (N=0)'; ..."""
    if group.startswith("flow_"):
        label = row_label(group[len("flow_"):], b)
        if label.startswith("Teacher"):
            return "Flow t" + label[1:]
        return "Flow teacher's " + (label if label.startswith("ARD") else label[0].lower() + label[1:])
    if group.startswith("teacher"):
        sampler = {"ddim": "DDIM", "heun": "Heun", "euler": "Euler"}[teacher_sampler(group)]
        return f"Teacher {sampler}, CFG {CFG}" + (", other noises (the floor)" if group.endswith("_s1") else "")
    parts = group.split("_")
    n, target = int(parts[1][1:]), parts[2]
    label = "Step distillation (N=0)" if n == 0 else f"ARD (N={n})"
    if target == "x0":
        label += ", x0 target"
    if target == "short":
        label += f", after {b['headroom_steps']} steps (headroom)"
    if group.endswith("_gan"):
        label += " + GAN fine-tuning"
    return label


def degradation(results, groups, teacher, key, setting, prefix=""):
    """(FID_N=0 - FID_teacher) / (FID_ARD - FID_teacher) per seed, the teacher's figure being `teacher`; and whether
    some student is not clearly worse than the teacher: its figure, or the lower end of its interval, at or below the
    teacher's (then there is no degradation to compare, and the ratio means nothing). prefix 'flow_': the flow
    teacher's students."""
    names = {n: groups.get(f"{prefix}k4_n{n}_{setting}", []) for n in (0, HISTORY_LAYERS)}
    sd, ard = ([results[name][key] for name in names[n]] for n in (0, HISTORY_LAYERS))
    lows = [results[name].get(f"{key}_ci", [results[name][key]])[0] for n in names for name in names[n]]
    return [(s - teacher) / (a - teacher) for s, a in zip(sd, ard)], min(sd + ard + lows, default=float("inf")) <= teacher


def interval(values):
    """'mean ± std, 95% t-interval [lo, hi]' over seeds (the interval with 2 or more values)."""
    from scipy.stats import t

    m, s = mean_spread(values)
    text = f"{m:.2f} ± {s:.2f}"
    if len(values) > 1:
        half = t.ppf(0.975, len(values) - 1) * s / len(values) ** 0.5
        text += f", 95% t-interval [{m - half:.2f}, {m + half:.2f}]"
    return text


def step_mse(rows):
    """Each student group's held-out per-step MSE against the teacher's states, sampled (AR) and teacher-forced (TF),
    at the step of its checkpoint, from its run's metrics: {group: (AR per step, TF per step, seeds)}."""
    out = {}
    for name, steps, kind, source, group in rows:
        if kind != "student":
            continue
        run = os.path.dirname(os.path.dirname(source))
        at = int(os.path.basename(source).split(".")[0])
        path = os.path.join(run, "metrics.jsonl")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            record = next((r for r in map(json.loads, f) if r.get("step") == at and "val_ar_step_mse" in r), None)
        if record is not None:
            out.setdefault(group, []).append((record["val_ar_step_mse"], record["val_tf_step_mse"]))
    return {group: ([statistics.mean(v) for v in zip(*[r[0] for r in recs])],
                    [statistics.mean(v) for v in zip(*[r[1] for r in recs])], len(recs)) for group, recs in out.items()}


def summarise(results, costs, real, rows, args, b, mse):
    groups = {}
    for name, steps, kind, source, group in rows:
        groups.setdefault(group, []).append(name)

    def sort_key(group):  # the teacher by steps, then the 4-step students, then the other step counts; the flow teacher's last
        steps = results[groups[group][0]]["steps"]
        plain = group[len("flow_"):] if group.startswith("flow_") else group
        return (group.startswith("flow_"), not plain.startswith("teacher"), plain.startswith("k") and steps != 4, steps, group)

    lines = ["Against the 360 held-out real digits (digits features; one seed: 95% bootstrap interval over samples; "
             "several: mean ± std over seeds):", "",
             "| model | steps | MFLOPs / image | CPU ms / image | FID | precision | recall | class accuracy | seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    fidelity = ["", "Against the 25-step teacher's own samples of the same noises and labels (teacher fidelity):", "",
                "| model | steps | FID vs teacher | precision vs teacher | recall vs teacher | seeds |", "|---|---|---|---|---|---|"]
    out = {"rows": [], "budgets": b, "quick": args.quick,
           "mode": next(m for m in ("full", "headroom", "flow", "default") if m == "default" or getattr(args, m))}
    for group in sorted(groups, key=sort_key):
        names, label = groups[group], row_label(group, b)
        steps = results[names[0]]["steps"]
        flops, seconds = costs[group]
        lines.append(f"| {label} | {steps} | {flops / 1e6:.1f} | {1000 * seconds:.2f} | {cell(results, names, 'fid', 2)} | "
                     f"{cell(results, names, 'precision', 3)} | {cell(results, names, 'recall', 3)} | "
                     f"{cell(results, names, 'class_accuracy', 3)} | {len(names)} |")
        if "teacher_fid" in results[names[0]]:
            fidelity.append(f"| {label} | {steps} | {cell(results, names, 'teacher_fid', 2)} | {cell(results, names, 'teacher_precision', 3)} | "
                            f"{cell(results, names, 'teacher_recall', 3)} | {len(names)} |")
        keys = [k for k, v in results[names[0]].items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "steps"]
        out["rows"].append(dict(group=group, label=label, steps=steps, flops_per_image=flops, cpu_seconds_per_image=seconds, seeds=len(names),
                                **{k: {"mean": mean_spread([results[n][k] for n in names])[0], "std": mean_spread([results[n][k] for n in names])[1],
                                       "values": [results[n][k] for n in names], "ci": [results[n].get(f"{k}_ci") for n in names]} for k in keys}))
    lines.append(f"| Real digits, training split (reference floor) | - | - | - | {real['fid']:.2f} | {real['precision']:.3f} | "
                 f"{real['recall']:.3f} | {real.get('class_accuracy', float('nan')):.3f} | - |")
    lines += fidelity
    out["real_train"] = real
    out["teacher_fid"] = results["teacher_ddim25"]["fid"]
    settings = [("", "teacher_ddim25", "state", "state target"), ("", "teacher_ddim25", "x0", "x0 target"),
                ("", "teacher_ddim25", "short", f"after {b['headroom_steps']} steps (headroom)"),
                ("flow_", FLOW_TEACHER, "state", f"flow teacher ({FLOW_SOLVER} {FLOW_STEPS}), state target")]
    for prefix, own, setting, text in settings:
        if own not in results:
            continue
        floor = results.get(f"{own}_s1", {}).get("teacher_fid")
        for key, teacher, what in (("fid", results[own]["fid"], "FID against real digits"),
                                   ("teacher_fid", floor, "FID against the teacher (its floor as the teacher's figure)")):
            if teacher is None:
                continue
            ratios, no_gap = degradation(results, groups, teacher, key, setting, prefix)
            if not ratios:
                continue
            m, s = mean_spread(ratios)
            lines += ["", f"Degradation ratio (N=0 - teacher) / (ARD - teacher), {what}, {text}: {interval(ratios)} over "
                          f"{len(ratios)} seed(s), values {[round(r, 2) for r in ratios]} (the paper: 5.1)"]
            if no_gap:
                lines.append(f"(some students reach the teacher's {teacher:.2f}, or their interval does: there is no clear "
                             f"degradation to compare, and the ratio says nothing)")
            out[f"degradation_{key}_{prefix}{setting}"] = {"mean": m, "std": s, "values": ratios}
    if FLOW_TEACHER in results:
        teacher_fid = results[FLOW_TEACHER]["fid"]
        for n in (0, HISTORY_LAYERS):
            fids = [results[name]["fid"] for name in groups.get(f"flow_k4_n{n}_state", [])]
            if fids:
                ratio = [f / teacher_fid for f in fids]
                lines += ["", f"Flow teacher's 4-step {'step distillation' if n == 0 else f'ARD (N={n})'}: FID / the teacher's "
                              f"({FLOW_SOLVER} {FLOW_STEPS}) {interval(ratio)} over {len(ratio)} seed(s)"]
                out[f"flow_fid_ratio_n{n}"] = {"mean": mean_spread(ratio)[0], "std": mean_spread(ratio)[1], "values": ratio}
    if mse:
        lines += ["", "Held-out per-step MSE against the teacher's states (mean over seeds), sampled (the student's own inputs) "
                      "/ teacher-forced:", "", "| model | " + " | ".join(f"step {k + 1}" for k in range(4)) + " | seeds |",
                  "|---|" + "---|" * 5]
        for group in sorted(mse, key=sort_key):
            ar, tf, seeds = mse[group]
            if len(ar) == 4:
                lines.append(f"| {row_label(group, b)} | " + " | ".join(f"{a:.5f} / {t:.5f}" for a, t in zip(ar, tf)) + f" | {seeds} |")
        out["step_mse"] = {group: {"sampled": ar, "teacher_forced": tf, "seeds": seeds} for group, (ar, tf, seeds) in mse.items()}
    return {"markdown": "\n".join(lines) + "\n", "json": out}


def figures(p, rows, results, args):
    """The README's figures: a grid of samples (same noise and classes, one row per model), the held-out MSE
    during distillation and, with --full, FID against steps."""
    import matplotlib

    matplotlib.use("Agg")
    os.makedirs(args.assets_dir, exist_ok=True)
    shown = [("teacher_ddim25", "Teacher, DDIM 25 steps"), ("teacher_ddim4", "Teacher, DDIM 4 steps"),
             ("k4_n0_state_s0", "Step distillation, 4 steps"), (f"k4_n{HISTORY_LAYERS}_state_s0", f"ARD (N={HISTORY_LAYERS}), 4 steps"),
             (f"gan_k4_n{HISTORY_LAYERS}_state_s0", f"ARD (N={HISTORY_LAYERS}) + GAN, 4 steps")]
    samples_figure(p, os.path.join(args.assets_dir, "digits_samples.png"), shown)
    if any(name.startswith("flow_") for name, *_ in rows):
        samples_figure(p, os.path.join(args.assets_dir, "digits_flow_samples.png"), [
            (FLOW_TEACHER, f"Flow teacher, Heun {FLOW_STEPS} steps ({2 * FLOW_STEPS - 1} evaluations)"),
            ("flow_teacher_heun2", "Flow teacher, Heun 2 steps (3 evaluations)"),
            ("flow_k4_n0_state_s0", "Its step distillation, 4 steps"),
            (f"flow_k4_n{HISTORY_LAYERS}_state_s0", f"Its ARD (N={HISTORY_LAYERS}), 4 steps")])
    val_mse_figure(p, os.path.join(args.assets_dir, "digits_val_mse.png"))
    gan_figure(p, os.path.join(args.assets_dir, "digits_gan.png"))
    if args.full:
        fid_steps_figure(rows, results, os.path.join(args.assets_dir, "digits_fid_vs_steps.png"))


def save_figure(fig, path):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def samples_figure(p, path, shown):
    """One row per (samples name, title): the first sample of each class, the same noise in every row."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(shown), 1, figsize=(8, 1.1 * len(shown)))
    for ax, (name, title) in zip(axes, shown):
        with np.load(p.path("samples", f"{name}.npz"), allow_pickle=False) as data:
            images, labels = data["arr_0"], data["arr_1"]
        picks = [int(np.flatnonzero(labels == c)[0]) for c in range(10)]  # the first sample of each class: same noise across models
        ax.imshow(np.concatenate([np.pad(images[i, :, :, 0], 1, constant_values=255) for i in picks], axis=1), cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=8, loc="left")
        ax.axis("off")
    save_figure(fig, path)


def val_mse_figure(p, path):
    """Held-out final-step MSE against the teacher's samples during distillation, N = 0 against ARD."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, colour, label in (("k4_n0_state_s0", "b", "step distillation (N=0)"),
                                (f"k4_n{HISTORY_LAYERS}_state_s0", "r", f"ARD (N={HISTORY_LAYERS})")):
        with open(p.path("students", name, "metrics.jsonl")) as f:
            records = [r for r in map(json.loads, f) if "val_ar_final_mse" in r]
        steps = [r["step"] for r in records]
        ax.plot(steps, [r["val_ar_final_mse"] for r in records], f"{colour}-o", label=f"{label}, sampled (AR)")
        ax.plot(steps, [r["val_tf_final_mse"] for r in records], f"{colour}--", label=f"{label}, teacher-forced")
    ax.set_yscale("log")
    ax.set_xlabel("distillation step")
    ax.set_ylabel("final-step MSE vs teacher (held out)")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def gan_figure(p, path):
    """The GAN stage's logged figures over its steps, for both seed-0 GAN runs: lambda, the two gradient norms on the
    last head, mean D(real) and D(fake), and the range of the fakes."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    for n, colour in ((0, "b"), (HISTORY_LAYERS, "r")):
        with open(p.path("students", f"gan_k4_n{n}_state_s0", "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        steps, label = [r["step"] for r in records], "step distillation" if n == 0 else f"ARD (N={n})"
        axes[0].plot(steps, [r["gan_weight"] for r in records], f"{colour}-", label=label)
        axes[1].plot(steps, [r["grad_reg"] for r in records], f"{colour}-", label=f"{label}: |grad L_reg|")
        axes[1].plot(steps, [r["grad_gan"] for r in records], f"{colour}--", label=f"{label}: |grad L_GAN|")
        axes[2].plot(steps, [r["d_real"] for r in records], f"{colour}-", label=f"{label}: D(real)")
        axes[2].plot(steps, [r["d_fake"] for r in records], f"{colour}--", label=f"{label}: D(fake)")
        axes[3].plot(steps, [r["fake_min"] for r in records], f"{colour}-", label=f"{label}: min")
        axes[3].plot(steps, [r["fake_max"] for r in records], f"{colour}--", label=f"{label}: max")
    for ax, title in zip(axes, ("lambda", "gradient norms on the last head", "mean discriminator logits", "range of the fakes")):
        ax.set(xlabel="GAN step", title=title)
        ax.legend(fontsize=6)
    axes[1].set_yscale("log")
    save_figure(fig, path)


def fid_steps_figure(rows, results, path):
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(5, 3.5))
    teacher = sorted((r[1], results[r[0]]["fid"]) for r in rows if r[2] == "teacher")
    ax.plot(*zip(*teacher), "k-o", label="teacher DDIM (CFG 1.5)")
    for n, style, label in ((0, "b-s", "step distillation (N=0)"), (HISTORY_LAYERS, "r-^", f"ARD (N={HISTORY_LAYERS})")):
        points = sorted((r[1], results[r[0]]["fid"]) for r in rows if r[4] == f"k{r[1]}_n{n}_state" and r[0].endswith("_s0"))
        ax.plot(*zip(*points), style, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([2, 3, 4, 5, 8, 16, 25])
    ax.set_xticklabels(["2", "3", "4", "5", "8", "16", "25"])
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("FID (digits features)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny budgets (with any of the modes below): checks that every stage runs and hands on valid files")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--headroom", action="store_true",
                      help="the default rows plus the headroom setting: N = 0 and ARD after headroom_steps steps, 3 seeds")
    mode.add_argument("--full", action="store_true",
                      help="3 seeds, both targets, GAN, the headroom setting, 2-5 step students, the flow teacher, FID-vs-steps plot")
    mode.add_argument("--flow", action="store_true",
                      help="the default rows plus a flow-matching teacher (train.py --objective flow) and its N = 0 and ARD students, 3 seeds")
    parser.add_argument("--run-dir", default=None, help="default: runs/digits (runs/digits-quick with --quick)")
    parser.add_argument("--assets-dir", default="assets", help="where the figures go")
    parser.add_argument("--no-fork", action="store_true",
                        help="start every stage as a fresh Python process (by default one-thread stages are forks of a "
                             "process that imported torch once; the figures are the same either way)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    cli.run(main, parse_args)
