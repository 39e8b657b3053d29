"""Distils a K-step ARD student from a trajectory store (regression stage), or fine-tunes one with the GAN
stage (--gan).

    python train_ard.py --traj runs/digits/traj --teacher-ckpt runs/digits/teacher/checkpoints/0002000.pt \
        --history-layers 3 --max-steps 1200                      # ARD on the digits (N = 3 of 6 blocks)
    python train_ard.py ... --history-layers 0                    # step distillation, the baseline
    torchrun --nproc_per_node=8 train_ard.py --traj /data/ard/traj --teacher-ckpt DiT-XL-2-256x256.pt \
        --history-layers 6 --global-batch-size 64 --max-steps 300000 --precision bf16
    python train_ard.py --gan --init-ckpt RUN/checkpoints/0001200.pt --traj ... --teacher-ckpt ... --max-steps 600

The student is built from the teacher (model key and shapes from the teacher's checkpoint), with one input
per boundary but the last; see trajectory_store.py for solver steps and targets. The loss is the mean over
the K steps of each step's MSE against its target. As in train.py, all randomness of a step is seeded by
(seed, step, rank) and the data order is a function of the step, so --resume continues exactly.
"""

import argparse
import json
import math
import os
import time
from copy import deepcopy

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.utils import save_image
from tqdm.auto import tqdm

import dist_util
from ard_models import ARD_models
from checkpoints import find_checkpoint, load_checkpoint, load_dit, save_checkpoint
from diffusion import create_diffusion
from discriminator import FeatureDiscriminator, adaptive_weight, generator_loss, hinge_d_loss
from image_data import image_folder, load_digits, load_vae, vae_decode, vae_encode
from train_utils import (StepBatchSampler, check_resume, create_logger, new_run_dir, optimizer_to, requires_grad,
                         update_ema, write_json)
from trajectory_store import TARGETS, TrajectoryDataset, TrajectoryStore, collate_batch, default_boundaries

# Arguments that fix what is trained; a resumed run must agree with its checkpoint on them.
RUN_DEFINING_ARGS = ("traj", "history_layers", "target", "boundaries", "num_steps", "global_batch_size",
                     "global_seed", "lr", "ema_decay", "grad_clip", "val_count", "gan", "init_ckpt", "gan_blocks",
                     "gan_scale", "gan_warmup", "gan_max_t", "disc_lr", "data", "image_size")


class NonFiniteLoss(RuntimeError):
    pass


def rank_indices(store, indices, rank, world_size):
    """The training indices this rank reads: whole shards round-robin when there are enough shards
    (each rank then touches only its own files), otherwise every world_size-th index."""
    allowed = set(indices)
    if len(store.shards) >= world_size:
        mine = [i for s in range(rank, len(store.shards), world_size) for i in store.shard_indices(s) if i in allowed]
    else:
        mine = [i for n, i in enumerate(sorted(allowed)) if n % world_size == rank]
    if not mine:
        raise ValueError(f"rank {rank} has no training trajectories: use fewer processes or a larger store")
    return mine


def build_student(args, teacher_config, teacher_state, timesteps):
    model = ARD_models[teacher_config["model"]](
        timesteps=timesteps, history_layers=args.history_layers, input_size=teacher_config["input_size"],
        in_channels=teacher_config["in_channels"], num_classes=teacher_config["num_classes"],
    )
    return model.load_teacher(teacher_state)


def real_data(args, teacher_config):
    """The GAN stage's real images: the dataset, and whether to VAE-encode them."""
    if args.data == "digits":
        x, y = load_digits("train", teacher_config["input_size"])
        return torch.utils.data.TensorDataset(x, y)
    return image_folder(args.data, args.image_size or teacher_config.get("image_size"))


@torch.no_grad()
def validate(model, store_dataset, indices, device, batch_size=500):
    """Final-step MSE against the teacher's sample on held-out trajectories: teacher-forced (TF) and
    autoregressive (AR, the way the student samples); also the TF MSE of every step."""
    model.eval()
    tf_steps, ar_final, n = None, 0.0, 0
    for b in range(0, len(indices), batch_size):
        inputs, targets, y = store_dataset.__getitems__(list(indices[b : b + batch_size]))
        inputs, targets, y = inputs.to(device), targets.to(device), y.to(device)
        per_step = (model(inputs, y) - targets).square().mean(dim=(2, 3, 4)).sum(0)  # (K,)
        tf_steps = per_step if tf_steps is None else tf_steps + per_step
        ar_final += (model.sample(inputs[:, 0], y)[:, -1] - targets[:, -1]).square().mean(dim=(1, 2, 3)).sum().item()
        n += len(y)
    return {"val_tf_final_mse": tf_steps[-1].item() / n, "val_ar_final_mse": ar_final / n,
            "val_tf_step_mse": (tf_steps / n).tolist()}


def main(args):
    # Setup DDP:
    device = dist_util.setup()
    rank, world_size = dist_util.rank(), dist_util.world_size()
    if args.global_batch_size % world_size:
        raise ValueError(f"--global-batch-size {args.global_batch_size} must be divisible by the world size {world_size}")
    local_batch = args.global_batch_size // world_size
    torch.backends.cuda.matmul.allow_tf32 = args.precision != "fp32"
    torch.backends.cudnn.allow_tf32 = args.precision != "fp32"

    # Check the inputs before any expensive work: store, teacher, boundaries, resume, GAN start point.
    store = TrajectoryStore(args.traj)
    teacher_path = find_checkpoint(args.teacher_ckpt)
    teacher, teacher_config = load_dit(teacher_path, device)
    requires_grad(teacher, False)
    store.check_model(shape=(teacher_config["in_channels"], teacher_config["input_size"], teacher_config["input_size"]),
                      num_classes=teacher_config["num_classes"], model=teacher_config["model"])
    if args.history_layers > len(teacher.blocks):
        raise ValueError(f"--history-layers {args.history_layers} exceeds the teacher's {len(teacher.blocks)} blocks")
    boundaries = args.boundaries or default_boundaries(store.saved_steps, store.saved_timesteps, args.num_steps)
    if args.val_count >= len(store):
        raise ValueError(f"--val-count {args.val_count} leaves no training trajectories in a store of {len(store)}")
    train_indices = list(range(len(store) - args.val_count))
    val_indices = list(range(len(store) - args.val_count, len(store)))
    dataset = TrajectoryDataset(store, boundaries, args.target)  # checks the boundaries against the store
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        check_resume(args, ckpt, RUN_DEFINING_ARGS)
    init = None
    if args.gan and not args.init_ckpt:
        raise ValueError("--gan starts from a regression checkpoint: pass --init-ckpt")
    if args.init_ckpt:
        init = load_checkpoint(args.init_ckpt)
        if init.get("config", {}).get("kind") != "ard":
            raise ValueError(f"--init-ckpt {args.init_ckpt} is not a checkpoint of train_ard.py")
        if init["config"]["boundaries"] != boundaries or init["config"]["history_layers"] != args.history_layers:
            raise ValueError(f"--init-ckpt {args.init_ckpt} has boundaries {init['config']['boundaries']} and "
                             f"N={init['config']['history_layers']}; pass the same --boundaries and --history-layers")

    # Run folder and logging:
    if ckpt is not None:
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(args.resume)))
    else:
        run_dir = args.run_dir or new_run_dir(args.results_dir, f"ARD-{teacher_config['model'].replace('/', '-')}-N{args.history_layers}")
    checkpoint_dir, sample_dir = os.path.join(run_dir, "checkpoints"), os.path.join(run_dir, "samples")
    if dist_util.is_main():
        os.makedirs(checkpoint_dir, exist_ok=True)
        os.makedirs(sample_dir, exist_ok=True)
        write_json(os.path.join(run_dir, "args.json" if ckpt is None else f"args-resume-{ckpt['step']}.json"), vars(args))
    dist_util.barrier()
    logger = create_logger(run_dir)
    logger.info(f"Run folder {run_dir}, world size {world_size}, device {device}")
    logger.info(f"Store {args.traj}: {len(store):,} trajectories ({len(val_indices)} held out), boundaries {boundaries} "
                f"(solver steps), input timesteps {dataset.timesteps}, target {args.target}")

    # Create the student (from the teacher, or from the regression checkpoint for the GAN stage):
    torch.manual_seed(args.global_seed)
    model = build_student(args, teacher_config, teacher.state_dict(), dataset.timesteps)
    if init is not None:
        model.load_state_dict(init["ema"])
    ema = deepcopy(model)
    requires_grad(ema, False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    disc, disc_opt, diffusion, real_loader, vae = None, None, None, None, None
    if args.gan:
        diffusion = create_diffusion("")
        blocks = args.gan_blocks if args.gan_blocks is not None else list(range(len(teacher.blocks)))
        disc = FeatureDiscriminator(teacher, diffusion, blocks, teacher_config["num_classes"]).to(device)
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=args.disc_lr, weight_decay=0)
    if teacher_config["space"] == "latent" and (args.gan or args.sample_every):
        vae = load_vae(teacher_config["vae"], device)  # real latents for the GAN, decoded sample grids
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        if args.gan:
            disc.load_state_dict(ckpt["disc"])
            disc_opt.load_state_dict(ckpt["disc_opt"])
    model, ema = model.to(device), ema.to(device).eval()
    for optimiser in [opt] + ([disc_opt] if disc_opt else []):
        optimizer_to(optimiser, device)
    raw_model = model
    if world_size > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        if disc is not None:
            disc = DDP(disc, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    raw_disc = disc.module if isinstance(disc, DDP) else disc
    logger.info(f"Student {teacher_config['model']}, K={raw_model.num_steps}, N={args.history_layers}: "
                f"{sum(p.numel() for p in raw_model.parameters()):,} parameters")
    config = dict(kind="ard", model=teacher_config["model"], input_size=teacher_config["input_size"],
                  in_channels=teacher_config["in_channels"], num_classes=teacher_config["num_classes"],
                  timesteps=dataset.timesteps, history_layers=args.history_layers, boundaries=boundaries,
                  target=args.target, space=teacher_config["space"], vae=teacher_config.get("vae"),
                  image_size=teacher_config.get("image_size"), data=teacher_config.get("data"),
                  teacher_sha256=store.manifest["teacher_sha256"], gan=args.gan)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    # Setup data (positions are functions of the step):
    start_step = ckpt["step"] if ckpt is not None else 0
    local_indices = rank_indices(store, train_indices, rank, world_size)
    sampler = StepBatchSampler(len(local_indices), local_batch, args.global_seed * 1009 + rank, 0, 1, start_step, args.max_steps)
    local_dataset = TrajectoryDataset(store, boundaries, args.target, indices=local_indices)
    loader = torch.utils.data.DataLoader(local_dataset, batch_sampler=sampler, collate_fn=collate_batch, num_workers=0)
    if args.gan:
        real = real_data(args, teacher_config)
        real_sampler = StepBatchSampler(len(real), args.global_batch_size, args.global_seed, rank, world_size,
                                        start_step, args.max_steps)
        real_loader = iter(torch.utils.data.DataLoader(real, batch_sampler=real_sampler, num_workers=0 if args.data == "digits" else args.num_workers))
    fixed_noise = torch.randn(min(teacher_config["num_classes"], 10) * 4, teacher_config["in_channels"],
                              teacher_config["input_size"], teacher_config["input_size"],
                              generator=torch.Generator().manual_seed(args.global_seed)).to(device)
    fixed_y = (torch.arange(len(fixed_noise)) % min(teacher_config["num_classes"], 10)).to(device)

    def save(step):
        if dist_util.is_main():
            path = os.path.join(checkpoint_dir, f"{step:07d}.pt")
            state = {"model": raw_model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                     "args": vars(args), "config": config,
                     "data": {"local_epoch": step // sampler.steps_per_epoch},
                     "rng": {"scheme": "seeded per (global_seed, step, rank)", "global_seed": args.global_seed}}
            if args.gan:
                state.update(disc=raw_disc.state_dict(), disc_opt=disc_opt.state_dict(), disc_blocks=raw_disc.blocks)
            save_checkpoint(path, state)
            logger.info(f"Saved checkpoint to {path}")
        dist_util.barrier()

    @torch.no_grad()
    def sample_grid(step):
        if dist_util.is_main():
            samples = ema.sample(fixed_noise, fixed_y)[:, -1]
            if vae is not None:
                samples = vae_decode(vae, samples)
            if samples.shape[-1] < 64:
                samples = torch.nn.functional.interpolate(samples, scale_factor=64 // samples.shape[-1], mode="nearest")
            save_image(samples, os.path.join(sample_dir, f"{step:07d}.png"), nrow=min(teacher_config["num_classes"], 10),
                       normalize=True, value_range=(-1, 1), pad_value=1.0)

    # Training loop:
    model.train()
    if ckpt is None:
        update_ema(ema, raw_model, decay=0)
    logger.info(f"Training from step {start_step} to {args.max_steps}, global batch {args.global_batch_size}"
                + (f", GAN on teacher blocks {raw_disc.blocks}" if args.gan else ""))
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    sums, log_steps, start_time = None, 0, time.time()
    progress = tqdm(total=args.max_steps, initial=start_step, disable=not dist_util.is_main(), desc="distil", dynamic_ncols=True)
    for step, (inputs, targets, y) in enumerate(loader, start=start_step):
        torch.manual_seed(dist_util.step_seed(args.global_seed, step, rank))
        inputs, targets, y = inputs.to(device), targets.to(device), y.to(device)
        with autocast:
            pred = model(inputs, y)
            per_step = (pred.float() - targets).square().mean(dim=(0, 2, 3, 4))  # (K,)
            loss_reg = per_step.mean()
        figures = [loss_reg.item(), *per_step.tolist()]
        loss = loss_reg
        if args.gan:
            x_real, y_real = next(real_loader)
            x_real, y_real = x_real.to(device), y_real.to(device)
            if vae is not None:
                x_real = vae_encode(vae, x_real)
            fake = pred[:, -1]
            # Discriminator step on detached samples, each diffused to a random t (one forward for both halves):
            t = torch.randint(0, args.gan_max_t, (len(x_real) + len(fake),), device=device)
            both = torch.cat([x_real, fake.detach()])
            with autocast:
                logits = disc(both, torch.cat([y_real, y]), t, torch.randn_like(both))
                d_loss = hinge_d_loss(logits[: len(x_real)], logits[len(x_real) :])
            t = t[len(x_real) :]
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()
            # Generator: regression plus the adaptively weighted adversarial loss after the warm-up.
            weight = torch.zeros((), device=device)
            if step >= args.gan_warmup:
                requires_grad(raw_disc, False)  # the generator's loss flows through the heads, not into them
                with autocast:
                    g_loss = generator_loss(raw_disc(fake, y, t, torch.randn_like(fake)))
                weight = adaptive_weight(loss_reg, g_loss, raw_model.heads[-1].linear.weight, args.gan_scale)
                weight = torch.tensor(dist_util.all_reduce_mean(weight.item(), device), device=device)
                loss = loss_reg + weight * g_loss
                requires_grad(raw_disc, True)
            figures += [d_loss.item(), weight.item()]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        finite = dist_util.all_reduce_mean(float(math.isfinite(loss.item()) and math.isfinite(grad_norm.item())), device)
        if finite < 1.0:
            last = max([int(f[:-3]) for f in os.listdir(checkpoint_dir) if f.endswith(".pt")], default=None)
            raise NonFiniteLoss(f"the loss or gradient became infinite or NaN at step {step + 1}; stopping. "
                                f"The last good checkpoint is {'step ' + str(last) if last is not None else 'none'} in {checkpoint_dir}")
        opt.step()
        update_ema(ema, raw_model, args.ema_decay)

        figures = torch.tensor(figures, dtype=torch.float64)
        sums = figures if sums is None else sums + figures
        log_steps += 1
        progress.update(1)
        done = step + 1
        if done % args.log_every == 0 or done == args.max_steps:
            avg = dist_util.all_reduce_mean((sums / log_steps).tolist(), device)
            K = raw_model.num_steps
            record = {"step": done, "loss": avg[0], "step_mse": avg[1 : 1 + K],
                      "steps_per_sec": log_steps / (time.time() - start_time)}
            if args.gan:
                record.update(d_loss=avg[1 + K], gan_weight=avg[2 + K])
            if args.val_count and (done % args.val_every == 0 or done == args.max_steps):
                record.update(validate(ema, dataset, val_indices, device))
                model.train()
            logger.info(f"(step={done:07d}) loss {record['loss']:.5f}, last step {record['step_mse'][-1]:.5f}, "
                        + (f"val AR final {record['val_ar_final_mse']:.5f}, " if "val_ar_final_mse" in record else "")
                        + (f"D {record['d_loss']:.3f}, lambda {record['gan_weight']:.3g}, " if args.gan else "")
                        + f"{record['steps_per_sec']:.2f} steps/s")
            if dist_util.is_main():
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            progress.set_postfix(loss=f"{record['loss']:.4f}")
            sums, log_steps, start_time = None, 0, time.time()
        if args.sample_every and (done % args.sample_every == 0 or done == args.max_steps):
            sample_grid(done)
        if done % args.ckpt_every == 0 or done == args.max_steps:
            save(done)
    progress.close()
    logger.info("Done!")
    dist_util.cleanup()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traj", type=str, required=True, help="trajectory store written by train_teacher_traj.py")
    parser.add_argument("--teacher-ckpt", type=str, required=True, help="the teacher that wrote the store")
    parser.add_argument("--history-layers", "--stack", dest="history_layers", type=int, default=6,
                        help="N, the lowest blocks that see the history (0 = step distillation)")
    parser.add_argument("--target", type=str, choices=list(TARGETS), default="state",
                        help="history and targets: ODE states x_t, or the teacher's x0 predictions")
    parser.add_argument("--num-steps", type=int, default=4, help="K, the student's steps (with default boundaries)")
    parser.add_argument("--boundaries", type=int, nargs="+", default=None,
                        help="K + 1 solver steps, from 0 (noise) to S (sample), e.g. 0 10 15 20 25; default: evenly spaced in t")
    parser.add_argument("--global-batch-size", type=int, default=64)
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--ema-decay", type=float, default=0.9999)
    parser.add_argument("--max-steps", type=int, default=300_000)
    parser.add_argument("--val-count", type=int, default=0, help="trajectories at the end of the store held out for validation")
    parser.add_argument("--val-every", type=int, default=1000, help="validate every this many steps (at a log step)")
    parser.add_argument("--results-dir", type=str, default="results")
    parser.add_argument("--run-dir", type=str, default=None)
    parser.add_argument("--resume", type=str, default=None)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--ckpt-every", type=int, default=50_000)
    parser.add_argument("--sample-every", type=int, default=5_000, help="EMA sample grid from fixed noise (0: never)")
    parser.add_argument("--precision", type=str, choices=["fp32", "tf32", "bf16"], default="tf32")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    gan = parser.add_argument_group("GAN fine-tuning")
    gan.add_argument("--gan", action=argparse.BooleanOptionalAction, default=False, help="run the GAN stage")
    gan.add_argument("--init-ckpt", type=str, default=None,
                     help="start from this train_ard.py checkpoint's EMA weights (required by --gan) instead of the teacher")
    gan.add_argument("--gan-blocks", type=int, nargs="+", default=None, help="teacher blocks with a head (default: all)")
    gan.add_argument("--gan-scale", type=float, default=10.0, help="lambda = scale * |grad L_reg| / |grad L_GAN|")
    gan.add_argument("--gan-warmup", type=int, default=3000, help="steps with lambda = 0 (the discriminator still trains)")
    gan.add_argument("--gan-max-t", type=int, default=1000, help="real and fake x0 are diffused to t ~ U[0, this)")
    gan.add_argument("--disc-lr", type=float, default=1e-3)
    gan.add_argument("--data", type=str, default="digits", help="real data: 'digits' or an ImageFolder path")
    gan.add_argument("--image-size", type=int, default=None, help="image size of --data (default: the teacher's)")
    gan.add_argument("--num-workers", type=int, default=4)
    args = parser.parse_args(argv)
    if args.boundaries is not None:
        args.num_steps = len(args.boundaries) - 1
    return args


if __name__ == "__main__":
    main(parse_args())
