"""The main job on the embedded digits default, end to end, as the project's own scripts run it:

    teacher (train.py) -> trajectories (train_teacher_traj.py) -> 4-step students, step
    distillation (N = 0) and ARD (N > 0) (train_ard.py), each also fine-tuned by the GAN stage
    (train_ard.py --gan) -> samples (sample_ddp.py) -> evaluation against held-out real digits and
    against the teacher's own samples with the digits feature network (python -m evaluator
    --features digits) -> the history probe -> tables in the paper's form.

    python -m experiments.digits                 # the default (about 8 minutes on 2 CPU cores)
    python -m experiments.digits --quick         # every stage with tiny budgets: an end-to-end
                                                 # smoke test (about a minute)
    python -m experiments.digits --quick --flow  # the same with the flow teacher's stages (one
                                                 # seed; the test suite runs it)
    python -m experiments.digits --headroom      # the default plus N = 0 and ARD after 400 steps,
                                                 # 3 seeds (about 4 min more)
    python -m experiments.digits --history       # the headroom setting plus N = 1, 2, 6 and history
                                                 # trained with noise, 3 seeds (about 30 min more)
    python -m experiments.digits --flow          # the default plus a flow-matching teacher and its
                                                 # students, 3 seeds (about 15 min more)
    python -m experiments.digits --full          # 3 seeds, both targets, GAN, headroom, 2-5 step
                                                 # students, flow (about 50 min)

Finished stages are reused when the command is run again (each is skipped when its output exists;
the trajectory writer and the sampler resume partial work; an interrupted training stage resumes
from its last checkpoint, --resume auto). On SIGTERM or SIGUSR1 the running stages save their work
and the job exits with status 75; the same command continues it. Everything goes to --run-dir:
checkpoints, stores, samples, logs/ (one per stage), timings.json, results.md, results.json and
figures/ (the PNGs the docs show); --assets-dir DIR also copies figures/ to DIR at the end
(--assets-dir assets refreshes the repository's own). Set OMP_NUM_THREADS only to limit the cores:
the runner gives the teacher and the trajectory writer all of them (--full's two teachers, then
their writers, share them), and every other stage one thread, one per core, side by side.
"""

import argparse
import os

from ard import cli
from experiments import pipeline, report
from experiments.pipeline import Setting, student_row, teacher_row
from experiments.report import FLOW_SOLVER, FLOW_STEPS, FLOW_TEACHER

BUDGETS = {
    # teacher steps, trajectories, student steps, samples per model, GAN steps
    "quick": dict(
        teacher_steps=40,
        trajectories=128,
        distil_steps=12,
        samples=100,
        gan_steps=6,
        gan_warmup=3,
        headroom_steps=6,
        val_count=32,
        teacher_batch=32,
        student_batch=16,
        net_epochs=2,
        cost_batch=20,
        bootstrap=10,
        paired_resamples=10,
    ),
    "default": dict(
        teacher_steps=1400,
        trajectories=6000,
        distil_steps=800,
        samples=2000,
        gan_steps=120,
        gan_warmup=40,
        headroom_steps=400,
        val_count=500,
        teacher_batch=128,
        student_batch=64,
        net_epochs=40,
        cost_batch=500,
        bootstrap=100,
        paired_resamples=200,
    ),
}
# The tiny teacher: DiT-T (depth 6, width 128) with 4x4 patches, four tokens per 8x8 digit. It
# reaches a better FID than 2x2 patches (16 tokens) at the same 1,400 steps, and every stage after
# it runs 2.5-4x faster. N = 3 of its 6 blocks see the history; the students' learning rate is
# constant (the headroom rows read a checkpoint half-way).
DIGITS_MODEL = "DiT-T/4"
DIGITS = Setting(
    data="digits",
    model=DIGITS_MODEL,
    history_layers=3,
    teacher_lr=2e-3,
    teacher_ema=0.99,
    student_lr=3e-3,
    real="the 360 held-out real digits",
    real_train="Real digits, training split (reference floor)",
    net="digits_net",
)
HISTORY_LAYERS = DIGITS.history_layers
# --history: the headroom setting's students with history in 0 to all 6 blocks, and ARD and step
# distillation trained with Gaussian noise of these stds on their history inputs (train_ard.py
# --history-noise; the digits' pixels are in [-1, 1]).
HISTORY_DEPTHS = (0, 1, 2, 3, 6)
HISTORY_NOISES = (0.02, 0.05, 0.1)

# Seconds per stage on the reference machine (2 cores), for the run's time estimate: the runner
# rescales them by how fast this machine turns out to be.
ESTIMATES = {
    "quick": dict(
        teacher=8,
        net=6,
        reference=3,
        trajectories=7,
        student=8,
        gan=8,
        sample=4,
        sample_teacher25=6,
        eval=3,
        probe=5,
    ),
    "default": dict(
        teacher=130,
        net=30,
        reference=5,
        trajectories=55,
        student=180,
        gan=70,
        sample=6,
        sample_teacher25=32,
        eval=8,
        probe=35,
    ),
}


def flow_rows(runner, budget, estimates, seeds):
    """The flow-matching teacher, its trajectories (Heun), its 4-step students N = 0 and ARD over
    the seeds, and its own samples at a few step counts (only the trajectories' solver for a single
    seed: --quick); returns the rows."""
    teacher = pipeline.train_teacher(runner, DIGITS, budget, estimates, objective="flow")
    traj = runner.path("traj_flow")
    runner.add(
        "flow_trajectories",
        os.path.join(traj, "shard-%05d" % ((budget["trajectories"] - 1) // 1000)),
        [
            "train_teacher_traj.py",
            "--ckpt",
            teacher,
            "--out",
            traj,
            "--num-trajectories",
            str(budget["trajectories"]),
            "--solver",
            FLOW_SOLVER,
            "--num-sampling-steps",
            str(FLOW_STEPS),
            "--cfg-scale",
            str(DIGITS.cfg),
        ],
        after=["flow_teacher"],
        heavy=True,
        estimate=estimates["trajectories"],
    )
    samplers = (
        [(FLOW_SOLVER, FLOW_STEPS)]
        if len(seeds) == 1
        else [("heun", 2), ("heun", 4), (FLOW_SOLVER, FLOW_STEPS), ("euler", 25)]
    )
    rows = [
        teacher_row(teacher, sampler, steps, teacher_objective="flow")
        for sampler, steps in samplers
    ]
    rows.append(teacher_row(teacher, FLOW_SOLVER, FLOW_STEPS, seed=1, teacher_objective="flow"))
    for seed in seeds:
        for history_layers in (0, HISTORY_LAYERS):
            rows.append(
                pipeline.student_stage(
                    runner,
                    DIGITS,
                    budget,
                    estimates,
                    traj,
                    teacher,
                    history_layers,
                    seed,
                    after="flow_trajectories",
                    teacher_objective="flow",
                )
            )
    return rows


def distil(runner, budget, args, teacher, traj, estimates):
    """Every student of the mode; returns the rows of the table's students."""

    def declare_student(
        history_layers, seed=0, target="state", student_steps=4, steps=None, history_noise=0.0
    ):
        return pipeline.student_stage(
            runner,
            DIGITS,
            budget,
            estimates,
            traj,
            teacher,
            history_layers,
            seed,
            target,
            student_steps,
            steps,
            history_noise=history_noise,
        )

    rows = []
    seeds = [0, 1, 2] if args.full else [0]
    for target in ["state", "x0"] if args.full else ["state"]:
        for seed in seeds:
            for history_layers in (0, HISTORY_LAYERS):
                rows.append(declare_student(history_layers, seed, target))
    if args.full or args.headroom or args.history:
        # The setting with headroom: the same students after headroom_steps of their steps, where
        # step distillation still falls short of its teacher. A constant learning rate makes that
        # checkpoint the same as a run of headroom_steps, so --headroom trains seeds 1 and 2 only
        # that far.
        for seed in (0, 1, 2):
            for history_layers in (0, HISTORY_LAYERS):
                if seed not in seeds:
                    declare_student(history_layers, seed, steps=budget["headroom_steps"])
                rows.append(
                    student_row(
                        runner,
                        history_layers,
                        seed,
                        at_step=budget["headroom_steps"],
                        variant="short",
                    )
                )
    if args.history:
        # How deep the history goes, and history trained on noised inputs: more students of the
        # headroom setting, each a run of headroom_steps, three seeds.
        headroom = budget["headroom_steps"]
        students = [(layers, 0.0) for layers in HISTORY_DEPTHS if layers not in (0, HISTORY_LAYERS)]
        students += [(layers, noise) for noise in HISTORY_NOISES for layers in (0, HISTORY_LAYERS)]
        for seed in (0, 1, 2):
            for history_layers, noise in students:
                declare_student(history_layers, seed, steps=headroom, history_noise=noise)
                rows.append(
                    student_row(
                        runner,
                        history_layers,
                        seed,
                        at_step=headroom,
                        variant="short",
                        history_noise=noise,
                    )
                )
    # The GAN stage, from step distillation and from ARD (state target).
    for student in [row for row in rows if row.target == "state" and row.variant == "plain"]:
        rows.append(pipeline.gan_stage(runner, DIGITS, budget, estimates, traj, teacher, student))
    if args.full:
        for student_steps in (2, 3, 5):
            for history_layers in (0, HISTORY_LAYERS):
                rows.append(declare_student(history_layers, 0, "state", student_steps))
    return rows


def declare(runner, budget, estimates, args):
    """Every stage of the mode, declared on the runner; returns (the table's rows, {row name: its
    figures' path}, the real training digits' figures' path)."""
    teacher, ref, net, traj = pipeline.prepare(runner, DIGITS, budget, estimates)
    rows = distil(runner, budget, args, teacher, traj, estimates)
    # --flow: the steps each teacher needs.
    ddim_steps = [2, 3, 4, 5, 8, 16, 25] if args.full else [2, 3, 4, 25] if args.flow else [4, 25]
    rows += [teacher_row(teacher, "ddim", steps) for steps in ddim_steps]
    # Other noises: the teacher-fidelity floor.
    rows.append(teacher_row(teacher, "ddim", 25, seed=1))
    if args.full or args.flow:
        rows += flow_rows(runner, budget, estimates, seeds=(0,) if args.quick else (0, 1, 2))
    figures_of = pipeline.evaluate(runner, DIGITS, budget, rows, ref, net, estimates)
    real = pipeline.evaluate_real_train(runner, DIGITS, ref, net, estimates)
    for variant in ["plain"] + (["short"] if args.full or args.headroom or args.history else []):
        pipeline.history_probe(runner, DIGITS, budget, estimates, rows, traj, variant)
    return rows, figures_of, real


def figures(runner, rows, results, full):
    """The docs' figures, in RUN_DIR/figures/: a grid of samples (same noise and classes, one row
    per model), the held-out MSE during distillation, the GAN stage's logged figures and, with
    --full, FID against steps."""
    import matplotlib

    matplotlib.use("Agg")
    layers = HISTORY_LAYERS
    shown = [
        ("teacher_ddim25", "Teacher, DDIM 25 steps"),
        ("teacher_ddim4", "Teacher, DDIM 4 steps"),
        ("k4_n0_state_s0", "Step distillation, 4 steps"),
        (f"k4_n{layers}_state_s0", f"ARD (N={layers}), 4 steps"),
        (f"gan_k4_n{layers}_state_s0", f"ARD (N={layers}) + GAN, 4 steps"),
    ]
    report.samples_figure(runner, pipeline.figure_path(runner, "digits_samples.png"), shown)
    if any(row.teacher_objective == "flow" for row in rows):
        report.samples_figure(
            runner,
            pipeline.figure_path(runner, "digits_flow_samples.png"),
            [
                (
                    FLOW_TEACHER,
                    f"Flow teacher, Heun {FLOW_STEPS} steps ({2 * FLOW_STEPS - 1} evaluations)",
                ),
                ("flow_teacher_heun2", "Flow teacher, Heun 2 steps (3 evaluations)"),
                ("flow_k4_n0_state_s0", "Its step distillation, 4 steps"),
                (f"flow_k4_n{layers}_state_s0", f"Its ARD (N={layers}), 4 steps"),
            ],
        )
    report.val_mse_figure(DIGITS, runner, pipeline.figure_path(runner, "digits_val_mse.png"))
    report.gan_figure(DIGITS, runner, pipeline.figure_path(runner, "digits_gan.png"))
    if full:
        report.fid_steps_figure(
            DIGITS, rows, results, pipeline.figure_path(runner, "digits_fid_vs_steps.png")
        )


def main(args):
    runner = pipeline.make_runner(args, "digits")
    budget = BUDGETS["quick" if args.quick else "default"]
    estimates = ESTIMATES["quick" if args.quick else "default"]
    rows, figures_of, real = declare(runner, budget, estimates, args)
    mode = next(
        name
        for name in ("full", "headroom", "history", "flow", "default")
        if name == "default" or getattr(args, name)
    )
    pipeline.finish(
        runner,
        DIGITS,
        budget,
        args,
        rows,
        figures_of,
        real,
        mode,
        draw=lambda results: figures(runner, rows, results, args.full),
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--headroom",
        action="store_true",
        help="the default rows plus the headroom setting: N = 0 and ARD after headroom_steps "
        "steps, 3 seeds",
    )
    mode.add_argument(
        "--history",
        action="store_true",
        help="the headroom setting plus students with N in "
        f"{{{', '.join(map(str, HISTORY_DEPTHS))}}} and with noise of std "
        f"{{{', '.join(map(str, HISTORY_NOISES))}}} on their history inputs, 3 seeds each",
    )
    mode.add_argument(
        "--full",
        action="store_true",
        help="3 seeds, both targets, GAN, the headroom setting, 2-5 step students, the flow "
        "teacher, FID-vs-steps plot",
    )
    mode.add_argument(
        "--flow",
        action="store_true",
        help="the default rows plus a flow-matching teacher (train.py --objective flow) and its "
        "N = 0 and ARD students, 3 seeds",
    )
    pipeline.add_arguments(parser, "digits")
    return parser.parse_args(argv)


if __name__ == "__main__":
    cli.run(main, parse_args)
