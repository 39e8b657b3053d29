"""The ARD student: "Autoregressive Distillation of Diffusion Transformers" (Kim et al., CVPR 2025).

A K-step student built from the DiT teacher's parts (models.py). Its input is the trajectory so far,
x = [x_{t_0}, ..., x_{t_{K-1}}] with x_{t_0} the noise, as K blocks of L tokens; step k predicts
x_{t_{k+1}} and the last step the sample.

    tokens  = patch_embed(x_k) + pos_embed                  for each step k        (B, K, L, D)
    c_k     = t_embed(t_k) + y_embed(y)                     one row per step       (B, K, D)
    blocks 0 .. N-1: block-causal over the K*L tokens       step k sees steps <= k (the history)
    blocks N .. depth-1: each step attends to itself only   K sequences of L tokens, as the teacher
    pred_k  = head_k(tokens_k, c_k)                         K output heads         (B, K, C, H, W)

Training is teacher-forced: the K inputs are teacher trajectory states and all K steps run in one
pass (`forward`). Sampling feeds each prediction back in (`sample`), one step of L tokens at a time,
with a KV cache in the N history blocks, so no earlier step is recomputed. The adaLN conditioning is
constant within a step and is computed once per step, not per token. With N = 0 the student is plain
step distillation: every step sees only its own input.
"""

import torch
import torch.nn as nn

from models import (
    DiTBackbone,
    FinalLayer,
    KVCache,
    StaticKVCache,
    init_dit_weights,
    registry,
    unpatchify,
)


def block_causal_mask(num_steps, tokens_per_step, device=None):
    """Boolean (K*L, K*L) mask, True where a query token may attend to a key token: key step <=
    query step."""
    step = torch.arange(num_steps, device=device).repeat_interleave(tokens_per_step)
    return step[None, :] <= step[:, None]


# How the teacher-forced pass computes the history blocks' block-causal attention (the same function
# either way): "mask": one attention over the K*L tokens with a boolean mask (the reference; SDPA's
# flash kernel refuses a mask); "per_step": step k's queries over the keys of steps <= k, one
# unmasked attention per step (flash-eligible).
HISTORY_ATTENTION = ("mask", "per_step")


class ARD(DiTBackbone):
    """A K-step ARD student on a DiT backbone, with history visible in the lowest `history_layers`
    blocks. timesteps: the teacher timestep of each input step, t_0 (the noise) first;
    history_attention: see HISTORY_ATTENTION (not part of the weights); other arguments:
    DiTBackbone's."""

    def __init__(self, timesteps, history_layers, history_attention="mask", **kwargs):
        super().__init__(**kwargs)
        if history_attention not in HISTORY_ATTENTION:
            raise ValueError(
                f"history_attention must be one of {HISTORY_ATTENTION}, got {history_attention!r}"
            )
        self.history_attention = history_attention
        timesteps = [float(t) for t in timesteps]
        if len(timesteps) < 1:
            raise ValueError("the student needs at least one step (one timestep)")
        if not 0 <= history_layers <= len(self.blocks):
            raise ValueError(
                f"history_layers must be between 0 and the depth {len(self.blocks)}, got "
                f"{history_layers}"
            )
        self.num_steps = len(timesteps)
        self.history_layers = history_layers
        self.out_channels = self.in_channels  # the student predicts states, not noise and variance
        # The teacher timestep of each input step; not saved in the state dict (the config holds
        # it).
        self.register_buffer("timesteps", torch.tensor(timesteps), persistent=False)
        # The label table is the teacher's (null class row included), so it loads as it is; labels
        # are never dropped.
        hidden_size = self.pos_embed.shape[-1]
        self.heads = nn.ModuleList(
            [
                FinalLayer(hidden_size, self.patch_size, self.out_channels)
                for _ in range(self.num_steps)
            ]
        )
        init_dit_weights(self, self.heads)
        self._masks = {}

    def attention_mask(self, device):
        """The block-causal mask of the history blocks, built once per device and reused."""
        key = str(device)
        if key not in self._masks:
            self._masks[key] = block_causal_mask(
                self.num_steps, self.x_embedder.num_patches, device
            )
        return self._masks[key]

    def conditioning(self, y, steps):
        """c for the given consecutive steps: (B, len(steps), D), the step's timestep embedding plus
        the class embedding. The timesteps are sliced, not indexed by a list (which would copy the
        index to the device at every step, out of a captured CUDA graph's reach)."""
        first, last = steps[0], steps[-1]
        assert list(steps) == list(range(first, last + 1)), (
            f"steps must be consecutive, got {steps}"
        )
        t_emb = self.t_embedder(self.timesteps[first : last + 1])  # (S, D)
        y_emb = self.y_embedder(y, train=False)  # (B, D)
        return t_emb[None] + y_emb[:, None]

    def embed(self, x):
        """(B, S, C, H, W) -> tokens (B, S, L, D)."""
        B, S = x.shape[:2]
        tokens = self.x_embedder(x.flatten(0, 1)) + self.pos_embed  # (B*S, L, D)
        return tokens.view(B, S, *tokens.shape[1:])

    def predict(self, tokens, c, steps):
        """Each step's head on its tokens: (B, S, L, D) -> (B, S, C, H, W)."""
        outs = [
            unpatchify(self.heads[k](tokens[:, i], c[:, i]), self.patch_size, self.out_channels)
            for i, k in enumerate(steps)
        ]
        return torch.stack(outs, dim=1)

    def forward(self, x, y):
        """Teacher-forced pass over all K steps. x: (B, K, C, H, W) = [x_{t_0}, ..., x_{t_{K-1}}],
        y: (B,). Returns (B, K, C, H, W), the predictions of [x_{t_1}, ..., x_{t_K}]."""
        assert x.shape[1] == self.num_steps, (
            f"expected {self.num_steps} input steps, got {x.shape[1]}"
        )
        steps = list(range(self.num_steps))
        tokens = self.embed(x)  # (B, K, L, D)
        c = self.conditioning(y, steps)  # (B, K, D)
        per_step = self.history_attention == "per_step"
        mask = self.attention_mask(x.device) if self.history_layers > 0 and not per_step else None
        for i, block in enumerate(self.blocks):
            if i < self.history_layers:  # one sequence of K*L tokens, block-causal
                tokens = block(tokens, c, joint=True, attn_mask=mask, per_step=per_step)
            else:
                tokens = block(tokens, c)  # K independent sequences of L tokens
        return self.predict(tokens, c, steps)

    @torch.no_grad()
    def sample(self, noise, y, feedback=None):
        """K steps from noise (B, C, H, W), each prediction fed back as the next input. Returns the
        whole predicted trajectory (B, K, C, H, W); [:, -1] is the sample. feedback(k, x), if given,
        maps step k's prediction to the next step's input (a probe of exposure bias perturbs it);
        the trajectory keeps x. The history blocks' keys and values go to caches preallocated for
        the K steps (StaticKVCache)."""
        capacity = self.num_steps * self.x_embedder.num_patches
        return self.rollout(noise, y, feedback, cache=lambda: StaticKVCache(capacity))

    def rollout(self, noise, y, feedback=None, cache=KVCache):
        """`sample` with gradients: the same K steps, where each step's input is the previous
        prediction itself, so a loss on the sample reaches every step's head and every earlier step
        (the GAN stage's fake). `cache` makes each history block's KV cache."""
        caches = [cache() for _ in range(self.history_layers)]
        x, trajectory = noise, []
        for k in range(self.num_steps):
            tokens = self.embed(x[:, None])  # (B, 1, L, D): this step's tokens only
            c = self.conditioning(y, [k])  # (B, 1, D)
            for i, block in enumerate(self.blocks):
                if i < self.history_layers:
                    # attends to steps <= k
                    tokens = block(tokens, c, joint=True, kv_cache=caches[i])
                else:
                    tokens = block(tokens, c)
            pred = self.predict(tokens, c, [k])[:, 0]
            trajectory.append(pred)
            x = feedback(k, pred) if feedback is not None else pred
        return torch.stack(trajectory, dim=1)

    @property
    def last_layer(self):
        """The weight of the last step's output layer: where the GAN stage compares the gradients of
        the regression and adversarial losses (VQGAN's adaptive weight)."""
        return self.heads[-1].linear.weight

    def load_teacher(self, teacher_state_dict):
        """Initialises every shared part from a DiT teacher's state dict, strictly, and each output
        head from the teacher's final layer restricted to the first C (noise) output channels."""
        teacher = dict(teacher_state_dict)
        own = self.state_dict()
        shared = {k: v for k, v in own.items() if not k.startswith("heads.")}
        missing = [k for k in shared if k not in teacher]
        mismatched = [
            f"{k} {tuple(teacher[k].shape)} vs {tuple(v.shape)}"
            for k, v in shared.items()
            if k in teacher and teacher[k].shape != v.shape
        ]
        final_keys = [k for k in teacher if k.startswith("final_layer.")]
        unexpected = [k for k in teacher if k not in shared and k not in final_keys]
        if missing or mismatched or unexpected:
            raise ValueError(
                "the teacher does not match the student's architecture: "
                + "; ".join(
                    f"{name}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                    for name, keys in (
                        ("missing", missing),
                        ("shape mismatch", mismatched),
                        ("unexpected", unexpected),
                    )
                    if keys
                )
            )

        p, C = self.patch_size, self.out_channels
        # (p*p*C_teacher, D); output rows ordered (p, q, channel)
        weight = teacher["final_layer.linear.weight"]
        C_teacher = weight.shape[0] // (p * p)
        if weight.shape[0] % (p * p) or C_teacher < C:
            raise ValueError(
                f"the teacher's final layer has {weight.shape[0]} outputs, not p*p*C' with C' >= "
                f"{C}"
            )
        head = {
            "linear.weight": weight.view(p, p, C_teacher, -1)[:, :, :C].reshape(p * p * C, -1),
            "linear.bias": teacher["final_layer.linear.bias"]
            .view(p, p, C_teacher)[:, :, :C]
            .reshape(-1),
            "adaLN_modulation.1.weight": teacher["final_layer.adaLN_modulation.1.weight"],
            "adaLN_modulation.1.bias": teacher["final_layer.adaLN_modulation.1.bias"],
        }
        state = {k: teacher[k] for k in shared}
        for k in range(self.num_steps):
            state.update({f"heads.{k}.{name}": v for name, v in head.items()})
        self.load_state_dict(state, strict=True)
        return self


def dense_forward(model, x, y, per_token_conditioning=False):
    """The teacher-forced pass computed densely: every block attends over all K*L tokens with a mask
    (block-causal in the history blocks, block-diagonal above). per_token_conditioning=True also
    computes every adaLN modulation once per token instead of once per step, as the public
    re-implementation does. Numerically the same function as model.forward: the reference the
    efficient pass is tested against, and the baseline benchmarks/ard_cost.py measures it
    against."""
    K, L = model.num_steps, model.x_embedder.num_patches
    steps = list(range(K))
    tokens = model.embed(x)  # (B, K, L, D)
    c = model.conditioning(y, steps)  # (B, K, D)
    causal = block_causal_mask(K, L, x.device)
    step = torch.arange(K, device=x.device).repeat_interleave(L)
    diagonal = step[None, :] == step[:, None]
    B, _, _, D = tokens.shape
    if per_token_conditioning:
        # Every token is its own group of one: (B, K*L, 1, D) with a (B, K*L, D) conditioning.
        h, c_tok = (
            tokens.reshape(B, K * L, 1, D),
            c[:, :, None].expand(B, K, L, D).reshape(B, K * L, D),
        )
        for i, block in enumerate(model.blocks):
            h = block(
                h, c_tok, joint=True, attn_mask=causal if i < model.history_layers else diagonal
            )
        tokens = h.view(B, K, L, D)
    else:
        for i, block in enumerate(model.blocks):
            tokens = block(
                tokens, c, joint=True, attn_mask=causal if i < model.history_layers else diagonal
            )
    return model.predict(tokens, c, steps)


ARD_models = registry(ARD)
