# Timestep respacing after openai/improved-diffusion and guided-diffusion, as used by DiT
# (facebookresearch/DiT, diffusion/respace.py). Written for this repository.

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps, section_counts):
    """The set of original timesteps kept when a process of num_timesteps steps is respaced.

    section_counts is a list of step counts, one per equal section of the process, or a string of
    comma-separated counts ("10,15,20"), or "ddimN" for DDIM's fixed integer stride giving N steps.
    Within a section the steps are spread evenly, rounding fractional positions: "25" over 1000
    steps keeps 0, 42, 83, ..., 957, 999.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim") :])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired_count:
                    return set(range(0, num_timesteps, i))
            raise ValueError(f"cannot create exactly {desired_count} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        # Accumulate the fractional position as upstream does: the rounding of the sum
        # is what fixes the grid.
        cur_idx = 0.0
        taken_steps = []
        for _ in range(section_count):
            taken_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken_steps
        start_idx += size
    return set(all_steps)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion process that keeps only some steps of a base process; the model still sees
    the original timestep of each kept step."""

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.timestep_map = []
        self.original_num_steps = len(kwargs["betas"])

        base_diffusion = GaussianDiffusion(**kwargs)
        last_alpha_cumprod = 1.0
        new_betas = []
        for i, alpha_cumprod in enumerate(base_diffusion.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)
        self.timestep_maps = {}  # the map as a tensor, per (device, dtype) it was asked on

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self.timestep_map, self.timestep_maps)


class _WrappedModel:
    """Calls the model with the original timestep of each respaced index."""

    def __init__(self, model, timestep_map, maps):
        self.model = model
        self.timestep_map = timestep_map
        # (device, dtype) -> the map there, copied once per diffusion (no host copy per step)
        self.maps = maps

    def __call__(self, x, ts, **kwargs):
        key = (str(ts.device), ts.dtype)
        if key not in self.maps:
            self.maps[key] = torch.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
        return self.model(x, self.maps[key][ts], **kwargs)
