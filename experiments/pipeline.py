"""The stages every embedded experiment declares (experiments/digits.py, experiments/fashion.py), as
the project's own scripts run them: the teacher (train.py), its feature network and reference
batches (evaluator), trajectories (train_teacher_traj.py), students (train_ard.py, and its GAN
stage), samples (sample_ddp.py), their figures against the real test images and against the
teacher's own samples (python -m evaluator), the history probe, the costs; and the end of a run: the
tables of experiments/report.py and the figures.

A Setting says what differs between the experiments: the dataset, the model, N, the learning rates.
A Row is one model of a table: its samples are samples/NAME.npz, its figures eval/NAME.json, and the
rows of one group (the seeds of one model) are one line of the table. teacher_row and student_row
name the rows; those names are file names and stage names, which is what lets a later invocation
reuse a run folder's finished stages.
"""

import fnmatch
import json
import math
import os
import shutil
import time
from dataclasses import dataclass

from ard.checkpoints import load_model
from ard.cli import check_output_path
from ard.cost import sampling_cost
from ard.fileio import write_json
from diffusion.sampling import model_evaluations
from experiments import report
from experiments.report import TEACHER_REFERENCE
from experiments.stage_runner import StageRunner

# The repository: where the stages run.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The stage that trains the teacher of each objective (train.py --objective), and its run folder.
TEACHER_STAGES = {"ddpm": "teacher", "flow": "flow_teacher"}
# The run folder's folder of figures; --assets-dir receives a copy.
FIGURES = "figures"


@dataclass(frozen=True)
class Setting:
    data: str  # an embedded dataset (ard.data.EMBEDDED)
    model: str  # the teacher's DiT_models key
    history_layers: int  # ARD's N
    teacher_lr: float
    teacher_ema: float
    # Constant: a headroom row reads a student's checkpoint half-way as a shorter run.
    student_lr: float
    real: str  # what the table calls the real test images, e.g. "the 360 held-out real digits"
    # And the real training images, e.g. "Real digits, training split (reference floor)".
    real_train: str
    cfg: float = 1.5
    net: str = "net"  # the stage (and file) name of the feature network


@dataclass(frozen=True)
class Row:
    """One model of a table: samples/NAME.npz, eval/NAME.json; its seeds share a line, its group."""

    name: str
    group: str
    steps: int  # sampling steps: a student's K, or the teacher sampler's
    checkpoint: str
    stage: str  # the stage that writes the checkpoint
    teacher_objective: str = "ddpm"  # the teacher the row comes from: "ddpm" (DiT's) or "flow"
    sampler: str | None = None  # a teacher row's: "ddim", "heun" or "euler"; None for a student
    # A student's training seed; a teacher row's sampling seed (1: the floor, other noises).
    seed: int = 0
    history_layers: int | None = None  # a student's N
    target: str | None = None  # a student's: "state" or "x0"
    # A student's: "plain", "gan" (after the GAN stage), "short" (its headroom checkpoint) or
    # "long" (its run trained on to long_steps: experiments.fashion --history's budget curve).
    variant: str = "plain"
    history_noise: float = 0.0  # a student's train_ard.py --history-noise

    @property
    def is_teacher(self):
        return self.sampler is not None


def teacher_row(checkpoint, sampler, steps, seed=0, teacher_objective="ddpm"):
    """The teacher sampled by `sampler` in `steps` steps: teacher_ddim25, flow_teacher_heun13_s1."""
    prefix = "flow_" if teacher_objective == "flow" else ""
    name = f"{prefix}teacher_{sampler}{steps}" + (f"_s{seed}" if seed else "")
    return Row(
        name=name,
        group=name,
        steps=steps,
        checkpoint=checkpoint,
        stage=TEACHER_STAGES[teacher_objective],
        teacher_objective=teacher_objective,
        sampler=sampler,
        seed=seed,
    )


def student_row(
    runner,
    history_layers,
    seed,
    at_step,
    target="state",
    student_steps=4,
    variant="plain",
    teacher_objective="ddpm",
    history_noise=0.0,
):
    """A student's row, its checkpoint of step `at_step`. Names (and groups): k4_n3_state_s0
    (k4_n3_state), gan_k4_n3_state_s0 (k4_n3_state_gan), short_k4_n3_state_s0 (k4_n3_short),
    long_k4_n3_state_s0 (k4_n3_long), flow_k4_n0_state_s1 (flow_k4_n0_state),
    short_k4_n3_state_hn0.05_s0 (k4_n3_short_hn0.05)."""
    model = ("flow_" if teacher_objective == "flow" else "") + f"k{student_steps}_n{history_layers}"
    noise = f"_hn{history_noise:g}" if history_noise else ""
    plain = f"{model}_{target}{noise}_s{seed}"
    if variant == "plain":
        name, group = plain, f"{model}_{target}{noise}"
    elif variant == "gan":
        name, group = f"gan_{plain}", f"{model}_{target}{noise}_gan"
    else:  # short or long: the plain student's run, read at an earlier or a later checkpoint
        name, group = f"{variant}_{plain}", f"{model}_{variant}{noise}"
    run = name if variant == "gan" else plain
    return Row(
        name=name,
        group=group,
        steps=student_steps,
        checkpoint=runner.path("students", run, "checkpoints", f"{at_step:07d}.pt"),
        stage=f"student_{run}",
        teacher_objective=teacher_objective,
        seed=seed,
        history_layers=history_layers,
        target=target,
        variant=variant,
        history_noise=history_noise,
    )


def figure_path(runner, name):
    """Where a run draws its figure NAME: RUN_DIR/figures/NAME."""
    return runner.path(FIGURES, name)


def train_teacher(runner, setting, budget, estimates, objective="ddpm"):
    """The teacher on the setting's data: DiT's objective, or flow matching with the same budget."""
    name = TEACHER_STAGES[objective]
    return runner.add(
        name,
        runner.path(name, "checkpoints", f"{budget['teacher_steps']:07d}.pt"),
        [
            "train.py",
            "--model",
            setting.model,
            "--data",
            setting.data,
            "--objective",
            objective,
            "--max-steps",
            str(budget["teacher_steps"]),
            "--lr",
            str(setting.teacher_lr),
            "--ema-decay",
            str(setting.teacher_ema),
            "--global-batch-size",
            str(budget["teacher_batch"]),
            "--log-every",
            "250",
            "--ckpt-every",
            str(max(1, budget["teacher_steps"] // 4)),
            "--run-dir",
            runner.path(name),
            "--resume",
            "auto",
        ],
        heavy=True,
        estimate=estimates["teacher"],
    )


def prepare(runner, setting, budget, estimates):
    """The teacher, the feature network, the reference batches and the trajectories; returns the
    paths of the teacher's checkpoint, the test images' batch, the feature network and the
    trajectory store."""
    teacher = train_teacher(runner, setting, budget, estimates)
    net = runner.add(
        setting.net,
        runner.path(f"{setting.net}.pt"),
        [
            "-m",
            "evaluator.train_feature_net",
            "--data",
            setting.data,
            "--out",
            runner.path(f"{setting.net}.pt"),
            "--epochs",
            str(budget["net_epochs"]),
        ],
        estimate=estimates["net"],
    )
    ref = runner.add(
        "reference",
        runner.path("ref_test.npz"),
        [
            "-m",
            "evaluator.make_reference",
            "--data",
            setting.data,
            "--split",
            "test",
            "--out",
            runner.path("ref_test.npz"),
        ],
        estimate=estimates["reference"],
    )
    runner.add(
        "real_train",
        runner.path("real_train.npz"),
        [
            "-m",
            "evaluator.make_reference",
            "--data",
            setting.data,
            "--split",
            "train",
            *(["--num", str(budget["real_train"])] if budget.get("real_train") else []),
            "--out",
            runner.path("real_train.npz"),
        ],
        estimate=estimates["reference"],
    )
    traj = runner.path("traj")
    runner.add(
        "trajectories",
        os.path.join(traj, "shard-%05d" % ((budget["trajectories"] - 1) // 1000)),
        [
            "train_teacher_traj.py",
            "--ckpt",
            teacher,
            "--out",
            traj,
            "--num-trajectories",
            str(budget["trajectories"]),
            "--num-sampling-steps",
            "25",
            "--cfg-scale",
            str(setting.cfg),
        ],
        after=["teacher"],
        heavy=True,
        estimate=estimates["trajectories"],
    )
    return teacher, ref, net, traj


def student_stage(
    runner,
    setting,
    budget,
    estimates,
    traj,
    teacher,
    history_layers,
    seed=0,
    target="state",
    student_steps=4,
    steps=None,
    after="trajectories",
    teacher_objective="ddpm",
    history_noise=0.0,
    every=None,
):
    """A student distilled from a store by train_ard.py; returns its row (its last checkpoint).
    It saves every `every` steps (default: a quarter of its steps) and validates then too, on a log
    step (train_ard.py validates only at those), so it logs at a divisor of `every`."""
    steps = steps or budget["distil_steps"]
    every = every or max(1, steps // 4)
    log_every = math.gcd(max(1, steps // 20), every)
    row = student_row(
        runner,
        history_layers,
        seed,
        at_step=steps,
        target=target,
        student_steps=student_steps,
        teacher_objective=teacher_objective,
        history_noise=history_noise,
    )
    runner.add(
        row.stage,
        row.checkpoint,
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
            str(student_steps),
            "--global-batch-size",
            str(budget["student_batch"]),
            "--lr",
            str(setting.student_lr),
            "--ema-decay",
            "0.99",
            "--max-steps",
            str(steps),
            "--val-count",
            str(budget["val_count"]),
            "--val-every",
            str(every),
            "--log-every",
            str(log_every),
            "--sample-every",
            "0",
            # The digits' students keep their headroom_steps checkpoint.
            "--ckpt-every",
            str(every),
            "--global-seed",
            str(seed),
            "--run-dir",
            runner.path("students", row.name),
            "--resume",
            "auto",
            *(["--history-noise", str(history_noise)] if history_noise else []),
        ],
        after=[after],
        estimate=estimates["student"] * student_steps / 4 * steps / budget["distil_steps"],
    )
    return row


def gan_stage(runner, setting, budget, estimates, traj, teacher, student):
    """The GAN stage from the last checkpoint of the student (its row); returns its own row."""
    steps = budget["gan_steps"]
    row = student_row(
        runner,
        student.history_layers,
        student.seed,
        at_step=steps,
        target=student.target,
        student_steps=student.steps,
        variant="gan",
        teacher_objective=student.teacher_objective,
    )
    runner.add(
        row.stage,
        row.checkpoint,
        [
            "train_ard.py",
            "--gan",
            "--init-ckpt",
            student.checkpoint,
            "--traj",
            traj,
            "--teacher-ckpt",
            teacher,
            "--data",
            setting.data,
            "--history-layers",
            str(student.history_layers),
            "--global-batch-size",
            str(budget["student_batch"]),
            "--lr",
            "1e-4",
            "--ema-decay",
            "0.99",
            "--max-steps",
            str(steps),
            "--gan-warmup",
            str(budget["gan_warmup"]),
            "--global-seed",
            str(student.seed),
            "--val-count",
            str(budget["val_count"]),
            "--val-every",
            str(steps),
            "--log-every",
            str(max(1, steps // 20)),
            "--sample-every",
            str(steps),
            "--run-dir",
            runner.path("students", row.name),
            "--resume",
            "auto",
        ],
        after=[student.stage],
        estimate=estimates["gan"],
    )
    return row


def evaluate(runner, setting, budget, rows, ref, net, estimates):
    """Samples of every row and their figures against the real test images and against the samples
    of the row's own teacher (TEACHER_REFERENCE); returns {name: its figures' path}."""
    figures = {}
    for row in rows:
        samples = runner.path("samples", f"{row.name}.npz")
        cmd = [
            "sample_ddp.py",
            "--ckpt",
            row.checkpoint,
            "--out",
            samples,
            "--num-samples",
            str(budget["samples"]),
            "--per-proc-batch-size",
            str(budget.get("sample_batch", 500)),
        ]
        if row.is_teacher:
            cmd += [
                "--sampler",
                row.sampler,
                "--num-sampling-steps",
                str(row.steps),
                "--cfg-scale",
                str(setting.cfg),
                "--global-seed",
                str(row.seed),
                "--label-seed",
                "0",
            ]
        evaluations = model_evaluations(row.sampler, row.steps) if row.is_teacher else row.steps
        long = row.is_teacher and evaluations > 8
        runner.add(
            f"sample_{row.name}",
            samples,
            cmd,
            after=[row.stage],
            estimate=estimates["sample_teacher25"] * evaluations / 25
            if long
            else estimates["sample"],
        )
        own = TEACHER_REFERENCE[row.teacher_objective]
        figures[row.name] = runner.add(
            f"eval_{row.name}",
            runner.path("eval", f"{row.name}.json"),
            [
                "-m",
                "evaluator",
                ref,
                samples,
                "--features",
                setting.data,
                "--feature-net",
                net,
                "--json",
                runner.path("eval", f"{row.name}.json"),
                "--teacher-ref",
                runner.path("samples", f"{own}.npz"),
                "--bootstrap",
                str(budget["bootstrap"]),
            ],
            after=[f"sample_{row.name}", f"sample_{own}", setting.net, "reference"],
            estimate=estimates["eval"],
        )
    return figures


def evaluate_real_train(runner, setting, ref, net, estimates):
    """The real training images against the test images: the floor of the figures on real data."""
    return runner.add(
        "eval_real_train",
        runner.path("eval", "real_train.json"),
        [
            "-m",
            "evaluator",
            ref,
            runner.path("real_train.npz"),
            "--features",
            setting.data,
            "--feature-net",
            net,
            "--json",
            runner.path("eval", "real_train.json"),
        ],
        after=["real_train", setting.net, "reference"],
        estimate=estimates["eval"],
    )


def history_probe(runner, setting, budget, estimates, rows, traj, variant="plain"):
    """The history probe of the seed-0 4-step state students N = 0 and ARD of the DDPM teacher,
    their `variant` rows (plain, or short: the headroom checkpoints): history_probe[_short].json and
    its figure."""
    suffix = "" if variant == "plain" else f"_{variant}"
    students = [
        row
        for row in rows
        if not row.is_teacher
        and row.teacher_objective == "ddpm"
        and (row.steps, row.target, row.variant, row.seed, row.history_noise)
        == (4, "state", variant, 0, 0.0)
        and row.history_layers in (0, setting.history_layers)
    ]
    figure = figure_path(runner, f"{setting.data}_history_probe{suffix}.png")
    # Its output is the figure, the last file it writes.
    runner.add(
        f"history_probe{suffix}",
        figure,
        [
            "-m",
            "experiments.history_probe",
            "--traj",
            traj,
            "--val-count",
            str(budget["val_count"]),
            "--json",
            runner.path(f"history_probe{suffix}.json"),
            "--figure",
            figure,
            "--students",
            *[row.checkpoint for row in students],
        ],
        after=[row.stage for row in students],
        estimate=estimates["probe"],
    )


def measure_costs(runner, setting, budget, rows):
    """FLOPs and CPU time per image of each model type (one process, a batch of cost_batch), kept in
    costs.json; a later run with more rows measures only the groups that are new."""
    path = runner.path("costs.json")
    costs = {}
    if os.path.isfile(path):
        with open(path) as f:
            costs = {group: tuple(value) for group, value in json.load(f).items()}
        print(f"[costs] reusing {path}", flush=True)
    measured = {}
    for row in rows:
        if row.group in costs:
            continue
        # The GAN stage, the target and the seed change no cost; a teacher's is its sampler's.
        model_type = (row.teacher_objective, row.sampler, row.steps, row.history_layers)
        if model_type not in measured:
            model, config = load_model(row.checkpoint)
            measured[model_type] = sampling_cost(
                model, config, row.steps, setting.cfg, budget["cost_batch"], row.sampler or "ddim"
            )
        costs[row.group] = measured[model_type]
    if measured:
        write_json(path, costs)
    return costs


def paired_sets(rows):
    """The sets one paired bootstrap covers: {(teacher objective, target, variant, seed): (the
    baseline, the set's rows)}, every 4-step student of that key with step distillation (N = 0, no
    history noise) as its baseline. A set without its baseline or with nothing to compare with it
    is left out, and so are the GAN stage's students: no table reads a ratio of theirs."""
    sets = {}
    for row in rows:
        if not row.is_teacher and row.steps == 4 and row.variant != "gan":
            key = (row.teacher_objective, row.target, row.variant, row.seed)
            sets.setdefault(key, []).append(row)
    out = {}
    for key, group in sorted(sets.items()):
        baseline = next((r for r in group if r.history_layers == 0 and not r.history_noise), None)
        if baseline is not None and len(group) > 1:
            out[key] = (baseline, group)
    return out


def paired_students(runner, setting, rows, resamples):
    """Every student of a paired set (paired_sets) against its step distillation, from one paired
    bootstrap over that seed's samples (the same resampled indices for the teacher, the baseline
    and every student of the set): {row name: degradation.paired_comparison}."""
    from evaluator.__main__ import load_batch
    from evaluator.feature_net import features, load_feature_net
    from experiments.degradation import paired_comparison, paired_fids

    sets = paired_sets(rows)
    if not sets:
        return {}
    net, _ = load_feature_net(runner.path(f"{setting.net}.pt"))
    cache = {}

    def feats(name):
        if name not in cache:
            path = runner.path("ref_test.npz") if name is None else runner.path("samples", name)
            cache[name] = features(net, load_batch(path)["arr_0"])[0]
        return cache[name]

    out = {}
    for key, (baseline, group) in sets.items():
        own = TEACHER_REFERENCE[key[0]]
        students = {row.name: feats(f"{row.name}.npz") for row in group}
        point, draws = paired_fids(
            feats(None),
            feats(f"{own}.npz"),
            feats(f"{own}_s1.npz"),
            students,
            resamples,
            seed=key[3],
        )
        for row in group:
            if row is not baseline:
                out[row.name] = paired_comparison(point, draws, baseline.name, row.name)
    return out


def select(runner, rows, patterns):
    """--only: keeps the rows whose names match one of the shell patterns, the stages whose names
    do (a stage that is no row: history_probe), the samples of the teacher each kept row is read
    against (the DDIM teacher's always) and their floor (its other-noise samples), the real
    training images' figures, and every stage these need; drops every other stage. Returns the
    rows kept, for the tables."""
    if not patterns:
        return rows
    unmatched = [
        pattern
        for pattern in patterns
        if not any(
            fnmatch.fnmatchcase(name, pattern)
            for name in [r.name for r in rows] + list(runner.stages)
        )
    ]
    if unmatched:
        raise SystemExit(
            f"--only {' '.join(unmatched)} matches no row or stage of this mode; its rows are "
            f"{', '.join(row.name for row in rows)}; its stages {', '.join(runner.stages)}."
        )
    matched = [row for row in rows if any(fnmatch.fnmatchcase(row.name, p) for p in patterns)]
    # The DDIM teacher's figures head every table; a flow row is read against the flow teacher's.
    references = {TEACHER_REFERENCE["ddpm"]}
    references |= {TEACHER_REFERENCE[row.teacher_objective] for row in matched}
    references |= {f"{name}_s1" for name in references}
    names = {row.name for row in matched} | references
    kept = [row for row in rows if row.name in names]
    stages = {f"eval_{row.name}" for row in kept} | {"eval_real_train"}
    stages |= {
        name for name in runner.stages if any(fnmatch.fnmatchcase(name, p) for p in patterns)
    }
    runner.keep(stages)
    return kept


def make_runner(args, default_run_dir):
    """The stage runner of an experiment's command line, after checking where it writes."""
    if args.assets_dir and args.only:
        raise SystemExit(
            "--assets-dir copies the mode's figures, which an --only part does not draw (the run "
            "folder's would be an earlier run's); give --assets-dir to the run without --only."
        )
    if args.assets_dir:
        check_output_path(args.assets_dir, "--assets-dir", folder=True)
    if args.run_dir:
        check_output_path(args.run_dir, "--run-dir", folder=True)
    run_dir = args.run_dir or os.path.join(
        "runs", f"{default_run_dir}-quick" if args.quick else default_run_dir
    )
    return StageRunner(run_dir, ROOT, heavy_alone=not args.quick, fork=not args.no_fork)


def finish(runner, setting, budget, args, rows, figures_of, real, mode, draw=None):
    """Runs the declared stages (with --only, part of them: select), writes the tables (results.md,
    results.json) and prints them, draws the figures into RUN_DIR/figures/ with draw(results) unless
    --quick or --only, and copies that folder to --assets-dir if given."""
    start = time.time()
    rows = select(runner, rows, args.only)
    if args.only:
        mode += f", only {' '.join(args.only)}"
    runner.run()
    results = {}
    for row in rows:
        with open(figures_of[row.name]) as f:
            results[row.name] = json.load(f)
    with open(real) as f:
        real_figures = json.load(f)
    costs = measure_costs(runner, setting, budget, rows)
    table = report.summarise(
        setting,
        results,
        costs,
        real_figures,
        rows,
        budget,
        report.step_mse(rows),
        mode,
        args.quick,
        paired_students(runner, setting, rows, budget.get("paired_resamples", budget["bootstrap"])),
    )
    with open(runner.path("results.md"), "w") as f:
        f.write(table["markdown"])
    write_json(runner.path("results.json"), table["json"])
    print("\n" + table["markdown"])
    if args.only:
        print("[figures] not drawn: --only runs part of the mode's rows, the figures show them all")
    elif draw is not None and not args.quick:
        os.makedirs(runner.path(FIGURES), exist_ok=True)
        draw(results)
    # At the end, and from the folder: the figures drawn by an earlier invocation's stages too.
    if args.assets_dir:
        copy_figures(runner.path(FIGURES), args.assets_dir)
    minutes = (time.time() - start) / 60
    print(
        f"\nTotal wall time of this invocation: {minutes:.1f} min; stage timings in "
        f"{runner.timings_path}"
    )
    # Of this mode's stages: the folder may hold others', from other modes or other --only parts.
    cpu = [runner.cpu[name] for name in runner.stages if name in runner.cpu]
    print(
        "CPU time (user + system) of the stages, over every invocation that ran them: "
        f"{sum(cpu):.0f} s for {len(cpu)} of {len(runner.stages)} stages; "
        f"each stage's in {runner.cpu_path}"
    )


def copy_figures(folder, assets_dir):
    """Copies every file of a run's folder of figures into assets_dir."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    os.makedirs(assets_dir, exist_ok=True)
    for name in names:
        shutil.copyfile(os.path.join(folder, name), os.path.join(assets_dir, name))
    print(f"[figures] copied {len(names)} from {folder} to {assets_dir}: {', '.join(names)}")


def add_arguments(parser, default_run_dir):
    """The flags every experiment takes."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny budgets (with any of the modes): checks that every stage runs and hands on "
        "valid files",
    )
    parser.add_argument(
        "--run-dir",
        default=None,
        help=f"default: runs/{default_run_dir} (runs/{default_run_dir}-quick with --quick); the "
        "figures go to its figures/",
    )
    parser.add_argument(
        "--assets-dir",
        default=None,
        help="also copy the run's figures (RUN_DIR/figures/) into this folder at the end, e.g. "
        "assets to refresh the figures the docs show (default: not given; the figures stay in the "
        "run folder)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="PATTERN",
        default=None,
        help="run part of the mode: the rows (or stages) whose names match these shell patterns, "
        "e.g. 'k4_*_state_s*', the teacher's reference samples every figure is read against, and "
        "the stages they need; the tables (results.md, results.json: rewritten by each part) "
        "cover those rows and no figures are drawn (default: every row of the mode)",
    )
    parser.add_argument(
        "--no-fork",
        action="store_true",
        help="start every stage as a fresh Python process (by default one-thread stages are forks "
        "of a process that imported torch once; the figures are the same either way)",
    )
