"""One GPU check at ImageNet scale: latency, throughput, memory, bf16, SDPA kernels, compile, and
the real scripts end to end, with nothing downloaded (random weights, a random SD-VAE-shaped
AutoencoderKL saved locally).

    python -m benchmarks.gpu_check --out results/gpu_check  # one GPU: DiT-XL/2 at 256, K = 4, N = 6
    python -m benchmarks.gpu_check --out results/gpu_check --compile  # also torch.compile (minutes)
    python -m benchmarks.gpu_check --cpu --out /tmp/gpu_check  # tiny shapes on the CPU (the tests)

Writes OUT/gpu_check.json (every figure, written after each section, so a run cut short keeps what
it measured) and OUT/gpu_check.md (the table for docs/performance.md). Sections, in order:
  numerics     KV-cached `sample` against the teacher-forced pass, in bf16 and in fp32; the
               student's output in bf16 against fp32 (the bf16 rounding scale the first is judged
               by); which SDPA kernels run
  sampling     per-image latency of the 4-step students (N = 0, N = 6) and of the 25-step CFG
               teacher, at batch 1, 8 and 256, in bf16 autocast and in TF32, eager and replayed from
               a CUDA graph, timed with CUDA events after warm-up
  training     a distillation step (forward, backward, AdamW, EMA), with the history attention
               masked and per step, at the largest power-of-two batch that fits: trajectories per
               second, peak memory, achieved TFLOPs (FLOPs counted on `meta`) and share of the peak
  trajectories the teacher's trajectory writing rate (DDIM 25, CFG 1.5, bf16)
  flow         the same weights read as a flow teacher (SiT's convention): Heun-13 trajectory rate,
               bf16 against fp32
  scripts      train_teacher_traj.py -> train_ard.py under torchrun (NCCL on a GPU) -> train_ard.py
               --gan -> sample_ddp.py, and a flow teacher (SiT's convention) through
               train_teacher_traj.py (Heun) -> train_ard.py and sample_ddp.py -> the evaluator's
               checks and features, at these shapes with tiny counts
  compile      (--compile) graph breaks of the student's forward (torch._dynamo.explain) and
               compiled timings
"""

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from copy import deepcopy

import numpy as np
import torch
import torch.nn.functional as F

from ard.checkpoints import build_model, save_checkpoint, student_config, teacher_config
from ard.cli import positive_int
from ard.cost import count_flops
from ard.fileio import write_json
from ard.generation import TeacherSampler
from ard.graphs import CapturedSampler
from ard.training import requires_grad, update_ema
from ard_models import HISTORY_ATTENTION
from models import randomise_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = {
    # model, latent side, classes, K, N, large batch, image side, VAE blocks (each halves the side),
    # ImageFolder images
    "gpu": dict(
        model="DiT-XL/2",
        latent=32,
        classes=1000,
        K=4,
        N=6,
        batch=256,
        image=256,
        vae_blocks=(128, 256, 512, 512),
    ),
    "cpu": dict(
        model="DiT-T/2", latent=8, classes=10, K=4, N=3, batch=8, image=16, vae_blocks=(8, 8)
    ),
}
DENSE_BF16_PEAK = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
]


#################################################################################
#                           Models and timing                                   #
#################################################################################


def build(m, device):
    """(teacher, {N: student}) with random weights; the students start from the teacher, as
    train_ard.py does."""
    teacher_configuration = teacher_config(
        m["model"], m["latent"], 4, m["classes"], True, "latent", None, m["image"], None
    )
    teacher = randomise_weights(build_model(teacher_configuration)).to(device).eval()
    timesteps = torch.linspace(999, 999 / m["K"], m["K"]).round().tolist()
    students = {}
    for n in (0, m["N"]):
        student_configuration = student_config(
            teacher_configuration, timesteps, n, list(range(m["K"] + 1)), "state", None, False
        )
        students[n] = (
            build_model(student_configuration).load_teacher(teacher.state_dict()).to(device).eval()
        )
    return teacher_configuration, teacher, students


class Clock:
    """Median seconds of fn() after warm-up: CUDA events on a GPU, a host clock on the CPU (where
    the figures only show that the section runs: one warm-up and one timed call)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, repeats=5, warmup=2):
        if not self.cuda:
            repeats, warmup = 1, 1
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
        return float(np.median(times))


def precision(name):
    """The context of a precision: bf16 autocast, or fp32 weights with TF32 matmuls."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=name == "bf16")


def inputs(m, batch, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 4, m["latent"], m["latent"], generator=gen).to(device)
    return noise, torch.randint(m["classes"], (batch,), generator=gen).to(device)


#################################################################################
#                                 Sections                                      #
#################################################################################


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.no_grad()
def numerics(m, students, device):
    """Cached sampling against the teacher-forced pass (the central invariant) in bf16 and fp32, and
    the student's bf16 output against fp32: the rounding scale a bf16 difference is judged by."""
    student = students[m["N"]]
    noise, y = inputs(m, 8, device)
    out = {}
    for name in ("fp32", "bf16"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=name == "bf16"):
            traj = student.sample(noise, y)
            forced = student(torch.cat([noise[:, None], traj[:, :-1]], dim=1), y)
        out[f"cached_vs_forced_{name}"] = {
            "max_abs": (traj.float() - forced.float()).abs().max().item(),
            "rel": rel(traj, forced),
        }
    x = torch.cat([noise[:, None], students[m["N"]].sample(noise, y)[:, :-1]], dim=1)
    fp32 = student(x, y)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        bf16 = student(x, y)
    out["bf16_vs_fp32_forward"] = {
        "max_abs": (bf16.float() - fp32).abs().max().item(),
        "rel": rel(bf16, fp32),
        "output_std": fp32.std().item(),
    }
    out["bf16_cached_within_bf16_rounding"] = (
        out["cached_vs_forced_bf16"]["rel"] <= out["bf16_vs_fp32_forward"]["rel"]
    )
    out["sdpa"] = sdpa_kernels(student, noise, y, device) if device.type == "cuda" else "cpu"
    return out


@torch.no_grad()
def sdpa_kernels(student, noise, y, device):
    """Which SDPA kernels can run each pass: flash needs no mask (sampling, the upper blocks), the
    block-causal history blocks of the teacher-forced pass need a kernel that takes a mask
    (memory-efficient)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    x = torch.cat([noise[:, None]] * student.num_steps, dim=1)
    result = {}
    for name, backend in (
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):
        for what, fn in (
            ("sample", lambda: student.sample(noise, y)),
            ("teacher_forced", lambda: student(x, y)),
        ):
            try:
                with sdpa_kernel([backend]), torch.autocast("cuda", dtype=torch.bfloat16):
                    fn()
                result[f"{what}_{name}"] = "runs"
            except RuntimeError as e:
                result[f"{what}_{name}"] = f"refused ({str(e).splitlines()[0][:80]})"
    return result


def sampling(m, teacher, students, device, clock):
    """Per-image latency of each sampler at batch 1, 8 and the large batch, in bf16 and TF32, eager
    and (on a GPU) replayed from a CUDA graph (ard.graphs.CapturedSampler: recorded on the first
    warm-up call)."""
    rows = []
    graphs = ("eager", "captured") if device.type == "cuda" else ("eager",)
    for prec in ("bf16", "tf32"):
        for batch in sorted({1, 8, m["batch"]}):
            noise, y = inputs(m, batch, device)
            teacher_sampler = TeacherSampler(teacher, dict(space="latent"), "ddim", 25, 1.5)
            runs = [
                (f"student N=0, {m['K']} steps", lambda n, y: students[0].sample(n, y)),
                (f"student N={m['N']}, {m['K']} steps", lambda n, y: students[m["N"]].sample(n, y)),
                ("teacher DDIM 25, CFG 1.5", teacher_sampler),
            ]
            for name, fn in runs:
                for graph in graphs:
                    run = CapturedSampler(fn) if graph == "captured" else fn
                    # seconds per call: two timed calls after one warm-up
                    long = "teacher" in name and batch > 8
                    with torch.no_grad(), precision(prec):
                        seconds = clock(
                            lambda: run(noise, y), repeats=2 if long else 5, warmup=1 if long else 2
                        )
                    rows.append(
                        dict(
                            model=name,
                            precision=prec,
                            batch=batch,
                            graph=graph,
                            ms_per_batch=1000 * seconds,
                            ms_per_image=1000 * seconds / batch,
                        )
                    )
    return rows


def summarise_sampling(rows, m):
    """The ratios the targets are about: ARD over step distillation, and the teacher over ARD, per
    image, for each precision, batch and way of running (both samplers eager, or both captured)."""

    def get(name, prec, batch, graph):
        return next(
            r["ms_per_image"]
            for r in rows
            if r["model"].startswith(name)
            and r["precision"] == prec
            and r["batch"] == batch
            and r["graph"] == graph
        )

    out = {}
    for prec, batch, graph in sorted({(r["precision"], r["batch"], r["graph"]) for r in rows}):
        ard, sd, teacher = (
            get(f"student N={m['N']}", prec, batch, graph),
            get("student N=0", prec, batch, graph),
            get("teacher", prec, batch, graph),
        )
        out[f"{prec}_batch{batch}_{graph}"] = {
            "ard_over_sd": ard / sd,
            "teacher_over_ard": teacher / ard,
        }
    return out


def train_step_fn(student, batch, m, device, compile=False):
    """One distillation step as train_ard.py's loop takes it: the bf16 forward pass and MSE,
    backward, clipping, the finiteness check's read-back, AdamW and the EMA update (of an EMA copy
    it makes)."""
    x, y = inputs(m, batch, device)
    traj = torch.randn(batch, m["K"], 4, m["latent"], m["latent"], device=device)
    ema = deepcopy(student)
    requires_grad(ema, False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    model = torch.compile(student) if compile else student

    def step():
        with precision("bf16"):
            loss = F.mse_loss(model(traj, y).float(), traj)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        assert math.isfinite(loss.item()) and math.isfinite(grad_norm.item())
        opt.step()
        update_ema(ema, student, 0.9999)

    return step


def training_flops(m, teacher_configuration, students):
    """FLOPs of one trajectory's training step, forward and backward, counted on `meta`."""
    with torch.device("meta"):
        meta = build_model(
            student_config(
                teacher_configuration,
                students[m["N"]].timesteps.tolist(),
                m["N"],
                list(range(m["K"] + 1)),
                "state",
                None,
                False,
            )
        )
        x = torch.randn(1, m["K"], 4, m["latent"], m["latent"])
        return count_flops(
            lambda: F.mse_loss(meta(x, torch.zeros(1, dtype=torch.long)), x).backward()
        )


def dense_peak(device):
    """The card's dense bf16 peak from its name (datasheet figures), or None."""
    return next(
        (
            p
            for name, p in DENSE_BF16_PEAK
            if device.type == "cuda" and name in torch.cuda.get_device_name()
        ),
        None,
    )


def training(m, teacher_configuration, students, device, clock):
    """The distillation step at powers-of-two batches until one does not fit, with each way of
    computing the history attention (ard_models.HISTORY_ATTENTION): trajectories/s, peak memory,
    TFLOPs."""
    flops_per_traj, peak = training_flops(m, teacher_configuration, students), dense_peak(device)
    rows = []
    student = students[m["N"]]
    for mode in HISTORY_ATTENTION:
        student.history_attention = mode
        batch = 8 if device.type == "cuda" else 2
        while batch <= (1024 if device.type == "cuda" else 2):
            student.train()
            try:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                seconds = clock(train_step_fn(student, batch, m, device), repeats=5, warmup=2)
            except torch.OutOfMemoryError:
                rows.append(dict(history_attention=mode, batch=batch, fits=False))
                break
            achieved = flops_per_traj * batch / seconds
            rows.append(
                dict(
                    history_attention=mode,
                    batch=batch,
                    fits=True,
                    trajectories_per_s=batch / seconds,
                    ms_per_step=1000 * seconds,
                    peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30
                    if device.type == "cuda"
                    else None,
                    achieved_tflops=achieved / 1e12,
                    share_of_dense_bf16_peak=achieved / peak if peak else None,
                )
            )
            batch *= 2
    student.history_attention = "mask"
    student.eval()
    return {"flops_per_trajectory": flops_per_traj, "dense_bf16_peak": peak, "batches": rows}


@torch.no_grad()
def trajectories(m, teacher, device, clock):
    """The teacher's trajectory writing rate: DDIM 25 at CFG 1.5 in bf16, every fifth state and x0
    kept."""
    noise, y = inputs(m, m["batch"], device)
    sampler = TeacherSampler(teacher, dict(space="latent"), "ddim", 25, 1.5)
    with precision("bf16"):
        seconds = clock(
            lambda: sampler.trajectory(noise, y, list(range(0, 26, 5))), repeats=2, warmup=1
        )
    return {"batch": m["batch"], "trajectories_per_s": m["batch"] / seconds}


@torch.no_grad()
def flow_teacher(m, teacher, device, clock):
    """The same weights read as a flow teacher in SiT's convention: its trajectory writing rate with
    Heun over 13 steps (25 evaluations, as DDIM 25) at CFG 1.5 in bf16, and its bf16 sample against
    the fp32 one."""
    config = dict(space="latent", prediction="velocity", noise_at=0.0, time_scale=1.0)
    noise, y = inputs(m, m["batch"], device)
    sampler = TeacherSampler(teacher, config, "heun", 13, 1.5)
    with precision("bf16"):
        seconds = clock(lambda: sampler.trajectory(noise, y, [0, 3, 6, 9, 13]), repeats=2, warmup=1)
    samples = {}
    for name in ("fp32", "bf16"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=name == "bf16"):
            samples[name] = sampler(noise[:8], y[:8])
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return {
        "batch": m["batch"],
        "heun13_trajectories_per_s": m["batch"] / seconds,
        "bf16_vs_fp32_sample_rel": rel(samples["bf16"], samples["fp32"]),
    }


#################################################################################
#                        The scripts end to end                                 #
#################################################################################


def make_inputs(m, root):
    """A random SD-VAE-shaped AutoencoderKL saved locally, a teacher checkpoint in train.py's format
    that names it, and a tiny ImageFolder for the GAN stage's real images."""
    from diffusers import AutoencoderKL
    from PIL import Image

    blocks = m["vae_blocks"]
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=blocks,
        layers_per_block=1 if len(blocks) < 4 else 2,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        norm_num_groups=min(32, blocks[0]),
        sample_size=m["image"],
    )
    vae.save_pretrained(os.path.join(root, "vae"))
    side = m["image"] // 2 ** (len(blocks) - 1)
    assert side == m["latent"], (
        f"the VAE maps {m['image']} to {side}, the model expects {m['latent']}"
    )
    config = teacher_config(
        m["model"],
        m["latent"],
        4,
        m["classes"],
        True,
        "latent",
        os.path.join(root, "vae"),
        m["image"],
        None,
    )
    teacher = randomise_weights(build_model(config))
    save_checkpoint(
        os.path.join(root, "teacher.pt"),
        {
            "model": teacher.state_dict(),
            "ema": teacher.state_dict(),
            "step": 0,
            "args": {},
            "config": config,
        },
    )
    # The same weights read as a flow teacher in SiT's convention (t = 0 noise, t fed as it is,
    # learned sigma).
    flow = dict(config, prediction="velocity", noise_at=0.0, time_scale=1.0)
    save_checkpoint(
        os.path.join(root, "flow_teacher.pt"),
        {
            "model": teacher.state_dict(),
            "ema": teacher.state_dict(),
            "step": 0,
            "args": {},
            "config": flow,
        },
    )
    rng = np.random.default_rng(0)
    for c in range(2):
        os.makedirs(os.path.join(root, "images", f"class{c}"))
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (m["image"], m["image"], 3), dtype=np.uint8)).save(
                os.path.join(root, "images", f"class{c}", f"{i}.png")
            )


def scripts(m, device, log):
    """train_teacher_traj.py -> train_ard.py (torchrun) -> train_ard.py --gan -> sample_ddp.py ->
    evaluator checks, in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as root:
        return run_scripts(m, device, root, log)


def run_scripts(m, device, root, log):
    make_inputs(m, root)
    p = lambda *parts: os.path.join(root, *parts)  # noqa: E731
    common = [
        "--teacher-ckpt",
        p("teacher.pt"),
        "--traj",
        p("traj"),
        "--history-layers",
        str(m["N"]),
        "--global-batch-size",
        "4",
        "--precision",
        "bf16",
        "--log-every",
        "1",
        "--ckpt-every",
        "3",
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    steps = [
        (
            "trajectories",
            [
                sys.executable,
                "train_teacher_traj.py",
                "--ckpt",
                p("teacher.pt"),
                "--out",
                p("traj"),
                "--num-trajectories",
                "16",
                "--batch-size",
                "8",
                "--shard-size",
                "8",
                "--save-steps",
                "student:4",
                "--precision",
                "bf16",
            ],
        ),
        (
            "distil (torchrun)",
            [
                *torchrun,
                "train_ard.py",
                *common,
                "--max-steps",
                "3",
                "--sample-every",
                "3",
                "--run-dir",
                p("student"),
            ],
        ),
        (
            "GAN stage",
            [
                sys.executable,
                "train_ard.py",
                *common,
                "--gan",
                "--init-ckpt",
                p("student", "checkpoints", "0000003.pt"),
                "--max-steps",
                "2",
                "--gan-warmup",
                "0",
                "--data",
                p("images"),
                "--image-size",
                str(m["image"]),
                "--num-workers",
                "0",
                "--sample-every",
                "0",
                "--run-dir",
                p("gan"),
            ],
        ),
        (
            "sample_ddp",
            [
                sys.executable,
                "sample_ddp.py",
                "--ckpt",
                p("gan", "checkpoints", "0000002.pt"),
                "--out",
                p("samples.npz"),
                "--num-samples",
                "8",
                "--per-proc-batch-size",
                "4",
                "--chunk-size",
                "4",
                "--precision",
                "bf16",
            ],
        ),
        (
            "flow trajectories (Heun)",
            [
                sys.executable,
                "train_teacher_traj.py",
                "--ckpt",
                p("flow_teacher.pt"),
                "--out",
                p("flow_traj"),
                "--solver",
                "heun",
                "--num-sampling-steps",
                "13",
                "--num-trajectories",
                "16",
                "--batch-size",
                "8",
                "--shard-size",
                "8",
                "--save-steps",
                "all",
                "--precision",
                "bf16",
            ],
        ),
        (
            "flow distil",
            [
                sys.executable,
                "train_ard.py",
                "--teacher-ckpt",
                p("flow_teacher.pt"),
                "--traj",
                p("flow_traj"),
                *common[4:],
                "--max-steps",
                "2",
                "--sample-every",
                "2",
                "--run-dir",
                p("flow_student"),
            ],
        ),
        (
            "flow teacher sample_ddp",
            [
                sys.executable,
                "sample_ddp.py",
                "--ckpt",
                p("flow_teacher.pt"),
                "--out",
                p("flow_samples.npz"),
                "--sampler",
                "heun",
                "--num-sampling-steps",
                "4",
                "--guidance-interval",
                "0",
                "0.7",
                "--num-samples",
                "8",
                "--per-proc-batch-size",
                "4",
                "--chunk-size",
                "4",
                "--precision",
                "bf16",
            ],
        ),
    ]
    results = {}
    for name, cmd in steps:
        start = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
        results[name] = {"ok": proc.returncode == 0, "seconds": time.time() - start}
        if proc.returncode != 0:
            results[name]["tail"] = (proc.stdout + proc.stderr)[-1500:]
            return results
    results["evaluator"] = evaluator_check(p("samples.npz"), m, device)
    return results


def evaluator_check(samples, m, device):
    """The evaluator's input checks on the samples, and its Inception features on the device (random
    weights: the official ones cannot be downloaded here), so no evaluator path has a device-only
    crash."""
    from evaluator.__main__ import load_batch

    batch = load_batch(samples)
    out = {
        "images": list(batch["arr_0"].shape),
        "labels": list(batch["arr_1"].shape),
        "ok": list(batch["arr_0"].shape) == [8, m["image"], m["image"], 3],
    }
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return dict(out, inception="torch-fidelity is not installed: features not checked")
    with tempfile.TemporaryDirectory() as tmp:
        weights = random_inception_weights(tmp)
        from evaluator.inception import InceptionFeatures

        features = InceptionFeatures(weights, str(device), verify=False)(batch["arr_0"])
    return dict(out, inception={k: list(v.shape) for k, v in features.items()})


def random_inception_weights(folder):
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fid

    with (
        mock.patch.object(fid, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(
            fid.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None
        ),
    ):
        net = fid.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = os.path.join(folder, "random-inception.pth")
    torch.save(net.state_dict(), path)
    return path


#################################################################################
#                                   Compile                                     #
#################################################################################


def compiled(m, teacher_configuration, students, device, clock, train_batch):
    """Graph breaks of the student's teacher-forced forward, its compiled against eager time, and a
    compiled training step at the given batch (the lever on the share of the peak)."""
    student = students[m["N"]]
    noise, y = inputs(m, m["batch"], device)
    x = torch.cat([noise[:, None]] * m["K"], dim=1)
    with precision("bf16"):  # graph breaks do not depend on the batch: explain a small one
        explanation = torch._dynamo.explain(student)(x[:2], y[:2])
    out = {
        "graph_breaks": explanation.graph_break_count,
        "graphs": explanation.graph_count,
        "break_reasons": [str(b.reason)[:200] for b in explanation.break_reasons],
    }
    torch._dynamo.reset()
    fast = torch.compile(student)
    with torch.no_grad(), precision("bf16"):
        start = time.time()
        fast(x, y)
        compile_s = time.time() - start
        out["forward"] = {
            "batch": m["batch"],
            "eager_ms": 1000 * clock(lambda: student(x, y)),
            "compiled_ms": 1000 * clock(lambda: fast(x, y)),
            "compile_s": compile_s,
        }
    flops, peak = training_flops(m, teacher_configuration, students), dense_peak(device)
    out["train_step"] = {}
    for mode in HISTORY_ATTENTION:
        torch._dynamo.reset()
        student.history_attention = mode
        step = train_step_fn(student.train(), train_batch, m, device, compile=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.time()
        step()
        compile_s = time.time() - start
        seconds = clock(step, repeats=5, warmup=1)
        out["train_step"][mode] = {
            "batch": train_batch,
            "trajectories_per_s": train_batch / seconds,
            "ms_per_step": 1000 * seconds,
            "compile_s": compile_s,
            "achieved_tflops": flops * train_batch / seconds / 1e12,
            "share_of_dense_bf16_peak": flops * train_batch / seconds / peak if peak else None,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30
            if device.type == "cuda"
            else None,
        }
        del step
    student.history_attention = "mask"
    student.eval()
    return out


#################################################################################
#                                   Report                                      #
#################################################################################


def markdown(report):
    m, lines = report["mode"], []
    lines.append(
        f"Device: {report['device']} (PyTorch {report['torch']}). Model {m['model']}, latents "
        f"4x{m['latent']}x{m['latent']}, K = {m['K']}, N = {m['N']}; random weights.\n"
    )
    if "sampling" in report:
        lines += [
            "| sampler | precision | batch | run | ms / batch | ms / image |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['model']} | {r['precision']} | {r['batch']} | {r['graph']} | "
            f"{r['ms_per_batch']:.2f} | {r['ms_per_image']:.3f} |"
            for r in report["sampling"]
        ]
        lines += (
            [""]
            + [
                f"- {k}: ARD / step distillation {v['ard_over_sd']:.3f}, teacher / ARD "
                f"{v['teacher_over_ard']:.2f}"
                for k, v in report["sampling_ratios"].items()
            ]
            + [""]
        )
    if "training" in report:
        t = report["training"]
        lines += [
            f"Training step, {t['flops_per_trajectory'] / 1e12:.3f} TFLOPs per trajectory "
            "(forward + backward):",
            "",
            "| history attention | batch | trajectories / s | ms / step | peak GiB | TFLOPs | "
            "share of dense bf16 peak |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in t["batches"]:
            if r["fits"]:
                share = (
                    f"{100 * r['share_of_dense_bf16_peak']:.1f}%"
                    if r["share_of_dense_bf16_peak"]
                    else "-"
                )
                mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
                lines.append(
                    f"| {r['history_attention']} | {r['batch']} | {r['trajectories_per_s']:.1f} | "
                    f"{r['ms_per_step']:.1f} | {mem} | {r['achieved_tflops']:.1f} | {share} |"
                )
            else:
                lines.append(f"| {r['history_attention']} | {r['batch']} | does not fit | | | | |")
        lines.append("")
    if "trajectories" in report:
        lines.append(
            "Trajectory writing (DDIM 25, CFG 1.5, bf16, batch "
            f"{report['trajectories']['batch']}): "
            f"{report['trajectories']['trajectories_per_s']:.1f} trajectories/s\n"
        )
    if "flow" in report:
        f = report["flow"]
        lines.append(
            "Flow teacher (the same weights, SiT's convention; Heun 13 = 25 evaluations, CFG 1.5, "
            f"bf16, batch {f['batch']}): {f['heun13_trajectories_per_s']:.1f} trajectories/s; bf16 "
            f"sample vs fp32 relative error {f['bf16_vs_fp32_sample_rel']:.2e}\n"
        )
    if "numerics" in report:
        n = report["numerics"]
        lines.append(
            "Numerics: cached vs teacher-forced, relative error "
            f"{n['cached_vs_forced_fp32']['rel']:.2e} (fp32), "
            f"{n['cached_vs_forced_bf16']['rel']:.2e} (bf16); bf16 vs fp32 forward "
            f"{n['bf16_vs_fp32_forward']['rel']:.2e}; SDPA: {n['sdpa']}\n"
        )
    if "scripts" in report:
        lines.append(
            "Scripts end to end: "
            + ", ".join(
                f"{k} {'ok' if v.get('ok') else 'FAILED'}" for k, v in report["scripts"].items()
            )
            + "\n"
        )
    if "compile" in report:
        c = report["compile"]
        f = c["forward"]
        lines.append(
            f"torch.compile: {c['graph_breaks']} graph breaks in the student's forward; "
            f"teacher-forced forward at batch {f['batch']} {f['eager_ms']:.1f} -> "
            f"{f['compiled_ms']:.1f} ms (compiled in {f['compile_s']:.0f} s).\n"
        )
        for mode, t in c["train_step"].items():
            share = (
                f", {100 * t['share_of_dense_bf16_peak']:.1f}% of the dense bf16 peak"
                if t["share_of_dense_bf16_peak"]
                else ""
            )
            mem = (
                f", peak {t['peak_memory_gib']:.1f} GiB" if t["peak_memory_gib"] is not None else ""
            )
            lines.append(
                f"- compiled training step, history attention {mode}, batch {t['batch']}: "
                f"{t['trajectories_per_s']:.1f} trajectories/s, {t['achieved_tflops']:.1f} "
                f"TFLOPs{share}{mem} (compiled in {t['compile_s']:.0f} s)"
            )
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", required=True, help="folder for gpu_check.json, gpu_check.md and the scripts' log"
    )
    parser.add_argument(
        "--cpu", action="store_true", help="tiny shapes on the CPU: checks that every section runs"
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also the torch.compile section",
    )
    parser.add_argument(
        "--train-batch",
        type=positive_int,
        default=None,
        help="batch of the compiled training step (default: the largest that fitted in the "
        "training section)",
    )
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        help="sections to leave out",
        choices=["numerics", "sampling", "training", "trajectories", "flow", "scripts"],
    )
    return parser.parse_args(argv)


def main(args):
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    m = MODES["cpu" if device.type == "cpu" else "gpu"]
    os.makedirs(args.out, exist_ok=True)
    report = {
        "mode": m,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
        "torch": torch.__version__,
    }
    clock, start = Clock(device), time.time()
    teacher_configuration, teacher, students = build(m, device)

    def section(name, fn):
        if name in args.skip:
            return
        t0 = time.time()
        report[name] = fn()
        report.setdefault("seconds", {})[name] = time.time() - t0
        write_json(os.path.join(args.out, "gpu_check.json"), report)
        print(f"[{name}] {time.time() - t0:.1f} s (total {time.time() - start:.0f} s)", flush=True)

    section("numerics", lambda: numerics(m, students, device))
    section("sampling", lambda: sampling(m, teacher, students, device, clock))
    if "sampling" in report:
        report["sampling_ratios"] = summarise_sampling(report["sampling"], m)
    section("training", lambda: training(m, teacher_configuration, students, device, clock))
    section("trajectories", lambda: trajectories(m, teacher, device, clock))
    section("flow", lambda: flow_teacher(m, teacher, device, clock))
    if args.compile:
        fits = [r["batch"] for r in report.get("training", {}).get("batches", []) if r["fits"]]
        batch = args.train_batch or max(fits, default=32 if device.type == "cuda" else 2)
        section(
            "compile", lambda: compiled(m, teacher_configuration, students, device, clock, batch)
        )
    teacher = students = (
        None  # the scripts are processes of their own: give them the device's memory
    )
    if device.type == "cuda":
        torch.cuda.empty_cache()
    section("scripts", lambda: scripts(m, device, os.path.join(args.out, "scripts.log")))
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main(parse_args())
