"""The ImageNet commands of the README and docs/imagenet.md give the paper's recipe (the settings
table of docs/imagenet.md): each is parsed by its script's own parser and its resolved settings,
boundaries included (resolved from the store its writer command makes), are checked, so that a
changed default or a drifting command fails."""

import os
from types import SimpleNamespace

import pytest
from helpers import ROOT

import sample_ddp
import train_ard
import train_teacher_traj
from ard.checkpoints import peek_config
from ard.generation import teacher_flow, teacher_process
from ard.trajectory_store import resolve_boundaries
from benchmarks.imagenet_rehearsal import bash_commands
from diffusion.ode import solver_grid

SCRIPTS = {
    "train_teacher_traj.py": train_teacher_traj,
    "train_ard.py": train_ard,
    "sample_ddp.py": sample_ddp,
}
TEACHERS = ("DiT-XL-2-256x256.pt", "SiT-XL-2-256x256.pt", "REPA-SiT-XL-2-256x256.pt")

# The last column of the table in docs/imagenet.md.
WRITER = dict(num_trajectories=1_200_000, dtype="float16", precision="bf16", legacy_cfg=False)
SOLVER = {  # per teacher: solver, solver steps, CFG, guidance interval, and the saved steps
    "DiT-XL-2-256x256.pt": ("ddim", 25, 1.5, None, [0, 6, 12, 18, 25]),
    "SiT-XL-2-256x256.pt": ("heun", 13, 1.5, None, [0, 3, 6, 9, 13]),
    "REPA-SiT-XL-2-256x256.pt": ("heun", 13, 1.8, [0.0, 0.7], [0, 3, 6, 9, 13]),
}
STUDENT = dict(
    history_layers=6,
    target="state",
    student_steps=4,
    boundary_schedule="t",
    lr=1e-4,
    lr_schedule="constant",
    warmup_steps=0,
    weight_decay=0.0,
    ema_decay=0.9999,
    grad_clip=1.0,
    precision="bf16",
)
REGRESSION = dict(STUDENT, gan=False, global_batch_size=64, max_steps=300_000)
GAN = dict(
    STUDENT,
    gan=True,
    global_batch_size=48,
    gan_scale=10.0,
    gan_max_weight=10_000.0,
    gan_weight=None,
    gan_warmup=3000,
    disc_lr=1e-3,
    gan_max_t=300,
    gan_blocks=None,
    image_size=256,
)


def shown_commands():
    """(script, argv) of every command in a bash block of the README and docs/imagenet.md that runs
    one of SCRIPTS on an official XL/2 teacher or its students."""
    found = []
    for page in ("README.md", os.path.join("docs", "imagenet.md")):
        for words in bash_commands(open(os.path.join(ROOT, page)).read()):
            script = next((w for w in words if w in SCRIPTS), None)
            if script is not None:
                found.append((page, script, words[words.index(script) + 1 :]))
    return found


COMMANDS = shown_commands()


def commands(script):
    return [(page, SCRIPTS[script].parse_args(argv)) for page, s, argv in COMMANDS if s == script]


def assert_settings(args, expected, where):
    got = {k: getattr(args, k) for k in expected}
    assert got == expected, f"{where}: {got} != {expected}"


def test_every_imagenet_stage_is_shown_for_every_teacher():
    writers = {args.ckpt for _, args in commands("train_teacher_traj.py")}
    students = {(args.teacher_ckpt, args.gan) for _, args in commands("train_ard.py")}
    assert writers == set(TEACHERS)
    assert students == {(t, gan) for t in TEACHERS for gan in (False, True)}


def test_trajectory_commands_write_what_the_recipe_says():
    for page, args in commands("train_teacher_traj.py"):
        solver, steps, cfg, interval, saved = SOLVER[args.ckpt]
        assert_settings(args, WRITER, f"{page}: {args.ckpt}")
        got = (args.solver, args.num_sampling_steps, args.cfg_scale, args.guidance_interval)
        assert got == (solver, steps, cfg, interval), f"{page}: {args.ckpt}: {got}"
        assert saved_steps(args) == saved, f"{page}: {args.ckpt}"


def saved_steps(writer):
    """The solver steps the store of a writer command holds, as train_teacher_traj.py resolves
    them."""
    config = peek_config(writer.ckpt)  # an official name not downloaded: its known config
    process = teacher_process(config, writer.num_sampling_steps)
    flow = teacher_flow(config, writer.num_sampling_steps)
    return train_teacher_traj.parse_save_steps(
        writer.save_steps, writer.num_sampling_steps, False, grid=solver_grid(process), flow=flow
    )


@pytest.mark.parametrize("gan", [False, True])
def test_student_commands_train_the_recipe_between_the_boundaries_their_store_saved(gan):
    # Each page's commands stand on their own: a student reads the store its page's writer makes.
    writers = {(page, args.out): args for page, args in commands("train_teacher_traj.py")}
    regressions = {
        (page, args.run_dir): args for page, args in commands("train_ard.py") if not args.gan
    }
    for page, args in commands("train_ard.py"):
        if args.gan != gan:
            continue
        assert_settings(args, GAN if gan else REGRESSION, f"{page}: {args.run_dir}")
        writer = writers[page, args.traj]
        assert args.teacher_ckpt == writer.ckpt, f"{page}: {args.run_dir}"
        # The boundaries train_ard.py resolves on that store: the schedule's exact steps.
        config = peek_config(writer.ckpt)
        process = teacher_process(config, writer.num_sampling_steps)
        grid, steps = solver_grid(process), saved_steps(writer)
        store = SimpleNamespace(
            path=writer.out, saved_steps=steps, saved_timesteps=[grid[s] for s in steps]
        )
        flow = teacher_flow(config, writer.num_sampling_steps)
        boundaries = resolve_boundaries(
            store, grid, args.student_steps, args.boundary_schedule, flow
        )
        assert args.boundaries is None and boundaries == SOLVER[writer.ckpt][4], (
            f"{page}: {args.run_dir}"
        )
        if gan:  # the GAN stage starts from its regression stage's last checkpoint
            regression = regressions[page, os.path.dirname(os.path.dirname(args.init_ckpt))]
            step = int(os.path.basename(args.init_ckpt).split(".")[0])
            assert step == regression.max_steps and regression.traj == args.traj, f"{page}"


def test_sampling_commands_sample_a_student_or_a_teacher_of_the_table():
    for page, args in commands("sample_ddp.py"):
        assert args.num_samples == 50_000, page
        if args.ckpt in SOLVER:  # a teacher itself: with its own solver and guidance
            solver, steps, cfg, interval, _ = SOLVER[args.ckpt]
            got = (args.sampler, args.num_sampling_steps, args.cfg_scale, args.guidance_interval)
            assert got == (solver, steps, cfg, interval), page
