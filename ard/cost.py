"""What models cost: FLOPs counted on the `meta` device (nothing is allocated; a multiply-add is 2
FLOPs) and wall time measured on this machine."""

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ard.checkpoints import build_model
from ard.generation import TeacherSampler
from diffusion.sampling import model_evaluations


def count_flops(fn):
    """FLOPs of everything fn() runs (forward and, if it calls backward, backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def median_times(fns, repeats, warmup=1):
    """Median seconds of each function, calls interleaved so that the machine's drift hits all
    alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def best_time(fn, repeats=3, enough=6.0):
    """The fastest of a few runs without gradients, in seconds: the figure least disturbed by
    whatever else the machine does. Up to `repeats` runs, but no third once two have taken `enough`
    seconds."""
    times = []
    while len(times) < repeats and not (len(times) >= 2 and sum(times) >= enough):
        start = time.perf_counter()
        with torch.no_grad():
            fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _noise_and_labels(config, batch):
    shape = (batch, config["in_channels"], config["input_size"], config["input_size"])
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)), torch.arange(
        batch
    ) % config["num_classes"]


def sampling_cost(model, config, steps=25, cfg_scale=1.5, batch=500, sampler="ddim"):
    """(FLOPs per image, CPU seconds per image) of sampling: a teacher's `sampler` over `steps` with
    guidance (two model calls per evaluation unless cfg_scale is 1), or a student's K steps."""
    with torch.device("meta"):
        meta = build_model(config)
        x, y = (
            torch.randn(2, config["in_channels"], config["input_size"], config["input_size"]),
            torch.zeros(2, dtype=torch.long),
        )
        if config["kind"] == "ard":
            flops = count_flops(lambda: meta.sample(x[:1], y[:1]))
        else:
            flops = (
                count_flops(lambda: meta(x, y, y))
                / 2
                * model_evaluations(sampler, steps)
                * (2 if cfg_scale != 1.0 else 1)
            )
    noise, labels = _noise_and_labels(config, batch)
    if config["kind"] == "ard":
        return flops, best_time(lambda: model.sample(noise, labels)) / batch
    solve = TeacherSampler(model, config, sampler, steps, cfg_scale)
    return flops, best_time(lambda: solve(noise, labels)) / batch
