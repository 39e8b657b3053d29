"""The DiT teacher: official parameter names, shapes and numerics."""

import re

import numpy as np
import pytest
import torch
from helpers import randomised

from diffusion.sampling import guided_model_fn
from models import DiT, DiT_models, get_2d_sincos_pos_embed

OFFICIAL_KEYS = {
    "DiT-XL/2",
    "DiT-XL/4",
    "DiT-XL/8",
    "DiT-L/2",
    "DiT-L/4",
    "DiT-L/8",
    "DiT-B/2",
    "DiT-B/4",
    "DiT-B/8",
    "DiT-S/2",
    "DiT-S/4",
    "DiT-S/8",
}


def tiny_dit(**kwargs):
    defaults = dict(
        input_size=8,
        patch_size=2,
        in_channels=3,
        hidden_size=32,
        depth=2,
        num_heads=2,
        num_classes=5,
    )
    return DiT(**{**defaults, **kwargs})


def official_shapes(depth, D, p, C_in, C_out, T, num_classes):
    """The state dict of facebookresearch/DiT's models.py, name -> shape."""
    shapes = {
        "pos_embed": (1, T, D),
        "x_embedder.proj.weight": (D, C_in, p, p),
        "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256),
        "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D),
        "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (num_classes + 1, D),
        "final_layer.linear.weight": (p * p * C_out, D),
        "final_layer.linear.bias": (p * p * C_out,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D),
        "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    for i in range(depth):
        shapes.update(
            {
                f"blocks.{i}.attn.qkv.weight": (3 * D, D),
                f"blocks.{i}.attn.qkv.bias": (3 * D,),
                f"blocks.{i}.attn.proj.weight": (D, D),
                f"blocks.{i}.attn.proj.bias": (D,),
                f"blocks.{i}.mlp.fc1.weight": (4 * D, D),
                f"blocks.{i}.mlp.fc1.bias": (4 * D,),
                f"blocks.{i}.mlp.fc2.weight": (D, 4 * D),
                f"blocks.{i}.mlp.fc2.bias": (D,),
                f"blocks.{i}.adaLN_modulation.1.weight": (6 * D, D),
                f"blocks.{i}.adaLN_modulation.1.bias": (6 * D,),
            }
        )
    return shapes


@pytest.mark.parametrize("key", sorted(DiT_models))
def test_every_config_builds_on_meta_with_official_names_and_shapes(key):
    with torch.device("meta"):
        model = DiT_models[key]()  # official defaults: 32x32x4 latents, 1000 classes, learned sigma
    size, patch = re.match(r"DiT-(\w+)/(\d)", key).groups()
    depth, D, p = len(model.blocks), model.pos_embed.shape[-1], int(patch)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_shapes(depth, D, p, 4, 8, (32 // p) ** 2, 1000)


def test_official_configs_are_all_registered():
    assert OFFICIAL_KEYS <= set(DiT_models)


def test_dit_xl2_parameter_count_matches_official():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=32, num_classes=1000, learn_sigma=True)
    assert sum(p.numel() for p in model.parameters()) == 675_129_632


def test_zero_initialised_model_outputs_zeros():
    model = tiny_dit().eval()
    out = model(torch.randn(3, 3, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([0, 1, 4]))
    assert out.shape == (3, 6, 8, 8)
    assert torch.count_nonzero(out) == 0


def test_forward_with_cfg_at_scale_one_equals_forward():
    model = randomised(tiny_dit()).eval()
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([10, 10, 700, 700])
    y = torch.tensor([1, 2, 5, 5])  # second half: the null class
    x = torch.cat([x[:2], x[:2]])
    t = torch.cat([t[:2], t[:2]])
    guided = model.forward_with_cfg(x, t, y, cfg_scale=1.0)
    plain = model(x, t, y)
    torch.testing.assert_close(guided[:2], plain[:2], rtol=1e-5, atol=1e-6)


def test_guidance_applies_to_all_noise_channels_and_legacy_to_three():
    model = randomised(tiny_dit(in_channels=4)).eval()
    x = torch.randn(2, 4, 8, 8).repeat(2, 1, 1, 1)
    t = torch.tensor([300, 300, 300, 300])
    y = torch.tensor([1, 2, 5, 5])
    cond, uncond = model(x, t, y).chunk(2)
    full = model.forward_with_cfg(x, t, y, cfg_scale=3.0)[:2]
    legacy = model.forward_with_cfg(x, t, y, cfg_scale=3.0, legacy_cfg=True)[:2]
    expected = uncond + 3.0 * (cond - uncond)
    torch.testing.assert_close(full[:, :4], expected[:, :4], rtol=1e-4, atol=1e-5)
    # variance channels: conditional
    torch.testing.assert_close(full[:, 4:], cond[:, 4:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(legacy[:, :3], expected[:, :3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(legacy[:, 3:], cond[:, 3:], rtol=1e-4, atol=1e-5)


def test_guided_model_fn_matches_forward_with_cfg():
    model = randomised(tiny_dit()).eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([100, 900]), torch.tensor([0, 3])
    fn = guided_model_fn(model, 2.5)
    expected = model.forward_with_cfg(
        torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 5)]), 2.5
    )
    torch.testing.assert_close(fn(x, t, y), expected[:2])
    assert guided_model_fn(model, 1.0) is model


def test_building_blocks_match_timm_modules_used_by_official_dit():
    timm_layers = pytest.importorskip("timm.layers")
    from models import Attention, Mlp, PatchEmbed

    torch.manual_seed(0)
    ours = Attention(64, num_heads=4, qkv_bias=True)
    ref = timm_layers.Attention(64, num_heads=4, qkv_bias=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 10, 64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)

    ours = Mlp(64, 256)
    ref = timm_layers.Mlp(
        in_features=64,
        hidden_features=256,
        act_layer=lambda: torch.nn.GELU(approximate="tanh"),
        drop=0,
    )
    ref.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(ours(x), ref(x))

    ours = PatchEmbed(16, 4, 3, 64)
    ref = timm_layers.PatchEmbed(16, 4, 3, 64, bias=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    img = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(ours(img), ref(img))


def test_position_embedding_has_official_layout():
    D, g = 16, 4
    emb = get_2d_sincos_pos_embed(D, g).reshape(g, g, D)  # (row, column, D)
    # First half of the channels: a function of the column only; second half: of the row only.
    assert np.allclose(emb[:, :, : D // 2], emb[:1, :, : D // 2])
    assert np.allclose(emb[:, :, D // 2 :], emb[:, :1, D // 2 :])
    # Within each half: sines of the position at frequencies 1e4^(-k/(D/4)), then cosines.
    col = 3
    omega = 1.0 / 10000 ** (np.arange(D // 4) / (D / 4))
    assert np.allclose(emb[0, col, : D // 4], np.sin(col * omega))
    assert np.allclose(emb[0, col, D // 4 : D // 2], np.cos(col * omega))


def test_timestep_embedding_is_cos_then_sin():
    from models import TimestepEmbedder

    t = torch.tensor([0.0, 10.0, 999.0])
    emb = TimestepEmbedder.timestep_embedding(t, 8)
    freqs = torch.exp(-np.log(10000) * torch.arange(4) / 4)
    torch.testing.assert_close(
        emb, torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    )


def test_model_runs_on_nonsquare_config_without_hardcoded_sizes():
    model = randomised(
        tiny_dit(
            input_size=12,
            patch_size=4,
            in_channels=1,
            hidden_size=24,
            depth=3,
            num_heads=3,
            num_classes=7,
        )
    ).eval()
    out = model(torch.randn(2, 1, 12, 12), torch.tensor([1, 2]), torch.tensor([0, 6]))
    assert out.shape == (2, 2, 12, 12)
