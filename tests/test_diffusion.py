"""Gaussian diffusion, respacing and the trajectory-exposing ODE solvers."""

import numpy as np
import pytest
import torch

from diffusion import create_diffusion, space_timesteps
from diffusion.ode import FINAL_TIMESTEP, model_timesteps, sample_ddim, sample_heun, trajectory
from models import DiT


def test_25_step_respacing_is_dits_uniform_grid():
    steps = sorted(space_timesteps(1000, "25"))
    assert len(steps) == 25
    assert steps[:3] == [0, 42, 83] and steps[-2:] == [957, 999]
    assert model_timesteps(create_diffusion("25")) == steps[::-1]


def test_ddim_respacing_uses_integer_stride():
    assert sorted(space_timesteps(1000, "ddim50")) == list(range(0, 1000, 20))


def small_model(seed=0):
    torch.manual_seed(seed)
    model = DiT(
        input_size=4,
        patch_size=2,
        in_channels=2,
        hidden_size=16,
        depth=1,
        num_heads=2,
        num_classes=3,
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_eta0_is_deterministic_and_ends_at_its_last_x0_prediction(clip):
    model, diffusion = small_model(), create_diffusion("10")
    noise, y = torch.randn(3, 2, 4, 4), torch.tensor([0, 1, 2])
    seen = []
    a = sample_ddim(diffusion, model, noise, dict(y=y), clip_denoised=clip, callback=seen.append)
    b = sample_ddim(diffusion, model, noise.clone(), dict(y=y), clip_denoised=clip)
    assert torch.equal(a, b)
    assert [s["step"] for s in seen] == list(range(11))
    # The last model evaluation's x0 prediction is the returned sample.
    torch.testing.assert_close(seen[-2]["denoised"], a, rtol=0, atol=1e-6)
    assert seen[-1]["t"] == FINAL_TIMESTEP and torch.equal(seen[-1]["x"], a)


def test_ddim_matches_adm_ddim_sample_loop():
    model, diffusion = small_model(), create_diffusion("10")
    noise, y = torch.randn(3, 2, 4, 4), torch.tensor([0, 1, 2])
    ours = sample_ddim(diffusion, model, noise, dict(y=y), clip_denoised=True)
    adm = diffusion.ddim_sample_loop(
        model, noise.shape, noise=noise, clip_denoised=True, model_kwargs=dict(y=y), eta=0.0
    )
    torch.testing.assert_close(ours, adm, rtol=1e-5, atol=1e-5)


def test_trajectory_stacks_states_from_noise_to_sample():
    model, diffusion = small_model(), create_diffusion("10")
    noise, y = torch.randn(3, 2, 4, 4), torch.tensor([0, 1, 2])
    xt, x0 = trajectory(sample_ddim, diffusion, model, noise, dict(y=y), steps=[0, 5, 10])
    assert xt.shape == x0.shape == (3, 3, 2, 4, 4)
    assert torch.equal(xt[:, 0], noise)
    final = sample_ddim(diffusion, model, noise, dict(y=y))
    assert torch.equal(xt[:, -1], final) and torch.equal(x0[:, -1], final)


def gaussian_eps_model(data_std, diffusion):
    """The exact noise predictor for data ~ N(0, data_std^2 I):
    E[eps | x_t] = sqrt(1 - ab) x_t / (ab s^2 + 1 - ab)."""
    alphas = torch.tensor(create_diffusion("").alphas_cumprod)  # indexed by original timestep

    def model(x, t, y=None):
        ab = alphas[t].float().view(-1, 1, 1, 1)
        eps = (1 - ab).sqrt() * x / (ab * data_std**2 + 1 - ab)
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)  # learned-sigma layout

    return model


def test_heun_is_more_accurate_than_ddim_on_the_exact_gaussian_ode():
    s = 0.5
    errors = {}
    for steps in (8, 16):
        diffusion = create_diffusion(str(steps))
        model = gaussian_eps_model(s, diffusion)
        noise = torch.randn(4, 1, 2, 2, dtype=torch.float32)
        # The exact probability-flow ODE map for Gaussian data, in x_bar = x / sqrt(ab),
        # sigma = sqrt(1/ab - 1).
        ab_T = diffusion.alphas_cumprod[-1]
        sigma_T = np.sqrt(1 / ab_T - 1)
        exact = noise / np.sqrt(ab_T) * s / np.sqrt(s**2 + sigma_T**2)
        for name, solver in (("ddim", sample_ddim), ("heun", sample_heun)):
            out = solver(diffusion, model, noise)
            errors[name, steps] = (out - exact).abs().max().item()
    assert errors["heun", 8] < errors["ddim", 8] and errors["heun", 16] < errors["ddim", 16]
    assert errors["ddim", 16] < errors["ddim", 8]  # both converge as the grid is refined
    assert errors["heun", 16] < errors["heun", 8]


def test_training_loss_is_finite_and_positive_with_learned_sigma():
    model, diffusion = small_model(), create_diffusion("")
    x = torch.randn(4, 2, 4, 4).clamp(-1, 1)
    terms = diffusion.training_losses(
        model, x, torch.tensor([0, 10, 500, 999]), dict(y=torch.tensor([0, 1, 2, 0]))
    )
    assert set(terms) == {"loss", "mse", "vb"}
    assert torch.isfinite(terms["loss"]).all() and (terms["loss"] > 0).all()
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
