"""Where the CPU time of an embedded experiment goes: each stage's unit of work taken apart, on this
machine.

    python -m benchmarks.cpu_profile                  # the digits main job's DiT-T/4 on 8x8 digits
    python -m benchmarks.cpu_profile --model DiT-T/2  # the same budgets with another tiny config
    python -m benchmarks.cpu_profile --data fashion   # Fashion-MNIST's 28x28 (49 tokens, DiT-T/4)

For the teacher's and the students' training steps: data, forward, backward, optimiser and EMA, with
1 and with all threads (do two processes side by side beat one after another?), and bf16 autocast
against fp32; for the trajectory writer and the samplers: images per second with 1 and all threads;
the cost of starting a script (importing torch); a student's step with the history attention masked
against per step. Prints a table; every figure is the median of several timed repeats after a
warm-up.
"""

import argparse
import statistics
import subprocess
import sys
import time

import torch

from ard.cli import positive_int
from ard.generation import TeacherSampler
from ard.training import update_ema
from ard_models import HISTORY_ATTENTION, ARD_models
from diffusion import create_diffusion
from models import DiT_models

SIDES = {"digits": 8, "fashion": 28}
STUDENT_BATCH = {"digits": 64, "fashion": 32}


def timed(fn, repeats=15, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_parts(model, ema, loss_fn, bf16=False):
    """Seconds of forward, backward, AdamW step and EMA update of one training step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return loss_fn()

    def forward_backward():
        opt.zero_grad(set_to_none=True)
        forward().backward()

    forward_backward()
    parts = {"forward": timed(forward), "forward+backward": timed(forward_backward)}
    parts["backward"] = parts["forward+backward"] - parts["forward"]
    parts["AdamW"] = timed(opt.step)
    parts["EMA"] = timed(lambda: update_ema(ema, model, 0.99))
    return parts


def profile_training(model, threads, side, student_batch, bf16=False):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    teacher, teacher_ema = (
        DiT_models[model](input_size=side, in_channels=1, num_classes=10) for _ in range(2)
    )
    diffusion, x, y = (
        create_diffusion(""),
        torch.randn(128, 1, side, side),
        torch.randint(10, (128,)),
    )
    student, student_ema = (
        ARD_models[model](
            timesteps=[999, 749, 500, 250],
            history_layers=3,
            input_size=side,
            in_channels=1,
            num_classes=10,
        )
        for _ in range(2)
    )
    traj = torch.randn(student_batch, 4, 1, side, side)

    def teacher_loss():  # train.py's: a uniform timestep per image, DiT's hybrid loss
        t = torch.randint(0, diffusion.num_timesteps, (len(x),))
        return diffusion.training_losses(teacher, x, t, dict(y=y))["loss"].mean()

    return {
        "teacher step (batch 128)": training_parts(teacher, teacher_ema, teacher_loss, bf16),
        f"student step (batch {student_batch}, K=4, N=3)": training_parts(
            student,
            student_ema,
            lambda: (student(traj, y[:student_batch]).float() - traj).square().mean(),
            bf16,
        ),
    }


@torch.no_grad()
def profile_sampling(model, threads, side):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    teacher = DiT_models[model](input_size=side, in_channels=1, num_classes=10).eval()
    student = ARD_models[model](
        timesteps=[999, 749, 500, 250],
        history_layers=3,
        input_size=side,
        in_channels=1,
        num_classes=10,
    ).eval()
    noise, y = torch.randn(500, 1, side, side), torch.arange(500) % 10
    sampler = TeacherSampler(teacher, dict(space="pixel"), "ddim", 25, 1.5)
    return {
        "teacher DDIM 25 + CFG, 500 trajectories": timed(
            lambda: sampler.trajectory(noise, y), repeats=3, warmup=1
        ),
        "student 4 steps, 500 samples": timed(
            lambda: student.sample(noise, y), repeats=5, warmup=1
        ),
    }


def history_attention_ab(model, side, batch, rounds=12):
    """CPU seconds of a student's forward and backward (K=4, N=3, one thread) with each way of
    computing the history attention (ard_models.HISTORY_ATTENTION), interleaved round by round so
    that the machine's drift hits both; the median of the rounds after the first two."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    student = ARD_models[model](
        timesteps=[999, 749, 500, 250],
        history_layers=3,
        input_size=side,
        in_channels=1,
        num_classes=10,
    )
    traj, y = torch.randn(batch, 4, 1, side, side), torch.randint(10, (batch,))
    times = {mode: [] for mode in HISTORY_ATTENTION}
    for r in range(rounds):
        for mode in HISTORY_ATTENTION if r % 2 == 0 else HISTORY_ATTENTION[::-1]:
            student.history_attention = mode
            start = time.process_time()
            student(traj, y).square().mean().backward()
            times[mode].append(time.process_time() - start)
    return {mode: statistics.median(t[2:]) for mode, t in times.items()}


def startup():
    """Seconds to start a script that imports torch and this repository's training modules."""
    cmd = [sys.executable, "-c", "import torch, ard.training, ard.trajectory_store, ard_models"]
    return timed(lambda: subprocess.run(cmd, check=True), repeats=3, warmup=1)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        choices=[k for k in DiT_models if k.startswith("DiT-T/")],
        default="DiT-T/4",
        help="the tiny config to profile (both experiments use DiT-T/4)",
    )
    parser.add_argument(
        "--data",
        choices=list(SIDES),
        default="digits",
        help="the embedded dataset whose image size to use",
    )
    parser.add_argument(
        "--student-batch",
        type=positive_int,
        default=None,
        help="the students' batch (default: each experiment's own, digits 64, fashion 32)",
    )
    return parser.parse_args(argv)


def main(args):
    cores, side = torch.get_num_threads(), SIDES[args.data]
    batch = args.student_batch or STUDENT_BATCH[args.data]
    print(
        f"== CPU: {cores} threads available, {args.model} on {side}x{side} {args.data}; "
        "milliseconds, median of repeats"
    )
    rows = {}
    for threads in sorted({1, cores}):
        for name, parts in profile_training(args.model, threads, side, batch).items():
            rows[f"{name}, {threads} thread(s)"] = parts
    for name, parts in profile_training(args.model, cores, side, batch, bf16=True).items():
        rows[f"{name}, {cores} thread(s), bf16 autocast"] = parts
    print("| step | forward | backward | AdamW | EMA |\n|---|---|---|---|---|")
    for name, p in rows.items():
        print(
            f"| {name} | {1000 * p['forward']:.1f} | {1000 * p['backward']:.1f} | "
            f"{1000 * p['AdamW']:.1f} | {1000 * p['EMA']:.1f} |"
        )
    print(
        "\n| sampling | "
        + " | ".join(f"{t} thread(s)" for t in sorted({1, cores}))
        + " |\n|---|"
        + "---|" * len({1, cores})
    )
    sampling = {t: profile_sampling(args.model, t, side) for t in sorted({1, cores})}
    for name in sampling[1]:
        print(
            f"| {name} | "
            + " | ".join(f"{1000 * sampling[t][name]:.0f}" for t in sorted(sampling))
            + " |"
        )
    ab = history_attention_ab(args.model, side, batch)
    print(
        f"\nhistory attention, student forward + backward (batch {batch}, K=4, N=3, 1 thread, CPU "
        "ms, median of 10 "
        "interleaved rounds): " + ", ".join(f"{mode} {1000 * t:.1f}" for mode, t in ab.items())
    )
    print(f"\nstarting a script (python, torch and this repository's modules): {startup():.2f} s")


if __name__ == "__main__":
    main(parse_args())
