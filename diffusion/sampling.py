"""How a model samples, in one place: classifier-free guidance, the sampler registry (one signature for
all, see ode.py), the clip rule, and the function that turns noise and labels into images for a teacher
(any sampler, S steps, guidance) or for an ARD student (its own K steps, no guidance)."""

import argparse

import torch

from cli import UserError, diffusion_steps, non_negative_float

from . import create_diffusion
from .ode import sample_ddim, sample_heun, trajectory

SPACES = ("pixel", "latent")


def guided_model_fn(model, cfg_scale, legacy_cfg=False):
    """A model function (x, t, y) -> output on a plain batch, with classifier-free guidance at cfg_scale
    (models.DiT.forward_with_cfg). Scale 1 is the conditional model alone, as in DiT's sample.py."""
    if cfg_scale == 1.0:
        return model

    def fn(x, t, y):
        y_null = torch.full_like(y, model.num_classes)
        out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]), cfg_scale, legacy_cfg)
        return out[: len(x)]

    return fn


@torch.no_grad()
def sample_ddpm(diffusion, model, noise, model_kwargs=None, clip_denoised=False, callback=None):
    """Ancestral (DDPM) sampling, ADM's p_sample_loop, behind the solvers' signature. It is stochastic:
    its noise comes from the global generator, and it exposes no trajectory."""
    if callback is not None:
        raise UserError("ancestral sampling is not an ODE solver and exposes no trajectory: use ddim or heun")
    return diffusion.p_sample_loop(model, noise.shape, noise=noise, clip_denoised=clip_denoised,
                                   model_kwargs=model_kwargs, device=noise.device)


SOLVERS = {"ddim": sample_ddim, "heun": sample_heun}  # deterministic: these can write trajectories
SAMPLERS = {**SOLVERS, "ddpm": sample_ddpm}


def clip_denoised(space):
    """ADM clips the x0 prediction to [-1, 1] at every step in pixel space; DiT does not clip latents."""
    if space not in SPACES:
        raise ValueError(f"unknown space {space!r}: use one of {SPACES}")
    return space == "pixel"


class TeacherSampler:
    """A DiT teacher's sampler: `sampler` over S steps of DiT's respacing, guidance at cfg_scale, the clip
    rule of its space. Calling it maps noise (N, C, H, W) and labels (N,) to samples; `trajectory`
    returns the states and x0 predictions at chosen solver steps."""

    def __init__(self, model, space, sampler="ddim", num_steps=25, cfg_scale=1.5, legacy_cfg=False):
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
        self.solver = SAMPLERS[sampler]
        self.diffusion = create_diffusion(str(num_steps))
        self.model_fn = guided_model_fn(model, cfg_scale, legacy_cfg)
        self.clip = clip_denoised(space)

    @torch.no_grad()
    def __call__(self, noise, y):
        return self.solver(self.diffusion, self.model_fn, noise, model_kwargs=dict(y=y), clip_denoised=self.clip)

    def trajectory(self, noise, y, steps=None):
        """(xt, x0), each (N, J, C, H, W), at the solver steps listed (default all), noise first."""
        return trajectory(self.solver, self.diffusion, self.model_fn, noise, dict(y=y), clip_denoised=self.clip, steps=steps)


def sample_fn(model, config, sampler="ddim", num_steps=25, cfg_scale=1.5, legacy_cfg=False):
    """noise, y -> samples for a model loaded with checkpoints.load_model: a teacher samples with the given
    sampler and guidance, a student in its own K steps (the other arguments do not apply to it)."""
    if config["kind"] == "ard":
        return lambda noise, y: model.sample(noise, y)[:, -1]
    return TeacherSampler(model, config["space"], sampler, num_steps, cfg_scale, legacy_cfg)


def add_sampler_arguments(parser, flag="--sampler", choices=SAMPLERS, note=""):
    """The teacher-sampling flags every sampling script takes: the sampler (--solver where only ODE solvers
    will do), S, the guidance scale and official DiT's legacy guidance. `note` prefixes their help."""
    parser.add_argument(flag, type=str, choices=list(choices), default="ddim",
                        help=f"{note}deterministic DDIM (eta 0), Heun on the same ODE" + (", or ancestral DDPM" if "ddpm" in choices else ""))
    parser.add_argument("--num-sampling-steps", type=diffusion_steps, default=25, help=f"{note}S, the steps of DiT's respaced grid")
    parser.add_argument("--cfg-scale", type=non_negative_float, default=1.5, help=f"{note}classifier-free guidance scale (1: none)")
    parser.add_argument("--legacy-cfg", action=argparse.BooleanOptionalAction, default=False,
                        help=f"{note}guide only the first 3 noise channels, as official DiT does")
