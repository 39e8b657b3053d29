"""Flow matching on the linear interpolant: the teachers of SiT (Ma et al., 2024), REPA
(Yu et al., 2025) and `train.py --objective flow`, and their deterministic ODE solvers.

Everything here works in the noise level s in [0, 1]:

    x_s = (1 - s) x0 + s eps,        dx/ds = eps - x0 =: v,        x0 = x_s - s v,

s = 1 the pure noise. A model has its own time convention, recorded in its checkpoint config (see
checkpoints.teacher_config) and read by every consumer:
  - noise_at: which end of its time is the noise. REPA (t = 1 is noise, x_t = (1 - t) x + t eps,
    the model predicts eps - x) and our flow teachers have noise_at = 1; SiT (ICPlan:
    x_t = t x + (1 - t) eps, t = 0 is noise, the model predicts x - eps) has noise_at = 0.
    Velocities are dx/dt in the model's own time, so they flip sign with the convention.
  - time_scale: what its time embedding is fed, t * time_scale with t in [0, 1]. SiT and REPA feed
    t itself (1); our flow teachers feed 1000 t, so the sinusoidal embedding resolves time as
    finely as DiT's does.
A model with learned sigma (SiT-XL/2 at 256) outputs 2C channels and only the first C are the
velocity.

The solvers share the signature and callback of ode.py (DDIM's), so the trajectory writer, the store
and the student are the same for both kinds of teacher. The grid is uniform in s
(linspace(1, 0, S + 1)), as SiT's and REPA's ODE samplers; Heun takes an Euler last step, as REPA's
does. On this interpolant the Euler step is DDIM's update with the model's x0 and eps predictions:
(1 - s') x0 + s' eps = x_s + (s' - s) v.
"""

import math

import numpy as np
import torch

from .ode import FINAL_TIMESTEP

NOISE_ENDS = (0.0, 1.0)
# The convention of flow teachers trained here (train.py --objective flow): REPA's
# direction, DiT's time scale.
NOISE_AT, TIME_SCALE = 1.0, 1000.0


class FlowMatching:
    """The linear interpolant in a model's time convention, over S uniform solver steps (S may be
    None when only training or noising is needed). `num_timesteps` is S, as a respaced
    diffusion's."""

    def __init__(self, num_steps=None, noise_at=1.0, time_scale=1.0):
        if float(noise_at) not in NOISE_ENDS:
            raise ValueError(f"noise_at must be 0 or 1, got {noise_at}")
        self.noise_at, self.time_scale = float(noise_at), float(time_scale)
        self.num_timesteps = num_steps
        # The noise level of each solver state, as host floats (torch.linspace's float64 values): a
        # sampler's steps read them without touching a tensor.
        self.levels = (
            None
            if num_steps is None
            else torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()
        )

    # The model's time and the noise level:
    def model_time(self, s):
        """The time a model is fed at noise level s (float or tensor)."""
        return self.time_scale * (s if self.noise_at == 1.0 else 1.0 - s)

    def noise_level(self, t):
        """The noise level s of a model time t; FINAL_TIMESTEP (the final
        sample, never fed) is s = 0."""
        if not torch.is_tensor(t) and t == FINAL_TIMESTEP:
            return 0.0
        u = t / self.time_scale
        return u if self.noise_at == 1.0 else 1.0 - u

    def model_times(self):
        """The model time of each solver state but the last, the noise first: S values."""
        return [float(self.model_time(s)) for s in self.levels[:-1]]

    # The interpolant:
    def q_sample(self, x0, s, noise):
        """x_s for clean x0, noise levels s (N,) and the noise."""
        s = s.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return (1 - s) * x0 + s * noise

    def velocity(self, model_fn, x, s, model_kwargs):
        """dx/ds of the model at state x and noise level s (a float): the first C output
        channels, in our sign."""
        time = float(self.model_time(s))
        t = torch.full((x.shape[0],), time, device=x.device, dtype=x.dtype)
        # see guided_model_fn: the time as t holds it, rounded on the host
        if hasattr(model_fn, "at_time"):
            model_fn = model_fn.at_time(
                float(np.float32(time)) if t.dtype == torch.float32 else time
            )
        out = model_fn(x, t, **model_kwargs)[:, : x.shape[1]]
        return out if self.noise_at == 1.0 else -out

    def training_loss(self, model, x0, y):
        """Per-sample flow-matching loss: noise levels uniform in [0, 1], MSE of the
        velocity (SiT's default 'velocity' objective, no weighting). Draws from the global
        RNG, which the loop seeds."""
        s = torch.rand(x0.shape[0], device=x0.device)
        noise = torch.randn_like(x0)
        xs = self.q_sample(x0, s, noise)
        target = noise - x0 if self.noise_at == 1.0 else x0 - noise
        out = model(xs, self.model_time(s), y)[:, : x0.shape[1]]
        return ((out - target) ** 2).mean(dim=list(range(1, x0.dim())))


def log_snr(s):
    """log(alpha^2 / sigma^2) = 2 log((1 - s) / s) of the linear interpolant at
    noise level s in (0, 1)."""
    return 2.0 * math.log((1.0 - s) / s)


def _denoise(flow, model_fn, x, s, model_kwargs, clip_denoised):
    """(x0 prediction, velocity consistent with it) at noise level s. The clip, as ADM's
    clip_denoised, clamps x0 to [-1, 1] and moves the velocity with it: v = (x - x0) / s keeps x on
    the line from x0 to the noise."""
    v = flow.velocity(model_fn, x, s, model_kwargs)
    x0 = x - s * v
    if clip_denoised:
        x0 = x0.clamp(-1, 1)
        v = (x - x0) / s
    return x0, v


@torch.no_grad()
def _integrate(flow, model_fn, noise, model_kwargs, clip_denoised, callback, heun):
    """Euler (heun=False) or Heun over the uniform grid, reporting each state as
    ode._integrate does."""
    model_kwargs = model_kwargs or {}
    levels, times = flow.levels, flow.model_times()
    x = noise
    for step in range(flow.num_timesteps):
        s, s_next = levels[step], levels[step + 1]
        x0, v = _denoise(flow, model_fn, x, s, model_kwargs, clip_denoised)
        if callback is not None:
            callback({"step": step, "t": times[step], "x": x, "denoised": x0})
        x_next = x + (s_next - s) * v
        if heun and s_next > 0:
            _, v_next = _denoise(flow, model_fn, x_next, s_next, model_kwargs, clip_denoised)
            x_next = x + (s_next - s) * 0.5 * (v + v_next)
        x = x_next
    if callback is not None:
        callback({"step": flow.num_timesteps, "t": FINAL_TIMESTEP, "x": x, "denoised": x})
    return x


def sample_flow_euler(flow, model, noise, model_kwargs=None, clip_denoised=False, callback=None):
    """Euler on the flow ODE: one model evaluation per step (the same update as
    DDIM on this interpolant)."""
    return _integrate(flow, model, noise, model_kwargs, clip_denoised, callback, heun=False)


def sample_flow_heun(flow, model, noise, model_kwargs=None, clip_denoised=False, callback=None):
    """Heun's second-order method: two evaluations per step, one on the last
    (Euler) step, 2S - 1 in all."""
    return _integrate(flow, model, noise, model_kwargs, clip_denoised, callback, heun=True)
