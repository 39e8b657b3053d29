"""The stages every embedded experiment declares (experiments/digits.py, experiments/fashion.py), as the project's
own scripts run them: the teacher (train.py), its feature network and reference batches (evaluator), trajectories
(train_teacher_traj.py), students (train_ard.py, and its GAN stage), samples (sample_ddp.py), their figures against
the real test images and against the teacher's own samples (python -m evaluator), the history probe, the costs; and
the end of a run: the tables of experiments/report.py and the figures.

A Setting says what differs between the experiments: the dataset, the model, N, the learning rates. A row of a
table is (name, steps, kind, checkpoint, group): its samples are samples/NAME.npz, its figures eval/NAME.json, and
the rows of one group (the seeds of one model) are one line of the table.
"""

import json
import os
import time
from dataclasses import dataclass

from ard.checkpoints import load_model
from ard.cli import check_output_path
from ard.cost import sampling_cost
from ard.fileio import write_json
from diffusion.sampling import model_evaluations
from experiments import report
from experiments.report import FLOW_TEACHER, teacher_sampler
from experiments.stage_runner import StageRunner

ROOT = os.path.dirname(
    os.path.dirname(os.path.abspath(__file__))
)  # the repository: where the stages run


@dataclass(frozen=True)
class Setting:
    data: str  # an embedded dataset (ard.data.EMBEDDED)
    model: str  # the teacher's DiT_models key
    history_layers: int  # ARD's N
    teacher_lr: float
    teacher_ema: float
    student_lr: (
        float  # constant: a headroom row reads a student's checkpoint half-way as a shorter run
    )
    real: str  # what the table calls the real test images, e.g. "the 360 held-out real digits"
    real_train: (
        str  # and the real training images, e.g. "Real digits, training split (reference floor)"
    )
    cfg: float = 1.5
    net: str = "net"  # the stage (and file) name of the feature network


def train_teacher(p, s, b, est, name="teacher", objective="ddpm"):
    """The teacher on the setting's data: DiT's objective, or flow matching with the same budget."""
    return p.add(
        name,
        p.path(name, "checkpoints", f"{b['teacher_steps']:07d}.pt"),
        [
            "train.py",
            "--model",
            s.model,
            "--data",
            s.data,
            "--objective",
            objective,
            "--max-steps",
            str(b["teacher_steps"]),
            "--lr",
            str(s.teacher_lr),
            "--ema-decay",
            str(s.teacher_ema),
            "--global-batch-size",
            str(b["teacher_batch"]),
            "--log-every",
            "250",
            "--ckpt-every",
            str(max(1, b["teacher_steps"] // 4)),
            "--run-dir",
            p.path(name),
            "--resume",
            "auto",
        ],
        heavy=True,
        estimate=est["teacher"],
    )


def prepare(p, s, b, est):
    """The teacher, the feature network, the reference batches and the trajectories; returns (teacher, ref, net, traj)."""
    teacher = train_teacher(p, s, b, est)
    net = p.add(
        s.net,
        p.path(f"{s.net}.pt"),
        [
            "-m",
            "evaluator.train_feature_net",
            "--data",
            s.data,
            "--out",
            p.path(f"{s.net}.pt"),
            "--epochs",
            str(b["net_epochs"]),
        ],
        estimate=est["net"],
    )
    ref = p.add(
        "reference",
        p.path("ref_test.npz"),
        [
            "-m",
            "evaluator.make_reference",
            "--data",
            s.data,
            "--split",
            "test",
            "--out",
            p.path("ref_test.npz"),
        ],
        estimate=est["reference"],
    )
    p.add(
        "real_train",
        p.path("real_train.npz"),
        [
            "-m",
            "evaluator.make_reference",
            "--data",
            s.data,
            "--split",
            "train",
            *(["--num", str(b["real_train"])] if b.get("real_train") else []),
            "--out",
            p.path("real_train.npz"),
        ],
        estimate=est["reference"],
    )
    traj = p.path("traj")
    p.add(
        "trajectories",
        os.path.join(traj, "shard-%05d" % ((b["trajectories"] - 1) // 1000)),
        [
            "train_teacher_traj.py",
            "--ckpt",
            teacher,
            "--out",
            traj,
            "--num-trajectories",
            str(b["trajectories"]),
            "--num-sampling-steps",
            "25",
            "--cfg-scale",
            str(s.cfg),
        ],
        after=["teacher"],
        heavy=True,
        estimate=est["trajectories"],
    )
    return teacher, ref, net, traj


def student_stage(
    p,
    s,
    b,
    est,
    name,
    traj,
    teacher,
    history_layers,
    seed=0,
    target="state",
    num_steps=4,
    steps=None,
    after="trajectories",
):
    """A student distilled from a store by train_ard.py; returns its last checkpoint."""
    steps = steps or b["student_steps"]
    return p.add(
        f"student_{name}",
        p.path("students", name, "checkpoints", f"{steps:07d}.pt"),
        [
            "train_ard.py",
            "--traj",
            traj,
            "--teacher-ckpt",
            teacher,
            "--history-layers",
            str(history_layers),
            "--target",
            target,
            "--student-steps",
            str(num_steps),
            "--global-batch-size",
            str(b["student_batch"]),
            "--lr",
            str(s.student_lr),
            "--ema-decay",
            "0.99",
            "--max-steps",
            str(steps),
            "--val-count",
            str(b["val_count"]),
            "--val-every",
            str(max(1, steps // 4)),
            "--log-every",
            str(max(1, steps // 20)),
            "--sample-every",
            "0",
            "--ckpt-every",
            str(max(1, steps // 4)),  # the digits' students keep their headroom_steps checkpoint
            "--global-seed",
            str(seed),
            "--run-dir",
            p.path("students", name),
            "--resume",
            "auto",
        ],
        after=[after],
        estimate=est["student"] * num_steps / 4 * steps / b["student_steps"],
    )


def gan_stage(p, s, b, est, name, traj, teacher, history_layers, seed):
    """The GAN stage from the student `name`'s last checkpoint; returns its own last checkpoint."""
    init = p.path("students", name, "checkpoints", f"{b['student_steps']:07d}.pt")
    steps = b["gan_steps"]
    return p.add(
        f"student_gan_{name}",
        p.path("students", f"gan_{name}", "checkpoints", f"{steps:07d}.pt"),
        [
            "train_ard.py",
            "--gan",
            "--init-ckpt",
            init,
            "--traj",
            traj,
            "--teacher-ckpt",
            teacher,
            "--data",
            s.data,
            "--history-layers",
            str(history_layers),
            "--global-batch-size",
            str(b["student_batch"]),
            "--lr",
            "1e-4",
            "--ema-decay",
            "0.99",
            "--max-steps",
            str(steps),
            "--gan-warmup",
            str(b["gan_warmup"]),
            "--global-seed",
            str(seed),
            "--val-count",
            str(b["val_count"]),
            "--val-every",
            str(steps),
            "--log-every",
            str(max(1, steps // 20)),
            "--sample-every",
            str(steps),
            "--run-dir",
            p.path("students", f"gan_{name}"),
            "--resume",
            "auto",
        ],
        after=[f"student_{name}"],
        estimate=est["gan"],
    )


def evaluate(p, s, b, rows, ref, net, est):
    """Samples of every row and their figures against the real test images and against the samples of the row's
    own teacher (the DDIM teacher's 25 steps, or the flow teacher's FLOW_TEACHER); returns {name: its figures' path}."""
    figures = {}
    for name, steps, kind, source, group in rows:
        samples = p.path("samples", f"{name}.npz")
        cmd = [
            "sample_ddp.py",
            "--ckpt",
            source,
            "--out",
            samples,
            "--num-samples",
            str(b["samples"]),
            "--per-proc-batch-size",
            str(b.get("sample_batch", 500)),
        ]
        if kind == "teacher":
            cmd += [
                "--sampler",
                teacher_sampler(name),
                "--num-sampling-steps",
                str(steps),
                "--cfg-scale",
                str(s.cfg),
                "--global-seed",
                "1" if name.endswith("_s1") else "0",
                "--label-seed",
                "0",
            ]
        flow = name.startswith("flow_")
        source_stage = (
            ("flow_teacher" if flow else "teacher")
            if kind == "teacher"
            else f"student_gan_{name[4:]}"
            if name.startswith("gan_")
            else f"student_{name[6:]}"
            if name.startswith("short_")
            else f"student_{name}"
        )
        evaluations = (
            model_evaluations(teacher_sampler(name), steps) if kind == "teacher" else steps
        )
        long = kind == "teacher" and evaluations > 8
        p.add(
            f"sample_{name}",
            samples,
            cmd,
            after=[source_stage],
            estimate=est["sample_teacher25"] * evaluations / 25 if long else est["sample"],
        )
        own = FLOW_TEACHER if flow else "teacher_ddim25"
        figures[name] = p.add(
            f"eval_{name}",
            p.path("eval", f"{name}.json"),
            [
                "-m",
                "evaluator",
                ref,
                samples,
                "--features",
                s.data,
                "--feature-net",
                net,
                "--json",
                p.path("eval", f"{name}.json"),
                "--teacher-ref",
                p.path("samples", f"{own}.npz"),
                "--bootstrap",
                str(b["bootstrap"]),
            ],
            after=[f"sample_{name}", f"sample_{own}", s.net, "reference"],
            estimate=est["eval"],
        )
    return figures


def evaluate_real_train(p, s, ref, net, est):
    """The real training images against the test images: the floor of the figures against real data."""
    return p.add(
        "eval_real_train",
        p.path("eval", "real_train.json"),
        [
            "-m",
            "evaluator",
            ref,
            p.path("real_train.npz"),
            "--features",
            s.data,
            "--feature-net",
            net,
            "--json",
            p.path("eval", "real_train.json"),
        ],
        after=["real_train", s.net, "reference"],
        estimate=est["eval"],
    )


def history_probe(p, s, b, est, rows, traj, figure, prefix="", suffix=""):
    """The history probe of the seed-0 4-step state students N = 0 and ARD (their `prefix`ed rows)."""
    students = [
        source
        for name, _, _, source, _ in rows
        if name in (f"{prefix}k4_n0_state_s0", f"{prefix}k4_n{s.history_layers}_state_s0")
    ]
    p.add(
        f"history_probe{suffix}",
        p.path(f"history_probe{suffix}.json"),
        [
            "-m",
            "experiments.history_probe",
            "--traj",
            traj,
            "--val-count",
            str(b["val_count"]),
            "--json",
            p.path(f"history_probe{suffix}.json"),
            "--figure",
            figure,
            "--students",
            *students,
        ],
        after=["student_k4_n0_state_s0", f"student_k4_n{s.history_layers}_state_s0"],
        estimate=est["probe"],
    )


def measure_costs(p, s, b, rows):
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
        same = (
            f"{flow}teacher_{sampler}{steps}"
            if kind == "teacher"
            else "_".join(
                part for part in group.split("_") if part not in ("state", "x0", "short", "gan")
            )
        )
        if same not in measured:
            model, config = load_model(source)
            measured[same] = sampling_cost(
                model, config, steps, s.cfg, b["cost_batch"], sampler or "ddim"
            )
        costs[group] = measured[same]
    if measured:
        write_json(path, costs)
    return costs


def runner(args, default_run_dir):
    """The stage runner of an experiment's command line, after checking where it writes."""
    check_output_path(args.assets_dir, "--assets-dir", folder=True)
    if args.run_dir:
        check_output_path(args.run_dir, "--run-dir", folder=True)
    run_dir = args.run_dir or os.path.join(
        "runs", f"{default_run_dir}-quick" if args.quick else default_run_dir
    )
    return StageRunner(run_dir, ROOT, heavy_alone=not args.quick, fork=not args.no_fork)


def finish(p, s, b, args, rows, figures_of, real, mode, draw=None):
    """Runs the declared stages, then writes the tables (results.md, results.json), prints them, and draws the
    figures with draw(results) unless --quick."""
    start = time.time()
    p.run()
    results = {
        name: dict(
            json.load(open(figures_of[name])), steps=steps, kind=kind, source=source, group=group
        )
        for name, steps, kind, source, group in rows
    }
    costs = measure_costs(p, s, b, rows)
    table = report.summarise(
        s, results, costs, json.load(open(real)), rows, b, report.step_mse(rows), mode, args.quick
    )
    with open(p.path("results.md"), "w") as f:
        f.write(table["markdown"])
    write_json(p.path("results.json"), table["json"])
    print("\n" + table["markdown"])
    if draw is not None and not args.quick:
        os.makedirs(args.assets_dir, exist_ok=True)
        draw(results)
    print(
        f"\nTotal wall time of this invocation: {(time.time() - start) / 60:.1f} min; stage timings in {p.timings_path}"
    )
    print(
        f"CPU time (user + system) of the stages, over every invocation that ran them: {sum(p.cpu.values()):.0f} s for "
        f"{len(p.cpu)} of {len(p.stages)} stages; each stage's in {p.cpu_path}"
    )


def add_arguments(parser, default_run_dir):
    """The flags every experiment takes."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny budgets (with any of the modes): checks that every stage runs and hands on valid files",
    )
    parser.add_argument(
        "--run-dir",
        default=None,
        help=f"default: runs/{default_run_dir} (runs/{default_run_dir}-quick with --quick)",
    )
    parser.add_argument("--assets-dir", default="assets", help="where the figures go")
    parser.add_argument(
        "--no-fork",
        action="store_true",
        help="start every stage as a fresh Python process (by default one-thread stages are forks of a "
        "process that imported torch once; the figures are the same either way)",
    )
