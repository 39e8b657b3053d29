# The DiT teacher: "Scalable Diffusion Models with Transformers" (Peebles & Xie, 2023),
# https://github.com/facebookresearch/DiT. Parameter names, shapes, initialisation and numerics
# follow the official models.py so that its checkpoints (DiT-XL-2-256x256.pt, ...) load with
# strict=True; the code is written for this repository. The blocks take a conditioning vector per
# group of tokens, an attention mask and a KV cache, so that the ARD student (ard_models.py)
# reuses them unchanged.

import functools
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


#################################################################################
#                     Embedding layers for timesteps and labels                 #
#################################################################################


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches of a (C, H, W) image to tokens; the `proj` name matches
    timm's."""

    def __init__(self, input_size, patch_size, in_channels, hidden_size):
        super().__init__()
        assert input_size % patch_size == 0, (
            f"input size {input_size} must be a multiple of the patch size {patch_size}"
        )
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(
            in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True
        )

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, T, D)


class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps into vector representations."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """Sinusoidal embedding of timesteps t of any shape (fractional allowed): (...,) -> (...,
        dim)."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[..., None].float() * freqs
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[..., :1])], dim=-1)
        return embedding

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Embeds class labels; label `num_classes` is the null class used for classifier-free
    guidance."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        """Replaces labels by the null class, at random (training) or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################


class KVCache:
    """Keys and values of earlier tokens for one attention layer; `append` returns everything so
    far."""

    def __init__(self):
        self.k = None
        self.v = None

    def append(self, k, v):  # k, v: (B, heads, T_new, head_dim)
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class StaticKVCache:
    """A KVCache in buffers allocated once for `capacity` tokens: `append` writes the new keys in
    place and returns views of everything so far, so a sampler allocates nothing per step and its
    tensors keep their addresses (what a captured CUDA graph replays). For sampling only: with
    autograd, the in-place writes would overwrite keys that an earlier step saved for its backward
    pass."""

    def __init__(self, capacity):
        self.capacity, self.length, self.k, self.v = capacity, 0, None, None

    def append(self, k, v):  # k, v: (B, heads, T_new, head_dim)
        if self.k is None:
            B, H, _, Dh = k.shape
            self.k, self.v = (
                k.new_empty(B, H, self.capacity, Dh),
                v.new_empty(B, H, self.capacity, Dh),
            )
        end = self.length + k.shape[2]
        assert end <= self.capacity, f"{end} tokens exceed the cache's {self.capacity}"
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (`qkv`, `proj`), an optional mask and
    KV cache."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        assert dim % num_heads == 0, (
            f"hidden size {dim} must be divisible by the number of heads {num_heads}"
        )
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None, kv_cache=None, per_step=None):
        """x: (B, T, D). attn_mask: boolean (T, T_keys), True where attention is allowed. kv_cache:
        a KVCache whose keys precede these tokens; the new keys are appended to it. per_step=K: the
        T tokens are K steps of equal length and each attends to its own and the earlier steps (the
        block-causal mask), computed one step at a time without a mask, so that each call may take
        the flash kernel."""
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, T, head_dim)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
        if per_step is not None:
            L = T // per_step
            x = torch.cat(
                [
                    F.scaled_dot_product_attention(
                        q[:, :, i * L : (i + 1) * L], k[:, :, : (i + 1) * L], v[:, :, : (i + 1) * L]
                    )
                    for i in range(per_step)
                ],
                dim=2,
            )
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    """Two-layer MLP with timm's parameter names (`fc1`, `fc2`) and DiT's tanh-approximated GELU."""

    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning.

    Tokens come in groups that share one conditioning vector: x is (..., L, D) and c is (..., D),
    so the modulation is computed once per group and broadcast over its L tokens. DiT has one group
    per image, x (B, L, D) and c (B, D); the ARD student has one per trajectory step, x (B, K, L, D)
    and c (B, K, D).

    By default every group attends within itself only (the leading dims are folded into the batch).
    With joint=True, x must be (B, K, L, D) and the K*L tokens of an item form one sequence, with
    `attn_mask` over them and `kv_cache` holding the tokens of earlier groups.
    """

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True)
        )

    def attend(self, h, joint, attn_mask, kv_cache, per_step):
        shape = h.shape
        if joint:
            B, K, L, D = shape
            h = h.reshape(B, K * L, D)
        else:
            h = h.reshape(-1, *shape[-2:])  # (groups, L, D)
        steps = shape[1] if per_step else None
        return self.attn(h, attn_mask=attn_mask, kv_cache=kv_cache, per_step=steps).reshape(shape)

    def forward(self, x, c, joint=False, attn_mask=None, kv_cache=None, per_step=False):
        """per_step=True (with joint=True): each group attends to itself and the earlier groups, one
        group at a time, without a mask."""
        mod = self.adaLN_modulation(c).unsqueeze(-2)  # (..., 1, 6D): one row per group of tokens
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = x + gate_msa * self.attend(
            modulate(self.norm1(x), shift_msa, scale_msa), joint, attn_mask, kv_cache, per_step
        )
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """The final layer of DiT: adaLN, then a linear map of each token to a patch of out_channels."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True)
        )

    def forward(self, x, c):  # x: (..., L, D), c: (..., D)
        shift, scale = self.adaLN_modulation(c).unsqueeze(-2).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def unpatchify(x, patch_size, channels):
    """(N, T, p*p*C) -> (N, C, H, W), the inverse of PatchEmbed's token order."""
    p, c = patch_size, channels
    h = w = int(x.shape[1] ** 0.5)
    assert h * w == x.shape[1], f"{x.shape[1]} tokens do not form a square grid"
    x = x.reshape(x.shape[0], h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], c, h * p, w * p)


def init_dit_weights(model, output_layers):
    """DiT's initialisation of a model with DiT's embedders and blocks: xavier-uniform linears, the
    fixed sin-cos position embedding, N(0, 0.02) embedders, and zeros in every adaLN modulation and
    in the output layers (FinalLayer-like modules), so that every block starts as the identity."""

    def _basic_init(module):
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.constant_(module.bias, 0)

    model.apply(_basic_init)
    if model.pos_embed.device.type != "meta":
        pos_embed = get_2d_sincos_pos_embed(model.pos_embed.shape[-1], model.x_embedder.grid_size)
        model.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

    # Initialize patch_embed like nn.Linear (instead of nn.Conv2d):
    w = model.x_embedder.proj.weight.data
    nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
    nn.init.constant_(model.x_embedder.proj.bias, 0)

    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)

    for block in model.blocks:
        nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
    for layer in output_layers:
        nn.init.constant_(layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(layer.linear.weight, 0)
        nn.init.constant_(layer.linear.bias, 0)


class DiTBackbone(nn.Module):
    """What the DiT teacher and the ARD student share, with official DiT's names: the patch,
    timestep and label embedders, the fixed position embedding and the blocks. Subclasses add their
    output layers."""

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed sin-cos position embedding; a parameter (not a buffer) because official checkpoints
        # store it.
        self.pos_embed = nn.Parameter(
            torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False
        )
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)]
        )


class DiT(DiTBackbone):
    """Diffusion model with a Transformer backbone. Arguments: DiTBackbone's (official DiT's), and
    learn_sigma."""

    def __init__(self, learn_sigma=True, **kwargs):
        super().__init__(**kwargs)
        self.learn_sigma = learn_sigma
        self.out_channels = self.in_channels * 2 if learn_sigma else self.in_channels
        self.final_layer = FinalLayer(self.pos_embed.shape[-1], self.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        init_dit_weights(self, [self.final_layer])

    def forward(self, x, t, y):
        """x: (N, C, H, W) images or latents, t: (N,) diffusion timesteps, y: (N,) class labels."""
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D), T = H * W / patch_size ** 2
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)
        for block in self.blocks:
            x = block(x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, patch_size ** 2 * out_channels)
        return unpatchify(x, self.patch_size, self.out_channels)  # (N, out_channels, H, W)

    def block_features(self, x, t, y, blocks):
        """The tokens (N, T, D) after each block listed in `blocks` (no label dropout): the feature
        network of the GAN stage's discriminator. Stops after the last block asked for."""
        wanted, features = set(blocks), []
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, False)
        for i, block in enumerate(self.blocks[: max(wanted) + 1]):
            x = block(x, c)
            if i in wanted:
                features.append(x)
        return features

    def forward_with_cfg(self, x, t, y, cfg_scale, legacy_cfg=False):
        """Classifier-free guidance. The batch holds the conditional half, then the same inputs with
        the null label; both halves come back with the guided noise prediction.

        Guidance applies to every predicted-noise channel. Official DiT guides only the first three
        channels (of four latent ones) "for exact reproducibility"; legacy_cfg=True does the same,
        for reproducing its published numbers.
        """
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y)
        guided = 3 if legacy_cfg else self.in_channels
        eps, rest = model_out[:, :guided], model_out[:, guided:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################
# As in MAE and DiT. Note that the first half of the channels encodes the column (w) coordinate
# and the second half the row (h) coordinate; official checkpoints depend on this order.


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """Returns a (grid_size * grid_size, embed_dim) float64 array."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    return get_2d_sincos_pos_embed_from_grid(embed_dim, grid)


def get_2d_sincos_pos_embed_from_grid(embed_dim, grid):
    assert embed_dim % 2 == 0, f"embedding size {embed_dim} must be even"
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (H*W, D/2)
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (H*W, D/2)
    return np.concatenate([emb_h, emb_w], axis=1)  # (H*W, D)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """pos: positions of any shape -> (M, embed_dim) with M = pos.size."""
    assert embed_dim % 2 == 0, f"embedding size {embed_dim} must be even"
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega  # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D/2), outer product
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


#################################################################################
#                                   DiT Configs                                 #
#################################################################################
# The twelve official configs, plus DiT-T ("tiny"): depth 6, width 128, for the embedded digits
# default, which trains in minutes on two CPU cores.

MODEL_CONFIGS = {
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "T": dict(depth=6, hidden_size=128, num_heads=4),
}
PATCH_SIZES = {"XL": (2, 4, 8), "L": (2, 4, 8), "B": (2, 4, 8), "S": (2, 4, 8), "T": (1, 2, 4)}


def randomise_weights(model, std=0.02, seed=0):
    """Every weight drawn from N(0, std^2) with a seeded generator, the fixed position embedding
    kept: DiT's zero-initialised adaLN and output layers give zeros, and timing or comparing zeros
    proves nothing. For tests and benchmarks; the model's train/eval mode is left as it was."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def model_config(key):
    """'DiT-XL/2' -> dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)."""
    size, patch = key.split("-", 1)[1].split("/")
    return dict(MODEL_CONFIGS[size], patch_size=int(patch))


def registry(cls):
    """{key: constructor} for every config: the config's depth, width, heads and patch size are
    filled in."""
    return {
        f"DiT-{size}/{p}": functools.partial(cls, **model_config(f"DiT-{size}/{p}"))
        for size in MODEL_CONFIGS
        for p in PATCH_SIZES[size]
    }


DiT_models = registry(DiT)
