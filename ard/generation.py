"""How a checkpoint generates images: the noise process its config describes (DiT's diffusion or a
flow in its time convention), a teacher's sampler (any solver, S steps, guidance), a student's own K
steps, the sampling scripts' flags, and the choice of replaying the sampler as a CUDA graph. The
solvers themselves are diffusion/'s; this module turns a checkpoint and the command line into calls
of them."""

import argparse

import torch

from ard.cli import UserError, diffusion_steps, non_negative_float, unit_float
from ard.graphs import CapturedSampler
from diffusion import create_diffusion
from diffusion.flow import FlowMatching
from diffusion.ode import trajectory
from diffusion.sampling import FLOW_SOLVERS, SAMPLERS, clip_denoised, guided_model_fn

# What a teacher predicts: DiT's noise (with or without a learned variance), or a flow's velocity.
PREDICTIONS = ("eps", "velocity")


def teacher_flow(config, num_steps=None):
    """The linear flow, in its time convention and over S uniform solver steps, of a velocity
    teacher's config (a checkpoint's, or a store's manifest); None for a noise-predicting (DiT)
    teacher."""
    prediction = config.get("prediction", "eps")  # configs from before flow teachers predict noise
    if prediction not in PREDICTIONS:
        raise UserError(
            f"unknown prediction type {prediction!r} in the checkpoint config: "
            f"use one of {PREDICTIONS}"
        )
    if prediction != "velocity":
        return None
    return FlowMatching(num_steps, config["noise_at"], config["time_scale"])


def teacher_process(config, num_steps=None):
    """The noise process of a teacher config over S solver steps (None: every training timestep):
    DiT's diffusion respaced to S steps for a noise-predicting model, or the linear flow in its
    convention."""
    flow = teacher_flow(config, num_steps)
    if flow is not None:
        return flow
    respacing = "" if num_steps is None else str(num_steps)
    return create_diffusion(respacing, learn_sigma=config.get("learn_sigma", True))


class TeacherSampler:
    """A teacher's sampler: `sampler` over S steps of its process (DiT's respacing, or a flow's
    uniform grid), guidance at cfg_scale (for a flow, optionally only at noise levels inside
    guidance_interval = (low, high)), the clip rule of its space. `config` is the teacher's
    checkpoint config (its space and prediction type). Calling it maps noise (N, C, H, W) and labels
    (N,) to samples; `trajectory` returns the states and x0 predictions at chosen solver steps."""

    def __init__(
        self,
        model,
        config,
        sampler="ddim",
        num_steps=25,
        cfg_scale=1.5,
        legacy_cfg=False,
        guidance_interval=None,
    ):
        self.diffusion = teacher_process(config, num_steps)
        flow = isinstance(self.diffusion, FlowMatching)
        solvers = FLOW_SOLVERS if flow else SAMPLERS
        if sampler not in solvers:
            kind = "a flow teacher" if flow else "a DiT teacher"
            raise UserError(f"{sampler!r} does not sample {kind}: use one of {', '.join(solvers)}")
        self.solver = solvers[sampler]
        active = None
        if guidance_interval is not None:
            if not flow:
                raise UserError(
                    "--guidance-interval is defined on a flow teacher's noise levels: "
                    "drop it for a DiT teacher"
                )
            low, high = guidance_interval
            if low > high:
                raise UserError(
                    f"--guidance-interval {low} {high} is empty: give the lower noise level first"
                )

            def active(t):
                return low <= self.diffusion.noise_level(t) <= high

        self.model_fn = guided_model_fn(model, cfg_scale, legacy_cfg, active)
        self.clip = clip_denoised(config["space"])

    @torch.no_grad()
    def __call__(self, noise, y):
        return self.solver(
            self.diffusion, self.model_fn, noise, model_kwargs=dict(y=y), clip_denoised=self.clip
        )

    def trajectory(self, noise, y, steps=None):
        """(xt, x0), each (N, J, C, H, W), at the solver steps listed (default all), noise first."""
        return trajectory(
            self.solver,
            self.diffusion,
            self.model_fn,
            noise,
            dict(y=y),
            clip_denoised=self.clip,
            steps=steps,
        )


def sample_fn(
    model,
    config,
    sampler="ddim",
    num_steps=25,
    cfg_scale=1.5,
    legacy_cfg=False,
    guidance_interval=None,
    cuda_graph=False,
):
    """noise, y -> samples for a model loaded with checkpoints.load_model: a teacher samples with
    the given sampler and guidance, a student in its own K steps (the other arguments do not apply
    to it). cuda_graph=True replays the whole sampler as a CUDA graph recorded per batch shape
    (ard.graphs.CapturedSampler)."""
    if config["kind"] == "ard":

        def fn(noise, y):
            return model.sample(noise, y)[:, -1]

    else:
        fn = TeacherSampler(
            model, config, sampler, num_steps, cfg_scale, legacy_cfg, guidance_interval
        )
        if cuda_graph and sampler == "ddpm":
            raise UserError(
                "ancestral (ddpm) sampling draws new noise at every step, which a replayed graph "
                "would repeat: drop --cuda-graph or use ddim or heun"
            )
    return CapturedSampler(fn) if cuda_graph else fn


def add_graph_argument(parser):
    """--cuda-graph, for the sampling scripts."""
    parser.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="record the sampler once per batch shape as a CUDA graph and replay it (GPU only; "
        "the same kernels without a Python launch each, for small batches)",
    )


def check_graph_device(args, device):
    """One sentence, before any model is loaded, when --cuda-graph cannot run on the device."""
    if args.cuda_graph and device.type != "cuda":
        raise UserError(
            f"--cuda-graph replays CUDA graphs and needs a CUDA device, not {device.type}: drop it"
        )


def add_sampler_arguments(parser, flag="--sampler", choices=SAMPLERS, note=""):
    """The teacher-sampling flags every sampling script takes: the sampler (--solver where only ODE
    solvers will do), S, the guidance scale and official DiT's legacy guidance. `note` prefixes
    their help."""
    parser.add_argument(
        flag,
        type=str,
        choices=list(choices),
        default="ddim",
        help=f"{note}deterministic DDIM (eta 0; for a flow teacher the same as euler), Heun on the "
        "same ODE" + (", or ancestral DDPM (DiT teachers)" if "ddpm" in choices else ""),
    )
    parser.add_argument(
        "--num-sampling-steps",
        type=diffusion_steps,
        default=25,
        help=f"{note}S, the solver steps: of DiT's respaced grid (a flow teacher's: uniform in t)",
    )
    parser.add_argument(
        "--cfg-scale",
        type=non_negative_float,
        default=1.5,
        help=f"{note}classifier-free guidance scale (1: none)",
    )
    parser.add_argument(
        "--legacy-cfg",
        action=argparse.BooleanOptionalAction,
        default=False,
        help=f"{note}guide only the first 3 noise channels, as official DiT (and SiT) does",
    )
    parser.add_argument(
        "--guidance-interval",
        type=unit_float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=None,
        help=f"{note}flow teachers: guide only at noise levels in [LOW, HIGH] (0 data, 1 noise); "
        "REPA's --guidance-high 0.7 is 0 0.7",
    )
