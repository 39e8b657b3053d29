"""Sampling a diffusion or flow model, as a library: classifier-free guidance, the sampler registry
(one signature for all: see ode.py and flow.py), ADM's clip rule, and the cost of each sampler in
model evaluations. What a checkpoint's config means for sampling, and the command-line flags, live
in ard/generation.py."""

import torch

from .flow import sample_flow_euler, sample_flow_heun
from .ode import sample_ddim, sample_heun

SPACES = ("pixel", "latent")


def model_evaluations(sampler, num_steps):
    """Model evaluations of a teacher's sampler over S steps (each doubled by guidance): Heun takes
    two per step and one on the last, the others one per step."""
    return 2 * num_steps - 1 if sampler == "heun" else num_steps


def guided_model_fn(model, cfg_scale, legacy_cfg=False, active=None):
    """A model function (x, t, y) -> output on a plain batch, with classifier-free guidance at
    cfg_scale (models.DiT.forward_with_cfg). Scale 1 is the conditional model alone, as in DiT's
    sample.py. active(t), for a float model time, limits guidance to an interval of times (REPA's
    guidance interval); outside it the conditional model runs alone. A solver feeds every sample of
    a batch the same time; one that knows it on the host asks `fn.at_time(t)` for the function of
    that time (flow.velocity does), so that no step reads the time back from the device (which a
    captured CUDA graph forbids); called directly, fn reads t[0]."""
    if cfg_scale == 1.0:
        return model

    def guided(x, t, y):
        y_null = torch.full_like(y, model.num_classes)
        out = model.forward_with_cfg(
            torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]), cfg_scale, legacy_cfg
        )
        return out[: len(x)]

    if active is None:
        return guided

    def fn(x, t, y):
        return fn.at_time(float(t[0]))(x, t, y)

    fn.at_time = lambda t: guided if active(t) else model
    return fn


@torch.no_grad()
def sample_ddpm(diffusion, model, noise, model_kwargs=None, clip_denoised=False, callback=None):
    """Ancestral (DDPM) sampling, ADM's p_sample_loop, behind the solvers' signature. It is
    stochastic: its noise comes from the global generator, and it exposes no trajectory."""
    if callback is not None:
        raise ValueError(
            "ancestral sampling is not an ODE solver and exposes no trajectory: use ddim or heun"
        )
    return diffusion.p_sample_loop(
        model,
        noise.shape,
        noise=noise,
        clip_denoised=clip_denoised,
        model_kwargs=model_kwargs,
        device=noise.device,
    )


# Deterministic solvers can write trajectories. DDIM (eta 0) is Euler's method on the ODE of either
# process (ode.py, flow.py), so "ddim" and "euler" name the same first-order step; Heun is its
# second-order correction.
SOLVERS = {"ddim": sample_ddim, "euler": sample_ddim, "heun": sample_heun}
SAMPLERS = {**SOLVERS, "ddpm": sample_ddpm}
FLOW_SOLVERS = {"ddim": sample_flow_euler, "euler": sample_flow_euler, "heun": sample_flow_heun}


def clip_denoised(space):
    """ADM clips the x0 prediction to [-1, 1] at every step in pixel space; DiT does not clip
    latents."""
    if space not in SPACES:
        raise ValueError(f"unknown space {space!r}: use one of {SPACES}")
    return space == "pixel"
