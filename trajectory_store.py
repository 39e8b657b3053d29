"""The trajectory store: teacher ODE trajectories on disk, how they are written, and the reader that
training uses.

A store is a folder:

    manifest.json          what was run (teacher sha256, model, shape, solver, S, CFG, saved steps, dtype, seed, ...)
    shard-00000/           one folder per shard of consecutive sample indices, plain .npy arrays:
        xt.npy             (n, J, C, H, W)  ODE states at the J saved solver steps, noise first, sample last
        x0.npy             (n, J, C, H, W)  the teacher's x0 prediction at each of those states
        y.npy              (n,)             class labels
        index.npy          (n,)             global sample indices
    shard-00001/ ...

Solver steps are counted from the noise: step 0 is the noise (model timestep 999 on DiT's 25-step grid),
step s the state after s solver steps, step S the final sample (timestep -1: the model never sees it).
The public re-implementation counts the other way ("teacher-grid index 25, 15, 10, 5, 0" = solver
steps 0, 10, 15, 20, 25). A shard is written under a temporary name and renamed when complete.
"""

import bisect
import json
import os
import shutil

import numpy as np
import torch

from seeding import TRAJECTORY_STREAM, per_index_noise

MANIFEST = "manifest.json"
ARRAYS = ("xt", "x0", "y", "index")
TARGETS = ("state", "x0")


def shard_name(i):
    return f"shard-{i:05d}"


def shard_ranges(count, shard_size):
    """[(start, stop), ...] of the shards of a store of `count` samples."""
    return [(start, min(start + shard_size, count)) for start in range(0, count, shard_size)]


def trajectory_noise(seed, indices, shape):
    """The noise of each trajectory index: (len(indices), *shape), the same for any number of writers."""
    return per_index_noise(seed, indices, shape, TRAJECTORY_STREAM)


def trajectory_labels(indices, num_classes):
    """Balanced classes: trajectory i has label i mod num_classes."""
    return torch.as_tensor(np.asarray(indices, dtype=np.int64) % num_classes)


def write_shard(store_dir, shard, start, stop, solve, shape, num_classes, seed, dtype, batch_size, on_batch=None):
    """Writes trajectories [start, stop) as one shard: solve(noise, y) -> (xt, x0), each (n, J, C, H, W), runs
    batch by batch into memory-mapped arrays of a temporary folder, renamed into place when complete.
    Returns the shard's size in bytes."""
    final = os.path.join(store_dir, shard_name(shard))
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    indices = np.arange(start, stop, dtype=np.int64)
    labels = trajectory_labels(indices, num_classes)
    arrays = {}
    for b in range(0, len(indices), batch_size):
        batch = indices[b : b + batch_size]
        noise = trajectory_noise(seed, batch, shape)
        xt, x0 = solve(noise, labels[b : b + batch_size])
        for name, value in (("xt", xt), ("x0", x0)):
            if name not in arrays:
                arrays[name] = np.lib.format.open_memmap(os.path.join(tmp, f"{name}.npy"), mode="w+", dtype=np.dtype(dtype),
                                                         shape=(len(indices), *value.shape[1:]))
            arrays[name][b : b + len(batch)] = value.cpu().numpy().astype(dtype)
        if on_batch is not None:
            on_batch(len(batch))
    for array in arrays.values():
        array.flush()
    del arrays
    np.save(os.path.join(tmp, "y.npy"), labels.numpy())
    np.save(os.path.join(tmp, "index.npy"), indices)
    os.replace(tmp, final)
    return sum(os.path.getsize(os.path.join(final, f)) for f in os.listdir(final))


def read_manifest(path):
    with open(os.path.join(path, MANIFEST)) as f:
        return json.load(f)


def default_boundaries(saved_steps, saved_timesteps, num_steps):
    """K + 1 solver steps among the saved ones, from the noise to the sample, as evenly spaced in t as the
    saved grid allows: boundary k is the saved state whose timestep is nearest to T * (1 - k / K)."""
    if num_steps < 1:
        raise ValueError("the student needs at least one step")
    first, last = saved_steps[0], saved_steps[-1]
    t_max = saved_timesteps[0]
    inner = list(zip(saved_steps[1:-1], saved_timesteps[1:-1]))
    boundaries = [first]
    for k in range(1, num_steps):
        target = t_max * (1 - k / num_steps)
        candidates = [(abs(t - target), s) for s, t in inner if s > boundaries[-1]]
        if not candidates:
            raise ValueError(f"the store saved too few steps ({len(saved_steps)}) for a {num_steps}-step student")
        boundaries.append(min(candidates)[1])
    return boundaries + [last]


class TrajectoryStore:
    """Memory-mapped, random-access view of a complete store."""

    def __init__(self, path):
        manifest_path = os.path.join(path, MANIFEST)
        if not os.path.isfile(manifest_path):
            raise FileNotFoundError(f"{path} is not a trajectory store: it has no {MANIFEST} (make one with train_teacher_traj.py)")
        self.path = path
        self.manifest = read_manifest(path)
        self.saved_steps = list(self.manifest["save_steps"])
        self.saved_timesteps = list(self.manifest["save_timesteps"])
        self.shards, self.starts = [], []
        missing = [name for name in self.manifest["shards"] if not os.path.isdir(os.path.join(path, name))]
        if missing:
            raise ValueError(f"{path} is incomplete ({len(missing)} of {len(self.manifest['shards'])} shards missing, "
                             f"e.g. {missing[0]}): run the same train_teacher_traj.py command again to finish it")
        start = 0
        for name in self.manifest["shards"]:
            arrays = {a: np.load(os.path.join(path, name, f"{a}.npy"), mmap_mode="r", allow_pickle=False) for a in ARRAYS}
            self.shards.append(arrays)
            self.starts.append(start)
            start += len(arrays["y"])
        if start != self.manifest["count"]:
            raise ValueError(f"{path}: the shards hold {start} trajectories, the manifest says {self.manifest['count']}")

    def __len__(self):
        return self.manifest["count"]

    @property
    def shape(self):
        return tuple(self.manifest["shape"])

    def shard_of(self, i):
        s = bisect.bisect_right(self.starts, i) - 1
        return s, i - self.starts[s]

    def shard_indices(self, shard):
        start = self.starts[shard]
        return range(start, start + len(self.shards[shard]["y"]))

    def rank_indices(self, indices, rank, world_size):
        """The indices (of those given) that a rank reads: whole shards round-robin when there are enough shards
        (each rank then touches only its own files), otherwise every world_size-th index."""
        allowed = set(indices)
        if len(self.shards) >= world_size:
            mine = [i for s in range(rank, len(self.shards), world_size) for i in self.shard_indices(s) if i in allowed]
        else:
            mine = [i for n, i in enumerate(sorted(allowed)) if n % world_size == rank]
        if not mine:
            raise ValueError(f"rank {rank} has no training trajectories: use fewer processes or a larger store")
        return mine

    def positions(self, steps):
        """Positions in the saved-step axis of the given solver steps, with a clear error for any not saved."""
        missing = [s for s in steps if s not in self.saved_steps]
        if missing:
            raise ValueError(
                f"the store {self.path} did not save solver steps {missing}; it saved {self.saved_steps}. "
                f"Pick --boundaries among those, or write a store with --save-steps that include them"
            )
        return [self.saved_steps.index(s) for s in steps]

    def timesteps(self, steps):
        return [self.saved_timesteps[p] for p in self.positions(steps)]

    def check_model(self, shape=None, num_classes=None, model=None):
        """Stops with a clear message when the store was written for another model shape or class count."""
        m = self.manifest
        if shape is not None and tuple(shape) != self.shape:
            raise ValueError(f"the store {self.path} holds {'x'.join(map(str, self.shape))} trajectories "
                             f"but the model expects {'x'.join(map(str, shape))}: use a store made by a teacher of this shape")
        if num_classes is not None and num_classes != m["num_classes"]:
            raise ValueError(f"the store {self.path} has {m['num_classes']} classes but the model has {num_classes}")
        if model is not None and model != m["model"]:
            raise ValueError(f"the store {self.path} was written by a {m['model']} teacher, not {model}")

    def read(self, indices, steps, arrays=("xt", "x0")):
        """For sample indices (any order) and solver steps: {array: (len(indices), len(steps), C, H, W), 'y': (n,)},
        in the store's dtype (torch converts float16 faster than numpy does)."""
        pos = self.positions(steps)
        dtype = np.dtype(self.manifest.get("dtype", "float32"))
        out = {a: np.empty((len(indices), len(steps), *self.shape), dtype=dtype) for a in arrays}
        y = np.empty(len(indices), dtype=np.int64)
        by_shard = {}
        for n, i in enumerate(indices):
            if not 0 <= i < len(self):
                raise IndexError(f"sample {i} is outside the store of {len(self)}")
            s, local = self.shard_of(int(i))
            by_shard.setdefault(s, []).append((n, local))
        for s, items in by_shard.items():
            order = sorted(items, key=lambda item: item[1])  # read each shard in file order
            rows = np.array([n for n, _ in order])
            local = np.array([l for _, l in order])
            for a in arrays:  # index both axes at once: only the requested steps are read from disk
                out[a][rows] = self.shards[s][a][local[:, None], np.asarray(pos)[None, :]]
            y[rows] = self.shards[s]["y"][local]
        out["y"] = y
        return out


class TrajectoryDataset(torch.utils.data.Dataset):
    """Student training examples: (inputs (K, C, H, W), targets (K, C, H, W), y) at the K + 1 boundaries.

    target='state': inputs are the ODE states at boundaries 0..K-1 and targets those at 1..K (the paper's figure).
    target='x0': the first input is the noise; later inputs and the targets are the teacher's x0 predictions at
    the boundaries (the public re-implementation's default). The last target is the final sample in both.
    """

    def __init__(self, store, boundaries, target="state", indices=None):
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}: use one of {TARGETS}")
        if list(boundaries) != sorted(set(boundaries)) or len(boundaries) < 2:
            raise ValueError(f"boundaries must be at least two increasing solver steps, got {boundaries}")
        if boundaries[0] != store.saved_steps[0] or boundaries[-1] != store.saved_steps[-1]:
            raise ValueError(f"boundaries must start at the noise (step {store.saved_steps[0]}) and end at the sample "
                             f"(step {store.saved_steps[-1]}), got {boundaries}")
        store.positions(boundaries)  # every boundary must have been saved
        self.store, self.boundaries, self.target = store, list(boundaries), target
        self.indices = list(range(len(store))) if indices is None else list(indices)
        self.timesteps = store.timesteps(self.boundaries[:-1])  # the student's input timesteps t_0 .. t_{K-1}

    def __len__(self):
        return len(self.indices)

    def __getitems__(self, items):
        """A whole batch at once (the DataLoader uses this when present): one read per shard and array."""
        indices = [self.indices[i] for i in items]
        if self.target == "state":
            data = self.store.read(indices, self.boundaries, arrays=("xt",))
            xt = torch.from_numpy(data["xt"]).float()
            inputs, targets = xt[:, :-1], xt[:, 1:]
        else:
            noise = torch.from_numpy(self.store.read(indices, self.boundaries[:1], arrays=("xt",))["xt"]).float()
            data = self.store.read(indices, self.boundaries[1:], arrays=("x0",))
            x0 = torch.from_numpy(data["x0"]).float()
            inputs, targets = torch.cat([noise, x0[:, :-1]], dim=1), x0
        return inputs, targets, torch.from_numpy(data["y"])

    def __getitem__(self, item):
        inputs, targets, y = self.__getitems__([item])
        return inputs[0], targets[0], y[0]


def collate_batch(batch):
    """Collate for DataLoader: __getitems__ already returns a batch."""
    return batch
