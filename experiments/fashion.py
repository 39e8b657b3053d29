"""ARD on Fashion-MNIST (60,000 training and 10,000 test images, 28x28 grey, 10 classes), end to
end, as the project's own scripts run it: does what the digits showed (4 tokens a step) hold with
49 tokens a step?

    teacher (train.py --data fashion, DiT-T/4: 7x7 = 49 tokens) -> trajectories (DDIM 25, CFG 1.5)
    -> 4-step students, step distillation (N = 0) and ARD (N = 3), with the state target and with
    the x0 target, and the GAN stage on both state students -> samples -> figures against the 10,000
    test images and against the teacher's own samples, with the Fashion-MNIST feature network -> the
    history probe -> the teacher at 2 to 25 steps -> tables.

    python -m experiments.fashion             # one seed of each student (about 2.3 hours on
                                              # 2 CPU cores)
    python -m experiments.fashion --seeds 3   # three (for a GPU)
    python -m experiments.fashion --history   # the default plus the state students of seeds 1
                                              # and 2, seed 0's trained on to 3,000 steps, and
                                              # students trained with noise on their history
                                              # (about 5.5 hours on 2 CPU cores in all)
    python -m experiments.fashion --quick     # every stage with tiny budgets (a smoke test)

It needs the four idx files of Fashion-MNIST (ard.data.FASHION_DIRS:
`apt-get install dataset-fashion-mnist` on Debian). Finished stages are reused when the command is
run again; an interrupted training stage resumes from its last checkpoint; on SIGTERM the running
stages save their work and the job exits with status 75. The plots go to RUN_DIR/figures/ (and with
--assets-dir DIR to DIR as well).
"""

import argparse

from ard import cli
from ard.cli import positive_int
from experiments import pipeline, report
from experiments.pipeline import Setting, student_row, teacher_row

BUDGETS = {
    "quick": dict(
        teacher_steps=20,
        trajectories=64,
        distil_steps=6,
        long_steps=18,
        samples=64,
        gan_steps=4,
        gan_warmup=2,
        val_count=16,
        teacher_batch=16,
        student_batch=8,
        net_epochs=1,
        cost_batch=16,
        bootstrap=5,
        real_train=500,
        sample_batch=64,
    ),
    "default": dict(
        teacher_steps=6000,
        trajectories=5000,
        distil_steps=1000,
        long_steps=3000,
        samples=2000,
        gan_steps=100,
        gan_warmup=30,
        val_count=500,
        teacher_batch=128,
        student_batch=32,
        net_epochs=8,
        cost_batch=200,
        bootstrap=100,
        real_train=10000,
        sample_batch=250,
    ),
}
# DiT-T (depth 6, width 128) with 4x4 patches: 7x7 = 49 tokens a 28x28 image; N = 3 of its 6 blocks
# see the history. The teacher's EMA: at 0.999 its 2,000-step average still held the first,
# untrained steps' weights and its samples were noise where the raw weights' were clean garments;
# 0.995 averages about the last 200 steps.
FASHION = Setting(
    data="fashion",
    model="DiT-T/4",
    history_layers=3,
    teacher_lr=2e-3,
    teacher_ema=0.995,
    student_lr=2e-3,
    real="the 10,000 Fashion-MNIST test images",
    real_train="Real Fashion-MNIST, 10,000 training images (reference floor)",
    net="fashion_net",
)
TEACHER_STEPS = [2, 3, 4, 5, 8, 16, 25]  # the teacher's own DDIM samples at these step counts
# --history: the state students of three seeds; seed 0's trained on to long_steps (the budget
# curve: a constant learning rate makes its distil_steps checkpoint the plain student's); and N = 0
# and ARD trained with Gaussian noise of these stds on their history inputs (train_ard.py
# --history-noise; the images are in [-1, 1]), the same three seeds.
HISTORY_SEEDS = (0, 1, 2)
HISTORY_NOISES = (0.05, 0.1)

# Seconds per stage on the reference machine (2 cores), for the run's time estimate: the runner
# rescales them by how fast this machine turns out to be.
ESTIMATES = {
    "quick": dict(
        teacher=10,
        net=30,
        reference=5,
        trajectories=8,
        student=8,
        gan=8,
        sample=5,
        sample_teacher25=8,
        eval=5,
        probe=6,
    ),
    "default": dict(
        teacher=2800,
        net=600,
        reference=15,
        trajectories=340,
        student=1000,
        gan=300,
        sample=40,
        sample_teacher25=350,
        eval=40,
        probe=120,
    ),
}


def declare(runner, budget, estimates, args):
    """Every stage, declared on the runner; returns (the table's rows, {row name: its figures'
    path}, the real training images' figures' path)."""
    teacher, ref, net, traj = pipeline.prepare(runner, FASHION, budget, estimates)
    layers = FASHION.history_layers

    def declare_student(history_layers, seed, target="state", **kwargs):
        return pipeline.student_stage(
            runner,
            FASHION,
            budget,
            estimates,
            traj,
            teacher,
            history_layers,
            seed,
            target,
            **kwargs,
        )

    rows = []
    seeds = list(range(args.seeds))
    state_seeds = sorted(set(seeds) | set(HISTORY_SEEDS)) if args.history else seeds
    for target, target_seeds in (("state", state_seeds), ("x0", seeds)):
        for seed in target_seeds:
            for history_layers in (0, layers):
                if not (args.history and target == "state" and seed == 0):
                    rows.append(declare_student(history_layers, seed, target))
                    continue
                # The budget curve: the run trained on to long_steps, saved and validated at the
                # plain run's steps, is read at distil_steps (the plain row) and at its end.
                declare_student(
                    history_layers,
                    seed,
                    steps=budget["long_steps"],
                    every=max(1, budget["distil_steps"] // 4),
                )
                for variant, at_step in (
                    ("plain", budget["distil_steps"]),
                    ("long", budget["long_steps"]),
                ):
                    rows.append(student_row(runner, history_layers, seed, at_step, variant=variant))
    # The GAN stage, from step distillation and from ARD (state target, --seeds' students).
    plain_state = [row for row in rows if row.target == "state" and row.variant == "plain"]
    for student in [row for row in plain_state if row.seed in seeds]:
        rows.append(pipeline.gan_stage(runner, FASHION, budget, estimates, traj, teacher, student))
    if args.history:
        for noise in HISTORY_NOISES:
            for seed in HISTORY_SEEDS:
                for history_layers in (0, layers):
                    rows.append(declare_student(history_layers, seed, history_noise=noise))
    teacher_steps = [2, 4, 25] if args.quick else TEACHER_STEPS
    rows += [teacher_row(teacher, "ddim", steps) for steps in teacher_steps]
    # Other noises: the teacher-fidelity floor.
    rows.append(teacher_row(teacher, "ddim", 25, seed=1))
    figures_of = pipeline.evaluate(runner, FASHION, budget, rows, ref, net, estimates)
    real = pipeline.evaluate_real_train(runner, FASHION, ref, net, estimates)
    pipeline.history_probe(runner, FASHION, budget, estimates, rows, traj)
    return rows, figures_of, real


def figures(runner, rows, results):
    """The docs' figures, in RUN_DIR/figures/: a grid of samples (same noise and classes, one row
    per model), the held-out MSE during distillation, the GAN stage's logged figures, and FID
    against steps."""
    import matplotlib

    matplotlib.use("Agg")
    layers = FASHION.history_layers
    shown = [
        ("teacher_ddim25", "Teacher, DDIM 25 steps"),
        ("teacher_ddim4", "Teacher, DDIM 4 steps"),
        ("k4_n0_state_s0", "Step distillation, 4 steps"),
        (f"k4_n{layers}_state_s0", f"ARD (N={layers}), 4 steps"),
        ("k4_n0_x0_s0", "Step distillation, x0 target"),
        (f"k4_n{layers}_x0_s0", f"ARD (N={layers}), x0 target"),
        (f"gan_k4_n{layers}_state_s0", f"ARD (N={layers}) + GAN, 4 steps"),
    ]
    report.samples_figure(runner, pipeline.figure_path(runner, "fashion_samples.png"), shown)
    report.val_mse_figure(FASHION, runner, pipeline.figure_path(runner, "fashion_val_mse.png"))
    report.gan_figure(FASHION, runner, pipeline.figure_path(runner, "fashion_gan.png"))
    report.fid_steps_figure(
        FASHION, rows, results, pipeline.figure_path(runner, "fashion_fid_vs_steps.png")
    )


def main(args):
    runner = pipeline.make_runner(args, "fashion")
    budget = BUDGETS["quick" if args.quick else "default"]
    estimates = ESTIMATES["quick" if args.quick else "default"]
    if args.teacher_steps is not None:
        # Another teacher budget: its stages and everything after them change.
        estimates = dict(
            estimates, teacher=estimates["teacher"] * args.teacher_steps / budget["teacher_steps"]
        )
        budget = dict(budget, teacher_steps=args.teacher_steps)
    rows, figures_of, real = declare(runner, budget, estimates, args)
    pipeline.finish(
        runner,
        FASHION,
        budget,
        args,
        rows,
        figures_of,
        real,
        f"{args.seeds} seed(s)" + (", history" if args.history else ""),
        draw=lambda results: figures(runner, rows, results),
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seeds",
        type=positive_int,
        default=1,
        help="seeds of each student (one on 2 CPU cores; three on a GPU)",
    )
    parser.add_argument(
        "--history",
        action="store_true",
        help="also the state-target students of seeds "
        f"{', '.join(map(str, HISTORY_SEEDS))}, seed 0's trained on to long_steps (the budget "
        "curve), and N = 0 and ARD with noise of std "
        f"{{{', '.join(map(str, HISTORY_NOISES))}}} on their history inputs (the same seeds)",
    )
    parser.add_argument(
        "--teacher-steps",
        type=positive_int,
        default=None,
        help="the teacher's training steps (default: the budget's; a run folder holds one teacher)",
    )
    pipeline.add_arguments(parser, "fashion")
    return parser.parse_args(argv)


if __name__ == "__main__":
    cli.run(main, parse_args)
