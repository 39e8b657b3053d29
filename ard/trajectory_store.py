"""The trajectory store: teacher ODE trajectories on disk, how they are written, and the reader that
training uses.

A store is a folder:

    manifest.json          what was run (teacher sha256, model, shape, solver, S, CFG, saved steps,
                           dtype, seed, ...)
    shard-00000/           one folder per shard of consecutive sample indices, plain .npy arrays:
        xt.npy             (n, J, C, H, W)  ODE states at the J saved solver steps, noise first,
                                            sample last
        x0.npy             (n, J, C, H, W)  the teacher's x0 prediction at each of those states
        y.npy              (n,)             class labels
        index.npy          (n,)             global sample indices
    shard-00001/ ...

Solver steps are counted from the noise: step 0 is the noise (model timestep 999 on DiT's 25-step
grid), step s the state after s solver steps, step S the final sample (timestep -1: the model never
sees it). The public re-implementation counts the other way: its states at "teacher-grid index
25, 15, 10, 5, 0" are solver steps 0, 10, 15, 20, 25, but its x0 predictions at indices
25, 15, 10, 5 are made from the states of solver steps 0, 9, 14, 19 (t = 999, 624, 416, 208):
its x0 data are --boundaries 0 9 14 19 25. A shard is written under a temporary name and renamed
when complete.
"""

import bisect
import hashlib
import json
import os
import shutil

import numpy as np
import torch

from ard.cli import MissingFileError, UserError
from ard.fileio import NO_SPACE, no_space_error, temporary_name
from ard.generation import teacher_process
from ard.seeding import TRAJECTORY_STREAM, per_index_noise
from diffusion.flow import log_snr as flow_log_snr
from diffusion.ode import solver_grid

MANIFEST = "manifest.json"
ARRAYS = ("xt", "x0", "y", "index")
TARGETS = ("state", "x0")
REQUIRED = (
    "count",
    "shard_size",
    "shape",
    "num_classes",
    "model",
    "save_steps",
    "save_timesteps",
    "dtype",
    "shards",
    "teacher_sha256",
)


def shard_name(i):
    return f"shard-{i:05d}"


def shard_ranges(count, shard_size):
    """[(start, stop), ...] of the shards of a store of `count` samples."""
    return [(start, min(start + shard_size, count)) for start in range(0, count, shard_size)]


def complete_shards(store_dir, manifest):
    """(complete, damaged) shards of a store being written: those intact, and the errors of those
    whose folder exists but fails verification (their writer replaces them)."""
    complete, damaged = set(), []
    for s, (start, stop) in enumerate(shard_ranges(manifest["count"], manifest["shard_size"])):
        folder = os.path.join(store_dir, shard_name(s))
        if os.path.isdir(folder):
            try:
                open_shard(
                    folder,
                    start,
                    stop,
                    (stop - start, len(manifest["save_steps"]), *manifest["shape"]),
                    manifest["dtype"],
                )
                complete.add(s)
            except UserError as e:
                damaged.append(str(e))
    return complete, damaged


def trajectory_noise(seed, indices, shape):
    """The noise of each trajectory index: (len(indices), *shape), the same for
    any number of writers."""
    return per_index_noise(seed, indices, shape, TRAJECTORY_STREAM)


def trajectory_labels(indices, num_classes):
    """Balanced classes: trajectory i has label i mod num_classes."""
    return torch.as_tensor(np.asarray(indices, dtype=np.int64) % num_classes)


def write_shard(
    store_dir, shard, start, stop, solve, shape, num_classes, seed, dtype, batch_size, on_batch=None
):
    """Writes trajectories [start, stop) as one shard: solve(noise, y) -> (xt, x0), each
    (n, J, C, H, W), runs batch by batch into memory-mapped arrays of a temporary folder, renamed
    into place when complete. Returns the shard's size in bytes."""
    final = os.path.join(store_dir, shard_name(shard))
    shutil.rmtree(final, ignore_errors=True)  # a damaged shard (complete_shards did not count it)
    tmp = temporary_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        _fill_shard(tmp, start, stop, solve, shape, num_classes, seed, dtype, batch_size, on_batch)
    except (
        BaseException
    ) as e:  # a full disk, a stop request, anything: no partial shard is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            raise no_space_error(final, e) from e
        raise
    os.replace(tmp, final)
    return sum(os.path.getsize(os.path.join(final, f)) for f in os.listdir(final))


def _fill_shard(tmp, start, stop, solve, shape, num_classes, seed, dtype, batch_size, on_batch):
    """write_shard's work in its temporary folder: the arrays batch by batch,
    then their verification."""
    indices = np.arange(start, stop, dtype=np.int64)
    labels = trajectory_labels(indices, num_classes)
    arrays = {}
    for b in range(0, len(indices), batch_size):
        batch = indices[b : b + batch_size]
        noise = trajectory_noise(seed, batch, shape)
        xt, x0 = solve(noise, labels[b : b + batch_size])
        for name, value in (("xt", xt), ("x0", x0)):
            if name not in arrays:
                path = os.path.join(tmp, f"{name}.npy")
                arrays[name] = np.lib.format.open_memmap(
                    path, mode="w+", dtype=np.dtype(dtype), shape=(len(indices), *value.shape[1:])
                )
                reserve(path)
            arrays[name][b : b + len(batch)] = value.cpu().numpy().astype(dtype)
        if on_batch is not None and b + batch_size < len(indices):
            on_batch(len(batch))  # it may raise to abandon the shard; the last batch completes it
    for array in arrays.values():
        array.flush()
    del arrays
    np.save(os.path.join(tmp, "y.npy"), labels.numpy())
    np.save(os.path.join(tmp, "index.npy"), indices)
    # verify before it counts as complete
    open_shard(tmp, start, stop, (len(indices), *xt.shape[1:]), dtype)


def reserve(path):
    """Allocates a memory-mapped file's blocks now: on a full disk this fails at once with ENOSPC,
    where writing into an unallocated mapping would kill the process with SIGBUS later. Filesystems
    that cannot preallocate are left as they are."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
        except OSError as e:
            if e.errno in NO_SPACE:
                raise


def store_digest(path):
    """What the store at `path` holds, as one hash: its manifest's (the teacher's sha256, the solver
    and its settings, the count, the shards). Two copies of one store have the same digest."""
    manifest = json.dumps(read_manifest(path), sort_keys=True)
    return hashlib.sha256(manifest.encode()).hexdigest()


def read_manifest(path):
    """The manifest of the store at `path`, with every field a reader needs, or one clear error."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise MissingFileError(
            f"{path} is not a trajectory store: it has no {MANIFEST} (make one "
            "with train_teacher_traj.py)"
        )
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except ValueError as e:
        raise UserError(
            f"{manifest_path} is not valid JSON ({e}): the store is damaged; write it again "
            "with train_teacher_traj.py"
        ) from e
    missing = [k for k in REQUIRED if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise UserError(
            f"{manifest_path} lacks {', '.join(missing)}: the store is damaged "
            "or not a trajectory store"
        )
    expected = [shard_name(i) for i in range(len(manifest["shards"]))]
    if manifest["shards"] != expected:
        raise UserError(
            f"{manifest_path} lists shards {manifest['shards'][:3]}..., not "
            f"{expected[:3]}...: the store is damaged"
        )
    return manifest


def open_shard(folder, start, stop, state_shape, dtype):
    """The memory-mapped arrays of one shard, verified: every array readable, xt and x0 of
    shape (stop - start, J, C, H, W) = state_shape and the store's dtype, y and index of
    length stop - start, and index = start, ..., stop - 1. Any other content is a damaged
    shard, named in the error."""
    arrays = {}
    for a in ARRAYS:
        path = os.path.join(folder, f"{a}.npy")
        try:
            arrays[a] = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(
                f"{path} cannot be read ({e}): the shard is damaged; remove {folder} and run the "
                "same train_teacher_traj.py command again to rewrite it"
            ) from e
    n = stop - start
    problems = [
        f"{a}.npy has shape {arrays[a].shape}, not {tuple(state_shape)}"
        for a in ("xt", "x0")
        if arrays[a].shape != tuple(state_shape)
    ]
    problems += [
        f"{a}.npy has dtype {arrays[a].dtype}, not {np.dtype(dtype)}"
        for a in ("xt", "x0")
        if arrays[a].dtype != np.dtype(dtype)
    ]
    problems += [
        f"{a}.npy has shape {arrays[a].shape}, not ({n},)"
        for a in ("y", "index")
        if arrays[a].shape != (n,)
    ]
    if not problems and not np.array_equal(arrays["index"], np.arange(start, stop)):
        problems.append(f"index.npy does not hold the indices {start}..{stop - 1}")
    if problems:
        raise UserError(
            f"{folder} is damaged ({'; '.join(problems)}): remove it and run the same "
            "train_teacher_traj.py command again to rewrite it"
        )
    return arrays


def log_snr(t):
    """log(alpha-bar / (1 - alpha-bar)) of a timestep of DiT's 1000-step diffusion."""
    from diffusion import create_diffusion

    alpha_bar = float(create_diffusion("").alphas_cumprod[int(t)])
    return float(np.log(alpha_bar / (1.0 - alpha_bar)))


# evenly spaced in the noise level, or in log-SNR (more content per step)
BOUNDARY_SCHEDULES = ("t", "logsnr")
# The student's K when no flag says otherwise (the paper's); the writer's default for large models
# saves exactly this student's boundaries, so the two defaults work together.
DEFAULT_STUDENT_STEPS = 4


def schedule_coordinate(schedule, flow=None):
    """The coordinate a boundary schedule spaces evenly, as a function of a saved timestep. For
    DiT's diffusion (flow=None): the timestep itself ('t': 999, 749, 500, 250 for K = 4, most
    steps at low signal) or its log-SNR ('logsnr': 999, 708, 291, 42 on DiT's 25-step grid). For a
    flow (diffusion/flow.py): the noise level s, or 2 log((1 - s) / s) (K = 4 on a 25-step grid:
    s = 1, 0.84, 0.48, 0.16)."""
    if schedule not in BOUNDARY_SCHEDULES:
        raise UserError(
            f"unknown boundary schedule {schedule!r}: use one of {', '.join(BOUNDARY_SCHEDULES)}"
        )
    if flow is None:
        return float if schedule == "t" else log_snr
    if schedule == "t":
        return flow.noise_level
    # The noise (s = 1) has log-SNR -inf: levels are clamped to the grid's inner
    # range [1/S, 1 - 1/S].
    lo = 1.0 / flow.num_timesteps
    return lambda t: flow_log_snr(min(max(flow.noise_level(t), lo), 1.0 - lo))


def default_boundaries(saved_steps, saved_timesteps, num_steps, schedule="t", flow=None):
    """K + 1 solver steps among the saved ones, from the noise to the sample: boundary k is the
    saved state whose coordinate (see schedule_coordinate) is nearest to the k-th of K + 1 evenly
    spaced values between the noise's and that of the last time the teacher's solver evaluates
    (timestep 0 on DiT's grids, noise level 1 / S for a flow). A pure function of the store's
    manifest, K and the schedule."""
    if num_steps < 1:
        raise UserError("the student needs at least one step")
    coord = schedule_coordinate(schedule, flow)
    first, last = saved_steps[0], saved_steps[-1]
    start, end = coord(saved_timesteps[0]), coord(0 if flow is None else flow.model_times()[-1])
    inner = [(s, coord(t)) for s, t in zip(saved_steps[1:-1], saved_timesteps[1:-1])]
    boundaries = [first]
    for k in range(1, num_steps):
        target = start + (end - start) * k / num_steps
        candidates = [(abs(u - target), s) for s, u in inner if s > boundaries[-1]]
        if not candidates:
            raise UserError(
                f"the store saved too few steps ({len(saved_steps)}) for a {num_steps}-step student"
            )
        boundaries.append(min(candidates)[1])
    return boundaries + [last]


def schedule_steps(grid_timesteps, num_steps, schedule="t", flow=None):
    """The K + 1 solver steps a boundary schedule wants on a solver's whole grid (its S + 1
    timesteps, solver_grid's): what a store must save for a K-step student, and what train_ard.py
    uses when the store saved them all."""
    return default_boundaries(
        list(range(len(grid_timesteps))), list(grid_timesteps), num_steps, schedule, flow
    )


def solver_timesteps(manifest):
    """The timestep of every state on the solver grid of a store's teacher (S + 1 values, the noise
    first), from its manifest: the grid the store's saved steps are counted on."""
    return solver_grid(teacher_process(manifest, manifest["num_sampling_steps"]))


def resolve_boundaries(store, grid_timesteps, num_steps, schedule="t", flow=None):
    """The default boundaries of a K-step student on a store: the steps the schedule wants on the
    solver's whole grid, which the store must have saved; else one sentence naming the steps the
    store could give instead and both fixes. Never approximated silently."""
    wanted = schedule_steps(grid_timesteps, num_steps, schedule, flow)
    if set(wanted) <= set(store.saved_steps):
        return wanted
    try:
        nearest = default_boundaries(
            store.saved_steps, store.saved_timesteps, num_steps, schedule, flow
        )
        instead = (
            f"whose nearest are {nearest}: pass --boundaries {' '.join(map(str, nearest))} to use "
            "those, or"
        )
    except UserError:
        instead = f"too few for a {num_steps}-step student:"
    times = [int(round(float(grid_timesteps[s]))) for s in wanted]
    spec = f"student:{num_steps}" + ("" if schedule == "t" else f":{schedule}")
    raise UserError(
        f"the {num_steps}-step schedule {schedule!r} wants solver steps {wanted} (timesteps "
        f"{times}), and the store {store.path} saved {store.saved_steps}, {instead} write the "
        f"store with --save-steps {spec} (or 'all')"
    )


class TrajectoryStore:
    """Memory-mapped, random-access view of a complete store, verified when
    opened (see open_shard)."""

    def __init__(self, path):
        self.path = path
        self.manifest = read_manifest(path)
        self.saved_steps = list(self.manifest["save_steps"])
        self.saved_timesteps = list(self.manifest["save_timesteps"])
        self.shards, self.starts = [], []
        missing = [
            name for name in self.manifest["shards"] if not os.path.isdir(os.path.join(path, name))
        ]
        if missing:
            raise UserError(
                f"{path} is incomplete ({len(missing)} of {len(self.manifest['shards'])} "
                f"shards missing, e.g. {missing[0]}): run the same train_teacher_traj.py "
                "command again to finish it"
            )
        ranges = shard_ranges(self.manifest["count"], self.manifest["shard_size"])
        if len(ranges) != len(self.manifest["shards"]):
            raise UserError(
                f"{path}: the manifest lists {len(self.manifest['shards'])} shards for "
                f"{self.manifest['count']} trajectories in shards of "
                f"{self.manifest['shard_size']}: the store is damaged"
            )
        for name, (start, stop) in zip(self.manifest["shards"], ranges):
            state_shape = (stop - start, len(self.saved_steps), *self.manifest["shape"])
            self.shards.append(
                open_shard(
                    os.path.join(path, name), start, stop, state_shape, self.manifest["dtype"]
                )
            )
            self.starts.append(start)

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
        """The indices (of those given) that a rank reads: whole shards round-robin when
        there are enough shards (each rank then touches only its own files), otherwise
        every world_size-th index."""
        allowed = set(indices)
        if len(self.shards) >= world_size:
            mine = [
                i
                for s in range(rank, len(self.shards), world_size)
                for i in self.shard_indices(s)
                if i in allowed
            ]
        else:
            mine = [i for n, i in enumerate(sorted(allowed)) if n % world_size == rank]
        if not mine:
            raise UserError(
                f"rank {rank} has no training trajectories: use fewer processes or a larger store"
            )
        return mine

    def positions(self, steps):
        """Positions in the saved-step axis of the given solver steps, with a clear
        error for any not saved."""
        missing = [s for s in steps if s not in self.saved_steps]
        if missing:
            raise UserError(
                f"the store {self.path} did not save solver steps {missing}; it saved "
                f"{self.saved_steps}. Pick --boundaries among those, or write a store with "
                "--save-steps that include them"
            )
        return [self.saved_steps.index(s) for s in steps]

    def timesteps(self, steps):
        return [self.saved_timesteps[p] for p in self.positions(steps)]

    def check_model(self, shape=None, num_classes=None, model=None):
        """Stops with a clear message when the store was written for another
        model shape or class count."""
        m = self.manifest
        if shape is not None and tuple(shape) != self.shape:
            raise UserError(
                f"the store {self.path} holds {'x'.join(map(str, self.shape))} "
                f"trajectories but the model expects {'x'.join(map(str, shape))}: use a "
                "store made by a teacher of this shape"
            )
        if num_classes is not None and num_classes != m["num_classes"]:
            raise UserError(
                f"the store {self.path} has {m['num_classes']} classes but "
                f"the model has {num_classes}"
            )
        if model is not None and model != m["model"]:
            raise UserError(
                f"the store {self.path} was written by a {m['model']} teacher, not {model}"
            )

    def read(self, indices, steps, arrays=("xt", "x0")):
        """For sample indices (any order) and solver steps:
        {array: (len(indices), len(steps), C, H, W), 'y': (n,)}, in the store's dtype (torch
        converts float16 faster than numpy does)."""
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
            local = np.array([position for _, position in order])
            for a in arrays:  # index both axes at once: only the requested steps are read from disk
                out[a][rows] = self.shards[s][a][local[:, None], np.asarray(pos)[None, :]]
            y[rows] = self.shards[s]["y"][local]
        out["y"] = y
        return out


class TrajectoryDataset(torch.utils.data.Dataset):
    """Student training examples: (inputs (K, C, H, W), targets (K, C, H, W), y)
    at the K + 1 boundaries.

    target='state': inputs are the ODE states at boundaries 0..K-1 and targets those at 1..K
    (the paper's figure).
    target='x0': the first input is the noise; later inputs and the targets are the teacher's x0
    predictions at the boundaries (the public re-implementation's default). The last target is the
    final sample in both.
    """

    def __init__(self, store, boundaries, target="state", indices=None):
        if target not in TARGETS:
            raise UserError(f"unknown target {target!r}: use one of {TARGETS}")
        if list(boundaries) != sorted(set(boundaries)) or len(boundaries) < 2:
            raise UserError(
                f"boundaries must be at least two increasing solver steps, got {boundaries}"
            )
        if boundaries[0] != store.saved_steps[0] or boundaries[-1] != store.saved_steps[-1]:
            raise UserError(
                f"boundaries must start at the noise (step {store.saved_steps[0]}) and end at the "
                f"sample (step {store.saved_steps[-1]}), got {boundaries}"
            )
        store.positions(boundaries)  # every boundary must have been saved
        self.store, self.boundaries, self.target = store, list(boundaries), target
        self.indices = list(range(len(store))) if indices is None else list(indices)
        # the student's input timesteps t_0 .. t_{K-1}
        self.timesteps = store.timesteps(self.boundaries[:-1])

    def __len__(self):
        return len(self.indices)

    def __getitems__(self, items):
        """A whole batch at once (the DataLoader uses this when present): one
        read per shard and array."""
        indices = [self.indices[i] for i in items]
        if self.target == "state":
            data = self.store.read(indices, self.boundaries, arrays=("xt",))
            xt = torch.from_numpy(data["xt"]).float()
            inputs, targets = xt[:, :-1], xt[:, 1:]
        else:
            noise = torch.from_numpy(
                self.store.read(indices, self.boundaries[:1], arrays=("xt",))["xt"]
            ).float()
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
