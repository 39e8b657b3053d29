"""What a distillation step costs against a teacher training step of the same batch: FLOPs at
DiT-XL/2 shapes (meta device) and steps per second on this CPU for the digits config.

    python -m benchmarks.train_cost

The teacher step is DiT's: one forward and backward of B images at one random timestep each (plus
the VB term's cheap extras). The student step is ARD's teacher-forced pass over all K steps of B
trajectories, forward and backward, so it sees K times the tokens.
"""

import argparse
import time

import torch

from ard.cli import non_negative_int, positive_int
from ard.cost import count_flops
from ard_models import ARD_models
from diffusion import create_diffusion
from models import DiT_models


def teacher_step(model, diffusion, batch, opt=None):
    x, y = batch
    t = torch.randint(0, diffusion.num_timesteps, (len(x),), device=x.device)
    loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


def student_step(model, batch, opt=None):
    inputs, targets, y = batch
    loss = (model(inputs, y) - targets).square().mean()
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


def build(key, input_size, channels, classes, K, N, device):
    timesteps = torch.linspace(999, 999 / K, K).round().tolist()
    with torch.device(device):
        teacher = DiT_models[key](input_size=input_size, in_channels=channels, num_classes=classes)
        student = ARD_models[key](
            timesteps=timesteps,
            history_layers=N,
            input_size=input_size,
            in_channels=channels,
            num_classes=classes,
        )
    return teacher, student


def batches(B, K, C, S, classes, device):
    y = torch.randint(classes, (B,), device=device)
    return (torch.randn(B, C, S, S, device=device), y), (
        torch.randn(B, K, C, S, S, device=device),
        torch.randn(B, K, C, S, S, device=device),
        y,
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=positive_int, default=4, help="K, the student's steps")
    parser.add_argument(
        "--xl-history-layers",
        type=non_negative_int,
        default=6,
        help="N of the DiT-XL/2 student (FLOPs on meta)",
    )
    parser.add_argument(
        "--xl-batch", type=positive_int, default=1, help="batch of the DiT-XL/2 FLOP counts"
    )
    parser.add_argument(
        "--digits-history-layers",
        type=non_negative_int,
        default=3,
        help="N of the digits student (timed on the CPU)",
    )
    parser.add_argument(
        "--digits-batch", type=positive_int, default=64, help="batch of the digits timings"
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=30, help="timed steps of each model"
    )
    return parser.parse_args(argv)


def main(args):
    K, diffusion = args.steps, create_diffusion("")

    teacher, student = build("DiT-XL/2", 32, 4, 1000, K, args.xl_history_layers, "meta")
    t_batch, s_batch = batches(args.xl_batch, K, 4, 32, 1000, "meta")
    f_teacher = count_flops(lambda: teacher_step(teacher, diffusion, t_batch))
    f_student = count_flops(lambda: student_step(student, s_batch))
    print(f"== FLOPs per training step, DiT-XL/2 at 256x256, batch {args.xl_batch} (meta device)")
    print(f"teacher (DiT) step:           {f_teacher / 1e12:.3f} TFLOPs")
    print(
        f"ARD student step (K={K}, N={args.xl_history_layers}): {f_student / 1e12:.3f} TFLOPs   "
        f"ratio {f_student / f_teacher:.2f}"
    )

    torch.manual_seed(0)
    teacher, student = build("DiT-T/2", 8, 1, 10, K, args.digits_history_layers, "cpu")
    t_batch, s_batch = batches(args.digits_batch, K, 1, 8, 10, "cpu")
    t_opt, s_opt = (
        torch.optim.AdamW(teacher.parameters(), lr=1e-4),
        torch.optim.AdamW(student.parameters(), lr=1e-4),
    )
    rates = []
    for fn in (
        lambda: teacher_step(teacher, diffusion, t_batch, t_opt),
        lambda: student_step(student, s_batch, s_opt),
    ):
        for _ in range(3):
            fn()
        start = time.perf_counter()
        for _ in range(args.repeats):
            fn()
        rates.append(args.repeats / (time.perf_counter() - start))
    print(
        f"== CPU steps per second, DiT-T/2 on 8x8 digits, batch {args.digits_batch}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"teacher step: {rates[0]:.2f} steps/s   "
        f"ARD student step (K={K}, N={args.digits_history_layers}): {rates[1]:.2f} steps/s "
        f"(student / teacher time {rates[0] / rates[1]:.2f})"
    )


if __name__ == "__main__":
    main(parse_args())
