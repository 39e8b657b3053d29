"""Sampling as a replayed CUDA graph: a K-step student at batch 1 is a few hundred small
kernels, and launching them one by one from Python costs more than running them.
`CapturedSampler` records a sampler's kernels once per input shape and replays the recording for
every later batch of that shape.

    # noise, y -> samples, as the eager function
    generate = CapturedSampler(sample_fn(model, config))
    # first call of a shape: warm up, capture, replay
    samples = generate(noise, y)

What a captured function may do is narrower than eager code (torch.cuda.graphs): it may not
read a GPU value on the host (`.item()`, `float(t[0])`, `if tensor:`), copy host memory to the
GPU (`torch.tensor(list, device=...)`, `torch.from_numpy(a).to(device)`), or draw random
numbers it expects to change between replays. Its Python runs once, at capture: every replay
repeats those kernels on the same buffers, so the inputs are copied into buffers the graph
owns and the output is copied out of the buffer it writes. `capture_hazards` finds the first
two kinds of op on any machine, by running the function on the `meta` device after one warm-up
call (which may fill caches).
"""

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MAX_SHAPES = 4  # graphs kept at once (each holds its own activations); a further shape runs eagerly


def _signature(tensors):
    """What a recording depends on: every input's shape, dtype and device, and the
    autocast setting it ran under."""
    device_type = tensors[0].device.type
    autocast = torch.is_autocast_enabled(device_type)
    return tuple((tuple(t.shape), t.dtype, t.device) for t in tensors) + (
        autocast,
        torch.get_autocast_dtype(device_type) if autocast else None,
    )


def _on_device(device):
    """Makes a CUDA device current for a recording or a replay (nothing for another device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class CudaGraph:
    """Records fn(*inputs) as a CUDA graph: `warmup` eager calls on a side stream first (they fill
    caches and let cuDNN and the allocator settle, as torch.cuda.graphs asks), then the capture.
    Returns (replay, output).

    Under autocast the weight casts are recorded too (autocast's cache is off while recording): a
    cached bf16 copy of a weight would be freed when the caller's autocast block ends, and every
    later replay would read freed memory."""

    def __init__(self, warmup=2):
        self.warmup = warmup

    def __call__(self, fn, inputs):
        # On the inputs' device, whichever is current: a graph lives on the device it records on.
        with _on_device(inputs[0].device):
            return self._record(fn, inputs)

    def _record(self, fn, inputs):
        enabled, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
            with torch.cuda.stream(stream):
                for _ in range(self.warmup):
                    fn(*inputs)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = fn(*inputs)
        return graph.replay, output


class CapturedSampler:
    """fn(*tensors) -> tensor, replayed from a recording per input signature (shapes, dtypes,
    devices, autocast). Each call copies its inputs into the recording's own buffers, replays, and
    returns a copy of the output: the next replay overwrites the buffer, not a result already
    returned. At most MAX_SHAPES recordings are kept; a further signature runs fn eagerly.
    `record(fn, inputs) -> (replay, output)` makes a recording (CudaGraph)."""

    def __init__(self, fn, record=None, max_shapes=MAX_SHAPES):
        self.fn, self.record, self.max_shapes = fn, record or CudaGraph(), max_shapes
        self.recordings = {}  # signature -> (replay, input buffers, output buffer)

    @torch.no_grad()
    def __call__(self, *tensors):
        key = _signature(tensors)
        if key not in self.recordings:
            if len(self.recordings) >= self.max_shapes:
                return self.fn(*tensors)
            buffers = tuple(t.clone() for t in tensors)
            replay, output = self.record(self.fn, buffers)
            self.recordings[key] = (replay, buffers, output)
        replay, buffers, output = self.recordings[key]
        for buffer, t in zip(buffers, tensors):
            buffer.copy_(t)
        with _on_device(buffers[0].device):
            replay()
        return output.clone()


class _Hazards(TorchDispatchMode):
    """Records the ops that a CUDA graph cannot hold: a read of a device value on the
    host, and an op that takes a host tensor (more than a scalar) into device work, i.e.
    a host-to-device copy."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        out = func(*args, **kwargs)
        host = [t for t in tensors if t.device.type == "cpu"]
        output = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        on_device = len(host) < len(tensors) or any(t.device.type != "cpu" for t in output)
        if func is torch.ops.aten._local_scalar_dense.default and not host:
            self.found.append(f"{func}: a device value read on the host (.item(), float(), bool())")
        elif on_device and any(t.dim() > 0 for t in host):
            shapes = ", ".join(f"{t.device.type} {tuple(t.shape)}" for t in tensors)
            self.found.append(
                f"{func} takes a host tensor into device work ({shapes}): a host-to-device copy"
            )
        return out


def capture_hazards(fn, *tensors):
    """The ops of fn(*tensors) that would break or go stale in a CUDA graph, found without a
    GPU. The inputs are moved to the `meta` device (the modules fn calls must be there
    already: `module.to("meta")`); fn runs once unchecked (the warm-up before a capture, which
    may fill caches), then once more with every op checked. Returns a list of descriptions,
    empty when nothing was found."""
    meta = [t.to("meta") for t in tensors]
    mode = _Hazards()
    try:
        fn(*meta)
        with mode, _watch_host_data(mode.found):
            fn(*meta)
    except (
        RuntimeError,
        NotImplementedError,
    ) as err:  # .item() on meta, or an op whose shape depends on data
        mode.found.append(f"{type(err).__name__}: {err}")
    return mode.found


@contextlib.contextmanager
def _watch_host_data(found):
    """torch.tensor(data, device=...), torch.as_tensor and indexing by a Python list copy
    host data below the dispatcher, out of a dispatch mode's sight: they are watched at
    the Python level instead."""
    originals = {name: getattr(torch, name) for name in ("tensor", "as_tensor")}
    getitem = torch.Tensor.__getitem__

    def watched(name):
        def constructor(data, *args, **kwargs):
            out = originals[name](data, *args, **kwargs)
            if out.device.type != "cpu" and out.dim() > 0 and not isinstance(data, torch.Tensor):
                found.append(
                    f"torch.{name} of host data on {out.device.type} "
                    f"{tuple(out.shape)}: a host-to-device copy"
                )
            return out

        return constructor

    def watched_getitem(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if self.device.type != "cpu" and any(isinstance(p, list) for p in parts):
            found.append(
                f"indexing a {self.device.type} tensor by a Python list: a "
                "host-to-device copy of the index"
            )
        return getitem(self, index)

    try:
        for name in originals:
            setattr(torch, name, watched(name))
        torch.Tensor.__getitem__ = watched_getitem
        yield
    finally:
        for name, original in originals.items():
            setattr(torch, name, original)
        torch.Tensor.__getitem__ = getitem
