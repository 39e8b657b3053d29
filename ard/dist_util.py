"""Processes and devices: distributed set-up that degrades to a single process, and numeric
precision.

Under `torchrun` the process group uses NCCL on GPUs and gloo on CPU; under plain `python` the
script is a world of one and no process group is created. The device comes from LOCAL_RANK.
"""

import contextlib
import os
import sys

import torch
import torch.distributed as dist

# on GPU: full fp32, TF32 matmuls and convolutions, or bf16 autocast (with TF32)
PRECISIONS = (
    "fp32",
    "tf32",
    "bf16",
)


def setup(precision="fp32", device=None):
    """Initialises the process group if launched by torchrun and sets the matmul precision; returns
    the torch.device of this process."""
    if precision not in PRECISIONS:
        raise RuntimeError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
    torch.backends.cudnn.allow_tf32 = precision != "fp32"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:  # one GPU per process, by its local rank; an explicit index stays
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)  # before NCCL, which uses the current device
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        print0(
            "WARNING: --precision bf16 on a CPU without bf16 instructions (AVX512-BF16 or AMX): "
            "its matrix products run in software, about 100x slower than fp32 (0.65 against 62 "
            "GFLOP/s on 2 AMD EPYC cores); use --precision fp32 on this CPU",
            file=sys.stderr,
        )
    return device


def cpu_has_bf16():
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX tiles)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def autocast(device, precision):
    """bf16 autocast for --precision bf16, else nothing."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


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


def all_reduce_sum(value, device):
    """The sum over ranks of a number (every rank must call it)."""
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.item()


def broadcast_object(obj):
    """Rank 0's value of a picklable object, on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_ddp(module, device):
    """DistributedDataParallel around a module when there are several processes; the module itself
    otherwise."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None
    )


def add_precision_argument(parser, default):
    parser.add_argument(
        "--precision",
        type=str,
        choices=PRECISIONS,
        default=default,
        help="on GPU: fp32, TF32 matmuls (faster, slightly less exact), or bf16 autocast (with "
        "TF32)",
    )
