"""Deterministic probability-flow ODE solvers that expose the whole trajectory.

Every solver has one signature, in the manner of k-diffusion's samplers:

    x_final = solver(diffusion, model, noise, model_kwargs=None, clip_denoised=False, callback=None)

and walks the S steps of a (respaced) `diffusion` from its noisiest timestep down to t = 0. After
the model has been evaluated at state s (s = 0 is the noise, s = S the final sample), `callback`
receives {"step": s, "t": the model timestep of that state (-1 for the final sample), "x": the
state, "denoised": the x0 prediction at it}; the final sample is its own x0 prediction. `trajectory`
collects those into stacked tensors.

In the variables x_bar = x / sqrt(alpha_bar) and sigma = sqrt(1 / alpha_bar - 1) the ODE reads
d x_bar / d sigma = eps(x, t): DDIM with eta = 0 is its Euler method (Song et al., 2021; Karras et
al., 2022), Heun its second-order trapezoidal correction.
"""

import numpy as np
import torch

# the timestep recorded for the final (clean) sample, which the model never sees
FINAL_TIMESTEP = -1


def model_timesteps(diffusion):
    """The original model timestep of each solver state but the last, noisiest first:
    [999, 957, ..., 0] for '25'. A flow (diffusion/flow.py) gives its model times instead."""
    if hasattr(diffusion, "model_times"):
        return diffusion.model_times()
    timestep_map = getattr(diffusion, "timestep_map", list(range(diffusion.num_timesteps)))
    return [int(t) for t in timestep_map[::-1]]


def solver_grid(diffusion):
    """The timestep of every solver state, the noise first and the final sample
    (FINAL_TIMESTEP) last: S + 1 values."""
    return model_timesteps(diffusion) + [FINAL_TIMESTEP]


def _denoise(diffusion, model, x, i, model_kwargs, clip_denoised):
    """x0 prediction and the noise consistent with it, at respaced index i."""
    t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
    x0 = diffusion.p_mean_variance(
        model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs
    )["pred_xstart"]
    return x0, diffusion._predict_eps_from_xstart(x, t, x0)


def _sigma(diffusion, i):
    """sigma of respaced index i; index -1 stands for the clean end point, sigma = 0."""
    return 0.0 if i < 0 else float(np.sqrt(1.0 / diffusion.alphas_cumprod[i] - 1.0))


@torch.no_grad()
def _integrate(diffusion, model, noise, model_kwargs, clip_denoised, callback, update):
    """The loop every solver shares: evaluate the model at each state, report it to the callback,
    and move to the next state with update(x, x0, eps, i) (i is the respaced index of x); the final
    sample is reported last."""
    timesteps = model_timesteps(diffusion)
    x = noise
    for step, i in enumerate(range(diffusion.num_timesteps - 1, -1, -1)):
        x0, eps = _denoise(diffusion, model, x, i, model_kwargs, clip_denoised)
        if callback is not None:
            callback({"step": step, "t": timesteps[step], "x": x, "denoised": x0})
        x = update(x, x0, eps, i)
    if callback is not None:
        callback({"step": diffusion.num_timesteps, "t": FINAL_TIMESTEP, "x": x, "denoised": x})
    return x


def sample_ddim(diffusion, model, noise, model_kwargs=None, clip_denoised=False, callback=None):
    """DDIM with eta = 0: one model evaluation per step, S evaluations in all."""

    def update(x, x0, eps, i):
        ac_prev = diffusion.alphas_cumprod_prev[i]
        return x0 * float(np.sqrt(ac_prev)) + float(np.sqrt(1.0 - ac_prev)) * eps

    return _integrate(diffusion, model, noise, model_kwargs, clip_denoised, callback, update)


def sample_heun(diffusion, model, noise, model_kwargs=None, clip_denoised=False, callback=None):
    """Heun's second-order method on the same grid: two evaluations per step, one on
    the last (Euler) step."""

    def update(x, x0, eps, i):
        sigma, sigma_next = _sigma(diffusion, i), _sigma(diffusion, i - 1)
        x_bar_next = x * float(np.sqrt(1 + sigma**2)) + (sigma_next - sigma) * eps
        if i > 0:
            x_next = x_bar_next / float(np.sqrt(1 + sigma_next**2))
            _, eps_next = _denoise(diffusion, model, x_next, i - 1, model_kwargs, clip_denoised)
            x_bar_next = x * float(np.sqrt(1 + sigma**2)) + (sigma_next - sigma) * 0.5 * (
                eps + eps_next
            )
        return x_bar_next / float(np.sqrt(1 + sigma_next**2))

    return _integrate(diffusion, model, noise, model_kwargs, clip_denoised, callback, update)


def trajectory(solver, diffusion, model, noise, model_kwargs=None, clip_denoised=False, steps=None):
    """Runs `solver` and returns (xt, x0), each (B, J, *noise.shape[1:]): the states and x0
    predictions at the solver states listed in `steps` (default: all S + 1 of them), ordered from
    the noise to the sample."""
    steps = list(range(diffusion.num_timesteps + 1)) if steps is None else list(steps)
    wanted = set(steps)
    states, denoised = {}, {}

    def keep(info):
        if info["step"] in wanted:
            states[info["step"]] = info["x"]
            denoised[info["step"]] = info["denoised"]

    solver(
        diffusion,
        model,
        noise,
        model_kwargs=model_kwargs,
        clip_denoised=clip_denoised,
        callback=keep,
    )
    xt = torch.stack([states[s] for s in steps], dim=1)
    x0 = torch.stack([denoised[s] for s in steps], dim=1)
    return xt, x0
