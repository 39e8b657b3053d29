"""Probes of what an ARD student does with its history (the earlier steps of its trajectory).

  attention mass   in each history block, the share of each step's attention (mean over its queries, heads
                   and trajectories) that goes to the tokens of earlier steps; 0 by construction for step 0
  history swap     each step's prediction when the earlier steps' inputs are replaced by those of another
                   trajectory of the same class: the mean squared change; exactly 0 with N = 0 and for step 0
  dose response    the sample's error against the teacher's sample when every fed-back prediction is perturbed
                   by sigma * N(0, I) before it becomes the next input: robustness to the student's own errors
"""

import torch

from models import modulate


@torch.no_grad()
def attention_mass(model, x, y):
    """(history_layers, K) tensor: the mean attention probability that queries of step k put on keys of steps < k,
    in each history block, for the teacher-forced pass on inputs x (B, K, C, H, W)."""
    K, L = model.num_steps, model.x_embedder.num_patches
    tokens, c = model.embed(x), model.conditioning(y, list(range(K)))  # (B, K, L, D), (B, K, D)
    step = torch.arange(K, device=x.device).repeat_interleave(L)
    earlier = (step[None, :] < step[:, None]).float()  # (K*L queries, K*L keys)
    mask = model.attention_mask(x.device)
    mass = torch.zeros(model.history_layers, K)
    for i, block in enumerate(model.blocks[: model.history_layers]):
        shift, scale = block.adaLN_modulation(c).unsqueeze(-2).chunk(6, dim=-1)[:2]
        h = modulate(block.norm1(tokens), shift, scale).flatten(1, 2)  # (B, K*L, D)
        attn = block.attn
        q, k, _ = attn.qkv(h).unflatten(-1, (3, attn.num_heads, attn.head_dim)).permute(2, 0, 3, 1, 4)  # (B, heads, K*L, hd)
        logits = (q @ k.transpose(-1, -2)) * attn.head_dim**-0.5
        probs = logits.masked_fill(~mask, float("-inf")).softmax(dim=-1)  # (B, heads, K*L, K*L)
        on_earlier = (probs * earlier).sum(-1).mean(dim=(0, 1))  # (K*L,)
        mass[i] = on_earlier.view(K, L).mean(dim=1).cpu()
        tokens = block(tokens, c, joint=True, attn_mask=mask)
    return mass


def same_class_donors(y, generator):
    """For each item, another item of the same class (a random derangement within each class where possible)."""
    donors = torch.arange(len(y))
    for label in y.unique():
        members = torch.nonzero(y == label).flatten()
        if len(members) > 1:
            shift = torch.randint(1, len(members), (1,), generator=generator).item()
            donors[members] = members[(torch.arange(len(members)) + shift) % len(members)]
    return donors


@torch.no_grad()
def history_swap(model, x, y, donors):
    """(K,) mean squared change of step k's prediction when the inputs of steps < k are those of x[donors]."""
    base = model(x, y)
    change = torch.zeros(model.num_steps)
    for k in range(1, model.num_steps):
        swapped = x.clone()
        swapped[:, :k] = x[donors, :k]
        change[k] = (model(swapped, y)[:, k] - base[:, k]).square().mean().cpu()
    return change


@torch.no_grad()
def dose_response(model, noise, y, target, sigmas, seed=0):
    """{sigma: MSE of the sample against `target`} when each fed-back prediction is perturbed by sigma * N(0, I)."""
    out = {}
    for sigma in sigmas:
        gen = torch.Generator(device=noise.device).manual_seed(seed)

        def perturb(k, x, sigma=sigma, gen=gen):
            return x + sigma * torch.randn(x.shape, generator=gen, device=x.device)

        sample = model.sample(noise, y, feedback=perturb if sigma > 0 else None)[:, -1]
        out[sigma] = (sample - target).square().mean().item()
    return out
