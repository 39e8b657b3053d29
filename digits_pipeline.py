"""The main job on the embedded digits default, end to end, as the project's own scripts run it:

    teacher (train.py) -> trajectories (train_teacher_traj.py) -> 4-step students, step distillation (N = 0)
    and ARD (N > 0) (train_ard.py) -> samples (sample_ddp.py) -> evaluation against held-out real digits
    with the digits feature network (python -m evaluator --features digits) -> a table in the paper's form.

    python digits_pipeline.py            # the default (about 20 minutes on 2 CPU cores)
    python digits_pipeline.py --quick    # every stage with tiny budgets: an end-to-end smoke test (about 90 s)
    python digits_pipeline.py --full     # 3 seeds, both targets, GAN fine-tuning, 2-5 step students (about 90 min)

Finished stages are reused when the command is run again (each is skipped when its output exists; the
trajectory writer and the sampler resume partial work; an interrupted training stage starts over, --replace). Everything goes to --run-dir: checkpoints, stores,
samples, logs, timings.json, results.md and results.json; --assets-dir receives the figures.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

import cli
from checkpoints import load_model
from cli import check_output_path
from cost import sampling_cost
from fileio import write_json

ROOT = os.path.dirname(os.path.abspath(__file__))

BUDGETS = {
    # teacher steps, trajectories, student steps, samples per model, GAN steps
    "quick": dict(teacher_steps=40, trajectories=128, student_steps=12, samples=100, gan_steps=6, gan_warmup=3,
                  val_count=32, teacher_batch=32, student_batch=16, net_epochs=2, cost_batch=20),
    "default": dict(teacher_steps=2000, trajectories=6000, student_steps=1000, samples=2000, gan_steps=400,
                    gan_warmup=100, val_count=500, teacher_batch=128, student_batch=64, net_epochs=40, cost_batch=500),
}
HISTORY_LAYERS = 3  # of the tiny teacher's 6 blocks
CFG = 1.5


class Pipeline:
    """Runs stages as subprocesses, skipping those whose output exists, and records how long each took."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        os.makedirs(run_dir, exist_ok=True)
        self.timings_path = os.path.join(run_dir, "timings.json")
        self.timings = json.load(open(self.timings_path)) if os.path.isfile(self.timings_path) else {}

    def path(self, *parts):
        return os.path.join(self.run_dir, *parts)

    def stage(self, name, output, args):
        if os.path.exists(output):
            print(f"[{name}] reusing {output}", flush=True)
            return output
        print(f"[{name}] {' '.join(args)}", flush=True)
        start = time.time()
        log_path = self.path("logs", f"{name}.log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "w") as log:
            proc = subprocess.run([sys.executable, *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0 or not os.path.exists(output):
            with open(log_path) as log:
                tail = log.read()[-3000:]
            raise SystemExit(f"[{name}] failed (exit {proc.returncode}); the last lines of {log_path}:\n{tail}")
        self.timings[name] = time.time() - start
        write_json(self.timings_path, self.timings)
        print(f"[{name}] done in {self.timings[name]:.0f} s", flush=True)
        return output


def prepare(p, b):
    """The teacher, the feature network, the reference batches and the trajectories; returns (teacher, ref, net, traj)."""
    teacher = p.stage("teacher", p.path("teacher", "checkpoints", f"{b['teacher_steps']:07d}.pt"), [
        "train.py", "--model", "DiT-T/2", "--data", "digits", "--max-steps", str(b["teacher_steps"]), "--lr", "1e-3",
        "--ema-decay", "0.995", "--global-batch-size", str(b["teacher_batch"]), "--log-every", "250",
        "--run-dir", p.path("teacher"), "--replace"])
    net = p.stage("digits_net", p.path("digits_net.pt"), ["-m", "evaluator.digits_net", "--out", p.path("digits_net.pt"),
                                                           "--epochs", str(b["net_epochs"])])
    ref = p.stage("reference", p.path("ref_test.npz"), ["-m", "evaluator.make_reference", "--data", "digits",
                                                         "--split", "test", "--out", p.path("ref_test.npz")])
    p.stage("real_train", p.path("real_train.npz"), ["-m", "evaluator.make_reference", "--data", "digits",
                                                      "--split", "train", "--out", p.path("real_train.npz")])
    traj = p.path("traj")
    p.stage("trajectories", os.path.join(traj, "shard-%05d" % ((b["trajectories"] - 1) // 1000)), [
        "train_teacher_traj.py", "--ckpt", teacher, "--out", traj, "--num-trajectories", str(b["trajectories"]),
        "--num-sampling-steps", "25", "--cfg-scale", str(CFG)])
    return teacher, ref, net, traj


def distil(p, b, args, teacher, traj):
    """Every student of the mode; returns the rows (label, steps, kind, checkpoint, group) of the table's students."""
    def student(name, history_layers, seed=0, target="state", num_steps=4):
        steps = b["student_steps"]
        return p.stage(f"student_{name}", p.path("students", name, "checkpoints", f"{steps:07d}.pt"), [
            "train_ard.py", "--traj", traj, "--teacher-ckpt", teacher, "--history-layers", str(history_layers),
            "--target", target, "--num-steps", str(num_steps), "--global-batch-size", str(b["student_batch"]),
            "--lr", "3e-4", "--ema-decay", "0.99", "--max-steps", str(steps), "--val-count", str(b["val_count"]),
            "--val-every", str(max(1, steps // 5)), "--log-every", str(max(1, steps // 20)), "--sample-every", "0",
            "--global-seed", str(seed), "--run-dir", p.path("students", name), "--replace"])

    rows = []
    for target in (["state", "x0"] if args.full else ["state"]):
        for seed in ([0, 1, 2] if args.full else [0]):
            for n in (0, HISTORY_LAYERS):
                name = f"k4_n{n}_{target}_s{seed}"
                rows.append((name, 4, "student", student(name, n, seed, target), f"k4_n{n}_{target}"))
    if args.full:
        for k in (2, 3, 5):
            for n in (0, HISTORY_LAYERS):
                name = f"k{k}_n{n}_state_s0"
                rows.append((name, k, "student", student(name, n, 0, "state", k), f"k{k}_n{n}_state"))
        init = p.path("students", f"k4_n{HISTORY_LAYERS}_state_s0", "checkpoints", f"{b['student_steps']:07d}.pt")
        gan = p.stage("student_gan", p.path("students", "gan", "checkpoints", f"{b['gan_steps']:07d}.pt"), [
            "train_ard.py", "--gan", "--init-ckpt", init, "--traj", traj, "--teacher-ckpt", teacher,
            "--history-layers", str(HISTORY_LAYERS), "--global-batch-size", str(b["student_batch"]), "--lr", "1e-4",
            "--ema-decay", "0.99", "--max-steps", str(b["gan_steps"]), "--gan-warmup", str(b["gan_warmup"]),
            "--val-count", str(b["val_count"]), "--val-every", str(b["gan_steps"]), "--log-every", str(max(1, b["gan_steps"] // 20)),
            "--sample-every", "0", "--run-dir", p.path("students", "gan"), "--replace"])
        rows.append(("gan", 4, "student", gan, f"k4_n{HISTORY_LAYERS}_state_gan"))
    return rows


def evaluate(p, b, rows, ref, net):
    """Samples of every row and their figures against the held-out digits; returns {name: figures}."""
    results = {}
    for name, steps, kind, source, group in rows:
        samples = p.path("samples", f"{name}.npz")
        cmd = ["sample_ddp.py", "--ckpt", source, "--out", samples, "--num-samples", str(b["samples"]),
               "--per-proc-batch-size", "500"]
        if kind == "teacher":
            cmd += ["--num-sampling-steps", str(steps), "--cfg-scale", str(CFG)]
        p.stage(f"sample_{name}", samples, cmd)
        metrics = p.stage(f"eval_{name}", p.path("eval", f"{name}.json"), [
            "-m", "evaluator", ref, samples, "--features", "digits", "--digits-net", net, "--json", p.path("eval", f"{name}.json")])
        results[name] = dict(json.load(open(metrics)), steps=steps, kind=kind, source=source, group=group)
    return results


def measure_costs(p, b, rows):
    """FLOPs and CPU time per image of each model type (one process, a batch of cost_batch), kept in costs.json."""
    path = p.path("costs.json")
    if os.path.isfile(path):
        print(f"[costs] reusing {path}", flush=True)
        with open(path) as f:
            return {group: tuple(value) for group, value in json.load(f).items()}
    costs = {}
    for name, steps, kind, source, group in rows:
        if group not in costs:
            model, config = load_model(source)
            costs[group] = sampling_cost(model, config, steps, CFG, b["cost_batch"])
    write_json(path, costs)
    return costs


def main(args):
    check_output_path(args.assets_dir, "--assets-dir", folder=True)
    if args.run_dir:
        check_output_path(args.run_dir, "--run-dir", folder=True)
    mode = "quick" if args.quick else "default"
    b = BUDGETS[mode]
    p = Pipeline(args.run_dir or os.path.join("runs", "digits" if mode == "default" else "digits-quick"))
    start_all = time.time()
    teacher, ref, net, traj = prepare(p, b)
    rows = distil(p, b, args, teacher, traj)
    rows += [(f"teacher_ddim{s}", s, "teacher", teacher, f"teacher_ddim{s}") for s in ([2, 3, 4, 5, 8, 16, 25] if args.full else [4, 25])]
    results = evaluate(p, b, rows, ref, net)
    real = p.stage("eval_real_train", p.path("eval", "real_train.json"), [
        "-m", "evaluator", ref, p.path("real_train.npz"), "--features", "digits", "--digits-net", net,
        "--json", p.path("eval", "real_train.json")])
    costs = measure_costs(p, b, rows)
    table = summarise(results, costs, json.load(open(real)), rows, args, b)
    with open(p.path("results.md"), "w") as f:
        f.write(table["markdown"])
    write_json(p.path("results.json"), table["json"])
    print("\n" + table["markdown"])
    if not args.quick:
        figures(p, rows, results, args)
    print(f"\nTotal wall time of this invocation: {(time.time() - start_all) / 60:.1f} min; stage timings in {p.timings_path}")


def mean_spread(values):
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def row_label(group):
    """'teacher_ddim25' -> 'Teacher DDIM, CFG 1.5'; 'k4_n3_x0' -> 'ARD (N=3), x0 target'; ..."""
    if group.startswith("teacher"):
        return f"Teacher DDIM, CFG {CFG}"
    parts = group.split("_")
    n, target = int(parts[1][1:]), parts[2]
    label = "Step distillation (N=0)" if n == 0 else f"ARD (N={n})"
    if target == "x0":
        label += ", x0 target"
    if group.endswith("_gan"):
        label += " + GAN fine-tuning"
    return label


def summarise(results, costs, real, rows, args, b):
    groups = {}
    for name, steps, kind, source, group in rows:
        groups.setdefault(group, []).append(name)
    fmt = lambda m, s, d: f"{m:.{d}f}" if s == 0 else f"{m:.{d}f} ± {s:.{d}f}"  # noqa: E731
    lines = ["| model | steps | MFLOPs / image | CPU ms / image | FID | precision | recall | class accuracy | seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    out = {"rows": [], "budgets": b, "mode": "full" if args.full else ("quick" if args.quick else "default")}
    def sort_key(group):  # the teacher by steps, then the 4-step students, then the other step counts
        steps = results[groups[group][0]]["steps"]
        return (not group.startswith("teacher"), group.startswith("k") and steps != 4, steps, group)

    order = sorted(groups, key=sort_key)
    for group in order:
        names = groups[group]
        steps = results[names[0]]["steps"]
        label = row_label(group)
        flops, seconds = costs[group]
        stats = {k: mean_spread([results[n][k] for n in names]) for k in ("fid", "precision", "recall", "class_accuracy")}
        lines.append(f"| {label} | {steps} | {flops / 1e6:.1f} | {1000 * seconds:.2f} | {fmt(*stats['fid'], 2)} | "
                     f"{fmt(*stats['precision'], 3)} | {fmt(*stats['recall'], 3)} | {fmt(*stats['class_accuracy'], 3)} | {len(names)} |")
        out["rows"].append(dict(group=group, label=label, steps=steps, flops_per_image=flops, cpu_seconds_per_image=seconds,
                                seeds=len(names), **{k: {"mean": m, "std": s, "values": [results[n][k] for n in names]}
                                                     for k, (m, s) in stats.items()}))
    lines.append(f"| Real digits, training split (reference floor) | - | - | - | {real['fid']:.2f} | {real['precision']:.3f} | "
                 f"{real['recall']:.3f} | {real.get('class_accuracy', float('nan')):.3f} | - |")
    out["real_train"] = real
    teacher_fid = results["teacher_ddim25"]["fid"]
    for target in (["state", "x0"] if args.full else ["state"]):
        sd = [results[n]["fid"] for n in groups[f"k4_n0_{target}"]]
        ard = [results[n]["fid"] for n in groups[f"k4_n{HISTORY_LAYERS}_{target}"]]
        ratios = [(s - teacher_fid) / (a - teacher_fid) for s, a in zip(sd, ard)]
        m, s = mean_spread(ratios)
        lines.append("")
        lines.append(f"FID degradation ratio (FID_N=0 - FID_teacher) / (FID_ARD - FID_teacher), {target} target: "
                     f"{fmt(m, s, 2)} over {len(ratios)} seed(s) (the paper: 5.1)")
        if min(sd + ard) <= teacher_fid:
            lines.append(f"(some {target}-target students reach or beat the 25-step teacher's FID {teacher_fid:.2f}: "
                         f"there is no degradation to compare, and the ratio says nothing)")
        out[f"degradation_ratio_{target}"] = {"mean": m, "std": s, "values": ratios}
    out["teacher_fid"] = teacher_fid
    return {"markdown": "\n".join(lines) + "\n", "json": out}


def figures(p, rows, results, args):
    """The README's figures: a grid of samples (same noise and classes, one row per model), the held-out MSE
    during distillation and, with --full, FID against steps."""
    import matplotlib

    matplotlib.use("Agg")
    os.makedirs(args.assets_dir, exist_ok=True)
    samples_figure(p, os.path.join(args.assets_dir, "digits_samples.png"), args.full)
    val_mse_figure(p, os.path.join(args.assets_dir, "digits_val_mse.png"))
    if args.full:
        fid_steps_figure(rows, results, os.path.join(args.assets_dir, "digits_fid_vs_steps.png"))


def save_figure(fig, path):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def samples_figure(p, path, with_gan):
    import matplotlib.pyplot as plt

    shown = [("teacher_ddim25", "Teacher, DDIM 25 steps"), ("teacher_ddim4", "Teacher, DDIM 4 steps"),
             ("k4_n0_state_s0", "Step distillation, 4 steps"), (f"k4_n{HISTORY_LAYERS}_state_s0", f"ARD (N={HISTORY_LAYERS}), 4 steps")]
    if with_gan:
        shown.append(("gan", "ARD + GAN, 4 steps"))
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
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny budgets: checks that every stage runs and hands on valid files")
    mode.add_argument("--full", action="store_true", help="3 seeds, both targets, GAN, 2-5 step students, FID-vs-steps plot")
    parser.add_argument("--run-dir", default=None, help="default: runs/digits (runs/digits-quick with --quick)")
    parser.add_argument("--assets-dir", default="assets", help="where the figures go")
    return parser.parse_args(argv)


if __name__ == "__main__":
    cli.run(main, parse_args)
