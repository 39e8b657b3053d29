"""Distributed set-up that degrades to a single process.

Under `torchrun` the process group uses NCCL on GPUs and gloo on CPU; under plain `python` the
script is a world of one and no process group is created. The device comes from LOCAL_RANK.
"""

import os

import numpy as np
import torch
import torch.distributed as dist


def setup(device=None):
    """Initialises the process group if launched by torchrun; returns the torch.device of this process."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if "RANK" in os.environ and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def all_reduce_mean(values, device):
    """The mean over ranks of a float or a list of floats (every rank must call it)."""
    scalar = not isinstance(values, (list, tuple))
    tensor = torch.tensor([values] if scalar else list(values), dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    out = tensor.tolist()
    return out[0] if scalar else out


def broadcast_object(obj):
    """Rank 0's value of a picklable object, on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def step_seed(global_seed, step, rank_):
    """A 32-bit seed that is a pure function of (seed, step, rank): all the randomness of a training step
    derives from it, so a resumed run needs no saved RNG state to continue exactly."""
    return int(np.random.SeedSequence([global_seed, step, rank_]).generate_state(1)[0])
