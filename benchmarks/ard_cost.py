"""What history costs: FLOPs and CPU wall time of the ARD student against step distillation
(N = 0), and of its teacher-forced training step against a dense implementation that masks all
K x L tokens in every layer.

    python -m benchmarks.ard_cost  # DiT-XL/2 FLOPs (N=6), DiT-S/2 CPU wall time (N=3), 256x256, K=4
    python -m benchmarks.ard_cost --flops-model DiT-B/2 --time-model DiT-B/2 --history-layers 3

FLOPs are counted with torch.utils.flop_counter.FlopCounterMode on the meta device (nothing is
allocated); a multiply-add counts as 2 FLOPs. Wall times are medians over repeats, the two variants
interleaved, on this machine's CPU.
"""

import argparse

import torch

from ard.cli import non_negative_int, positive_int
from ard.cost import count_flops, median_times
from ard.vae import VAE_DOWNSAMPLE
from ard_models import ARD_models, dense_forward


def build(key, image_size, K, N, device):
    input_size = image_size // VAE_DOWNSAMPLE  # DiT's SD-VAE latents: 4 x (image_size / 8)^2
    timesteps = torch.linspace(999, 999 / K, K).round().tolist()
    with torch.device(device):
        return ARD_models[key](
            timesteps=timesteps,
            history_layers=N,
            input_size=input_size,
            in_channels=4,
            num_classes=1000,
        )


def inputs(model, batch, device):
    size = (batch, model.num_steps, model.in_channels, model.input_size, model.input_size)
    return torch.randn(size, device=device), torch.zeros(batch, dtype=torch.long, device=device)


def train_step(forward, model, x, y):
    loss = (forward(model, x, y) - x).square().mean()
    loss.backward()


def flops_report(args):
    K, N = args.steps, args.history_layers
    sd, ard = (
        build(args.flops_model, args.image_size, K, 0, "meta"),
        build(args.flops_model, args.image_size, K, N, "meta"),
    )
    x, y = inputs(ard, args.flops_batch, "meta")
    f_sd = count_flops(lambda: sd.sample(x[:, 0], y))
    f_ard = count_flops(lambda: ard.sample(x[:, 0], y))
    t_ours = count_flops(lambda: train_step(lambda m, a, b: m(a, b), ard, x, y))
    t_dense = count_flops(lambda: train_step(dense_forward, ard, x, y))
    t_public = count_flops(
        lambda: train_step(
            lambda m, a, b: dense_forward(m, a, b, per_token_conditioning=True), ard, x, y
        )
    )
    s_public = count_flops(lambda: dense_forward(ard, x, y, per_token_conditioning=True))
    print(
        f"== FLOPs, {args.flops_model} at {args.image_size}x{args.image_size}, K={K}, batch "
        f"{args.flops_batch} (meta device)"
    )
    print(f"sample, step distillation (N=0):        {f_sd / 1e12:8.3f} TFLOPs")
    print(
        f"sample, ARD (N={N}):                     {f_ard / 1e12:8.3f} TFLOPs   "
        f"ratio {f_ard / f_sd:.4f}"
    )
    print(f"train step (fwd+bwd), ARD:              {t_ours / 1e12:8.3f} TFLOPs")
    print(
        f"train step, dense masked K*L all layers: {t_dense / 1e12:8.3f} TFLOPs   "
        f"ours/dense {t_ours / t_dense:.3f}"
    )
    print(
        f"train step, dense + per-token adaLN:     {t_public / 1e12:8.3f} TFLOPs   "
        f"ours/that {t_ours / t_public:.3f}"
    )
    print(
        f"K steps recomputed densely, per-token adaLN (no KV cache): {s_public / 1e12:.3f} TFLOPs "
        f"(ARD sample / that {f_ard / s_public:.3f})"
    )


def time_report(args):
    K, N = args.steps, args.time_history_layers
    sd_meta, ard_meta = (build(args.time_model, args.image_size, K, n, "meta") for n in (0, N))
    x, y = inputs(ard_meta, args.time_batch, "meta")
    flop_ratio = count_flops(lambda: ard_meta.sample(x[:, 0], y)) / count_flops(
        lambda: sd_meta.sample(x[:, 0], y)
    )
    torch.manual_seed(0)
    sd, ard = (
        build(args.time_model, args.image_size, K, 0, "cpu"),
        build(args.time_model, args.image_size, K, N, "cpu"),
    )
    ard.load_state_dict(sd.state_dict())
    x, y = inputs(ard, args.time_batch, "cpu")
    with torch.no_grad():
        t_sd, t_ard = median_times(
            [lambda: sd.sample(x[:, 0], y), lambda: ard.sample(x[:, 0], y)], args.repeats
        )
    print(
        f"== CPU wall time, {args.time_model} at {args.image_size}x{args.image_size}, K={K}, batch "
        f"{args.time_batch}, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(
        f"sample, N=0: {1000 * t_sd:.1f} ms   N={N}: {1000 * t_ard:.1f} ms   "
        f"ratio {t_ard / t_sd:.4f} (FLOPs ratio of this config {flop_ratio:.4f})"
    )
    x_train, _ = inputs(ard, args.train_batch, "cpu")
    y_train = y[:1].expand(args.train_batch)
    ard.train()
    t_ours, t_dense = median_times(
        [
            lambda: train_step(lambda m, a, b: m(a, b), ard, x_train, y_train),
            lambda: train_step(dense_forward, ard, x_train, y_train),
        ],
        max(3, args.repeats // 2),
    )
    print(
        f"train step (fwd+bwd), batch {args.train_batch}: ARD {1000 * t_ours:.0f} ms   "
        f"dense masked {1000 * t_dense:.0f} ms   ratio {t_ours / t_dense:.3f}"
    )


def main(args):
    flops_report(args)
    if not args.skip_timing:
        time_report(args)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--flops-model",
        default="DiT-XL/2",
        choices=list(ARD_models),
        help="config whose FLOPs are counted (on meta)",
    )
    parser.add_argument(
        "--time-model",
        default="DiT-S/2",
        choices=list(ARD_models),
        help="config whose CPU wall time is measured",
    )
    parser.add_argument(
        "--image-size",
        type=positive_int,
        default=256,
        help="image side in pixels (latents are 8x smaller)",
    )
    parser.add_argument("--steps", type=positive_int, default=4, help="K, the student's steps")
    parser.add_argument(
        "--history-layers",
        type=non_negative_int,
        default=6,
        help="N, the blocks that see the history",
    )
    parser.add_argument(
        "--time-history-layers",
        type=non_negative_int,
        default=3,
        help="N for the wall-time runs: 3 of 12 blocks is the paper's share "
        "(6 of 28) at DiT-S/B depth",
    )
    parser.add_argument(
        "--flops-batch", type=positive_int, default=1, help="batch of the FLOP counts"
    )
    parser.add_argument(
        "--time-batch", type=positive_int, default=8, help="batch of the sampling timings"
    )
    parser.add_argument(
        "--train-batch", type=positive_int, default=4, help="batch of the training-step timings"
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=10,
        help="timed repeats of each variant (median reported)",
    )
    parser.add_argument(
        "--skip-timing", action=argparse.BooleanOptionalAction, default=False, help="FLOPs only"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
