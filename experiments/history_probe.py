"""What a trained ARD student does with its history (the earlier steps of its trajectory), measured
on held-out trajectories of the store it was distilled from:

  attention mass   in each history block, the share of each step's attention (mean over its
                   queries, heads and trajectories) that goes to the tokens of earlier steps; 0 by
                   construction for step 0
  history swap     each step's prediction when the earlier steps' inputs are replaced by those of
                   another trajectory of the same class: the mean squared change; exactly 0 with
                   N = 0 and for step 0
  dose response    the sample's error against the teacher's sample when every fed-back prediction
                   is perturbed by sigma * N(0, I) before it becomes the next input: robustness to
                   the student's own errors

    python -m experiments.history_probe --traj runs/digits/traj --val-count 500 \
        --students runs/digits/students/k4_n0_state_s0/checkpoints/0000800.pt \
                   runs/digits/students/k4_n3_state_s0/checkpoints/0000800.pt \
        --json runs/digits/history_probe.json --figure runs/digits/figures/digits_history_probe.png
"""

import argparse
import os

import torch

from ard import cli
from ard.checkpoints import load_model
from ard.cli import UserError, check_output_path, positive_int
from ard.fileio import write_json
from ard.trajectory_store import TrajectoryDataset, TrajectoryStore
from models import modulate

SIGMAS = (0.0, 0.02, 0.05, 0.1, 0.2)  # the dose response's perturbations


@torch.no_grad()
def attention_mass(model, x, y):
    """(history_layers, K) tensor: the mean attention probability that queries of step k put on keys
    of steps < k, in each history block, for the teacher-forced pass on inputs x (B, K, C, H, W)."""
    K, L = model.num_steps, model.x_embedder.num_patches
    tokens, c = model.embed(x), model.conditioning(y, list(range(K)))  # (B, K, L, D), (B, K, D)
    step = torch.arange(K, device=x.device).repeat_interleave(L)
    earlier = (step[None, :] < step[:, None]).float()  # (K*L queries, K*L keys)
    mask = model.attention_mask(x.device)
    mass = torch.zeros(model.history_layers, K)
    for i, block in enumerate(model.blocks[: model.history_layers]):
        shift, scale = block.adaLN_modulation(c).unsqueeze(-2).chunk(6, dim=-1)[:2]
        h = modulate(block.norm1(tokens), shift, scale).flatten(1, 2)  # (B, K*L, D)
        attn = block.attn
        qkv = attn.qkv(h).unflatten(-1, (3, attn.num_heads, attn.head_dim))
        q, k, _ = qkv.permute(2, 0, 3, 1, 4)  # (B, heads, K*L, hd)
        logits = (q @ k.transpose(-1, -2)) * attn.head_dim**-0.5
        probs = logits.masked_fill(~mask, float("-inf")).softmax(dim=-1)  # (B, heads, K*L, K*L)
        on_earlier = (probs * earlier).sum(-1).mean(dim=(0, 1))  # (K*L,)
        mass[i] = on_earlier.view(K, L).mean(dim=1).cpu()
        tokens = block(tokens, c, joint=True, attn_mask=mask)
    return mass


def same_class_donors(y, generator):
    """For each item, another of its class (a random derangement of each class where possible)."""
    donors = torch.arange(len(y))
    for label in y.unique():
        members = torch.nonzero(y == label).flatten()
        if len(members) > 1:
            shift = torch.randint(1, len(members), (1,), generator=generator).item()
            donors[members] = members[(torch.arange(len(members)) + shift) % len(members)]
    return donors


@torch.no_grad()
def history_swap(model, x, y, donors):
    """(K,) mean squared change of step k's prediction when the inputs of steps < k are swapped."""
    base = model(x, y)
    change = torch.zeros(model.num_steps)
    for k in range(1, model.num_steps):
        swapped = x.clone()
        swapped[:, :k] = x[donors, :k]
        change[k] = (model(swapped, y)[:, k] - base[:, k]).square().mean().cpu()
    return change


@torch.no_grad()
def dose_response(model, noise, y, target, sigmas, seed=0):
    """{sigma: the sample's MSE against `target`} when fed-back predictions get sigma * N(0, I)."""
    out = {}
    for sigma in sigmas:
        gen = torch.Generator(device=noise.device).manual_seed(seed)

        def perturb(k, x, sigma=sigma, gen=gen):
            return x + sigma * torch.randn(x.shape, generator=gen, device=x.device)

        sample = model.sample(noise, y, feedback=perturb if sigma > 0 else None)[:, -1]
        out[sigma] = (sample - target).square().mean().item()
    return out


def probe(path, store, val_count, seeds=(0, 1, 2)):
    """The three probes of a student checkpoint on its held-out trajectories (the store's last)."""
    model, config = load_model(path, kind="ard")
    dataset = TrajectoryDataset(store, config["boundaries"], config["target"])
    inputs, targets, y = dataset.__getitems__(list(range(len(store) - val_count, len(store))))
    donors = same_class_donors(y, torch.Generator().manual_seed(0))
    doses = [dose_response(model, inputs[:, 0], y, targets[:, -1], SIGMAS, seed) for seed in seeds]
    return {
        "checkpoint": path,
        "history_layers": config["history_layers"],
        "target": config["target"],
        "boundaries": config["boundaries"],
        "attention_mass": attention_mass(model, inputs, y).tolist()
        if config["history_layers"]
        else [],
        "swap_change": history_swap(model, inputs, y, donors).tolist(),
        "target_change_scale": (targets[donors] - targets).square().mean(dim=(0, 2, 3, 4)).tolist(),
        "dose_response": {str(s): [d[s] for d in doses] for s in SIGMAS},
    }


def figure(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for result in [result for result in results if result["history_layers"]]:
        for block, row in enumerate(result["attention_mass"]):
            label = f"N={result['history_layers']}, block {block}"
            axes[0].plot(range(1, len(row) + 1), row, "-o", label=label)
    axes[0].set(
        xlabel="step k", ylabel="attention on steps < k", title="(a) attention mass on the history"
    )
    axes[0].legend(fontsize=6)
    for result in results:
        axes[1].plot(
            range(1, len(result["swap_change"]) + 1),
            result["swap_change"],
            "-o",
            label=f"N={result['history_layers']}",
        )
    axes[1].set(
        xlabel="step k",
        ylabel="MSE change of step k's prediction",
        title="(b) history swapped (same class)",
    )
    axes[1].set_yscale("symlog", linthresh=1e-6)  # exact zeros (N = 0, step 1) stay on the axis
    for ax in axes[:2]:
        ax.set_xticks(range(1, len(results[0]["swap_change"]) + 1))
    axes[1].legend(fontsize=7)
    for result in results:
        sigmas = [float(sigma) for sigma in result["dose_response"]]
        mean = [sum(errors) / len(errors) for errors in result["dose_response"].values()]
        axes[2].plot(sigmas, mean, "-o", label=f"N={result['history_layers']}")
    axes[2].set(
        xlabel="sigma of the perturbation fed back",
        ylabel="sample MSE vs teacher",
        title="(c) exposure-bias dose response",
        yscale="log",
    )
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--traj", required=True, help="the trajectory store the students were distilled from"
    )
    parser.add_argument("--students", nargs="+", required=True, help="train_ard.py checkpoints")
    parser.add_argument(
        "--val-count",
        type=positive_int,
        required=True,
        help="the students' held-out trajectories (the store's last)",
    )
    parser.add_argument("--json", required=True, help="the figures, as JSON")
    parser.add_argument("--figure", default=None, help="the three probes as a PNG")
    return parser.parse_args(argv)


def main(args):
    for path, what in ((args.json, "--json"), (args.figure, "--figure")):
        if path:
            check_output_path(path, what)
    store = TrajectoryStore(args.traj)
    if args.val_count >= len(store):
        raise UserError(
            f"--val-count {args.val_count} is not smaller than the store's {len(store)} "
            "trajectories"
        )
    results = [probe(path, store, args.val_count) for path in args.students]
    write_json(args.json, results)
    if args.figure:
        os.makedirs(os.path.dirname(os.path.abspath(args.figure)), exist_ok=True)
        figure(results, args.figure)
    for result in results:
        swap = [f"{change:.2e}" for change in result["swap_change"]]
        attention = [[round(mass, 3) for mass in row] for row in result["attention_mass"]]
        dose = {
            sigma: f"{sum(errors) / len(errors):.2e}"
            for sigma, errors in result["dose_response"].items()
        }
        print(
            f"N={result['history_layers']}: swap change per step {swap}; attention on history "
            f"{attention}; dose response {dose}"
        )


if __name__ == "__main__":
    cli.run(main, parse_args)
