"""What trained students do with their history (history_probes.py), on held-out trajectories of their store:
attention mass on earlier steps per history block, the change of each step's prediction when the history is
swapped for another trajectory's of the same class, and the sample's error when every fed-back prediction is
perturbed by sigma * noise (exposure-bias dose response).

    python -m benchmarks.history_probe --traj runs/digits/traj --val-count 500 \
        --students runs/digits/students/k4_n0_state_s0/checkpoints/0001000.pt runs/digits/students/k4_n3_state_s0/checkpoints/0001000.pt \
        --json runs/digits/history_probe.json --figure assets/digits_history_probe.png
"""

import argparse
import os

import torch

import cli
from checkpoints import load_model
from cli import UserError, check_output_path, positive_int
from fileio import write_json
from history_probes import attention_mass, dose_response, history_swap, same_class_donors
from trajectory_store import TrajectoryDataset, TrajectoryStore

SIGMAS = (0.0, 0.02, 0.05, 0.1, 0.2)


def probe(path, store, val_count, seeds=(0, 1, 2)):
    """The three probes of one student checkpoint on the store's last val_count trajectories (its held-out ones)."""
    model, config = load_model(path, kind="ard")
    dataset = TrajectoryDataset(store, config["boundaries"], config["target"])
    inputs, targets, y = dataset.__getitems__(list(range(len(store) - val_count, len(store))))
    donors = same_class_donors(y, torch.Generator().manual_seed(0))
    doses = [dose_response(model, inputs[:, 0], y, targets[:, -1], SIGMAS, seed) for seed in seeds]
    return {
        "checkpoint": path, "history_layers": config["history_layers"], "target": config["target"],
        "boundaries": config["boundaries"],
        "attention_mass": attention_mass(model, inputs, y).tolist() if config["history_layers"] else [],
        "swap_change": history_swap(model, inputs, y, donors).tolist(),
        "target_change_scale": (targets[donors] - targets).square().mean(dim=(0, 2, 3, 4)).tolist(),
        "dose_response": {str(s): [d[s] for d in doses] for s in SIGMAS},
    }


def figure(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    ard = [r for r in results if r["history_layers"]]
    for r in ard:
        for i, row in enumerate(r["attention_mass"]):
            axes[0].plot(range(1, len(row) + 1), row, "-o", label=f"N={r['history_layers']}, block {i}")
    axes[0].set(xlabel="step k", ylabel="attention on steps < k", title="(a) attention mass on the history")
    axes[0].legend(fontsize=6)
    for r in results:
        axes[1].plot(range(1, len(r["swap_change"]) + 1), r["swap_change"], "-o", label=f"N={r['history_layers']}")
    axes[1].set(xlabel="step k", ylabel="MSE change of step k's prediction", title="(b) history swapped (same class)")
    axes[1].set_yscale("symlog", linthresh=1e-6)  # exact zeros (N = 0, step 1) stay on the axis
    for ax in axes[:2]:
        ax.set_xticks(range(1, len(results[0]["swap_change"]) + 1))
    axes[1].legend(fontsize=7)
    for r in results:
        sig = [float(s) for s in r["dose_response"]]
        mean = [sum(v) / len(v) for v in r["dose_response"].values()]
        axes[2].plot(sig, mean, "-o", label=f"N={r['history_layers']}")
    axes[2].set(xlabel="sigma of the perturbation fed back", ylabel="sample MSE vs teacher", title="(c) exposure-bias dose response", yscale="log")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traj", required=True, help="the trajectory store the students were distilled from")
    parser.add_argument("--students", nargs="+", required=True, help="train_ard.py checkpoints")
    parser.add_argument("--val-count", type=positive_int, required=True, help="the students' held-out trajectories (the store's last)")
    parser.add_argument("--json", required=True, help="the figures, as JSON")
    parser.add_argument("--figure", default=None, help="the three probes as a PNG")
    return parser.parse_args(argv)


def main(args):
    for path, what in ((args.json, "--json"), (args.figure, "--figure")):
        if path:
            check_output_path(path, what)
    store = TrajectoryStore(args.traj)
    if args.val_count >= len(store):
        raise UserError(f"--val-count {args.val_count} is not smaller than the store's {len(store)} trajectories")
    results = [probe(path, store, args.val_count) for path in args.students]
    write_json(args.json, results)
    if args.figure:
        os.makedirs(os.path.dirname(os.path.abspath(args.figure)), exist_ok=True)
        figure(results, args.figure)
    for r in results:
        print(f"N={r['history_layers']}: swap change per step {[f'{v:.2e}' for v in r['swap_change']]}; attention on history "
              f"{[[round(v, 3) for v in row] for row in r['attention_mass']]}; dose response "
              f"{ {s: f'{sum(v) / len(v):.2e}' for s, v in r['dose_response'].items()} }")


if __name__ == "__main__":
    cli.run(main, parse_args)
