"""The GAN fine-tuning stage: settings, the discriminator on the frozen teacher, the losses, and
GANStage, the adversarial half of a step that train_ard.py's loop calls.

ARD's second stage adds an adversarial loss to the regression loss, with the frozen teacher as the
feature network and one light head per teacher block (the paper's elements). The public code's GAN
functions are missing; what the heads see, at which noise levels, and how the two losses are
balanced is this repository's design, after ADD/LADD's feature discriminators and what failed on the
digits (docs/gan.md):

  * The fake is the student's own sample: a differentiable rollout of its K steps (ARD.rollout), the
    way it samples, so the adversarial loss sees the errors it accumulates and its gradient reaches
    every step's head.
  * Real x0 (training data; in latent space VAE-encoded, with random horizontal flips) and fake x0
    are translated at random by up to an eighth of their side (DiffAugment's translation; pixel
    space only) and diffused to the same kind of noise level, t ~ U[0, --gan-max-t) with fresh
    noise. The default keeps t < 300, where alpha-bar >= 0.4: at higher t the teacher's features
    cannot tell real from fake, and the gradient reaching the sample is scaled by sqrt(alpha-bar).
  * The frozen teacher runs on them with the true class and t; the tokens after each selected block
    go to that block's head: LayerNorm, spectrally normalised Linear(D, D/4), SiLU, then a
    spectrally normalised per-token logit plus a class-projection term (Miyato & Koyama, 2018); a
    head's logit is the mean over tokens, the discriminator's the mean over heads. Spectral norm
    bounds how sharp the heads can become.
  * Hinge loss for the discriminator (AdamW at --disc-lr), -D(fake) for the generator. Gradients
    reach the student through the frozen teacher; only the heads are trained by the discriminator's
    optimiser.

The generator's loss is L_reg + lambda * L_GAN, with lambda = scale * |grad L_reg| / |grad L_GAN|
measured on the student's last output layer (VQGAN's adaptive weight), clamped to [0,
--gan-max-weight], and lambda = 0 during the first --gan-warmup steps (the discriminator trains
during the warm-up). The paper uses scale 10; on the digits that lets the adversarial gradient
dominate and the student drifts, so the default is 0.5: the regression to the teacher's trajectories
stays the anchor.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from ard import dist_util
from ard.cli import UserError
from ard.generation import teacher_process
from ard.training import requires_grad
from ard.vae import vae_encode
from diffusion.flow import FlowMatching


@dataclass(frozen=True)
class GANSettings:
    """What the GAN stage does, from one place: train_ard.resolve_gan_settings and its flags."""

    blocks: tuple  # teacher blocks with a discriminator head
    disc_lr: float  # AdamW learning rate of the heads
    scale: float  # lambda = scale * |grad L_reg| / |grad L_GAN| on the student's last layer
    max_weight: float  # lambda is clamped to [0, max_weight]
    fixed_weight: float  # a fixed lambda instead of the adaptive one (None: adaptive)
    warmup: int  # optimiser steps with lambda = 0, where the discriminator trains alone
    max_t: int  # real and fake x0 are diffused to t ~ U[0, max_t)
    augment: int  # random translation of real and fake by up to this many pixels
    flip: bool  # random horizontal flips of the real images
    dequantize: float  # uniform noise of this width on the real images in [-1, 1]


class DiscriminatorHead(nn.Module):
    """Per-token logits from one block's tokens, class-conditioned by projection, spectrally
    normalised."""

    def __init__(self, hidden_size, num_classes, width_ratio=0.25):
        super().__init__()
        width = max(8, int(hidden_size * width_ratio))
        self.norm = nn.LayerNorm(hidden_size)
        self.proj = spectral_norm(nn.Linear(hidden_size, width))
        self.out = spectral_norm(nn.Linear(width, 1))
        self.class_embed = nn.Embedding(num_classes, width)
        nn.init.normal_(self.class_embed.weight, std=0.02)
        self.scale = width**-0.5

    def forward(self, tokens, y):  # tokens: (N, T, D), y: (N,)
        h = F.silu(self.proj(self.norm(tokens)))  # (N, T, W)
        # (N, T)
        logits = self.out(h).squeeze(-1) + self.scale * (h * self.class_embed(y)[:, None]).sum(-1)
        return logits.mean(dim=1)  # (N,)


class FeatureDiscriminator(nn.Module):
    """Heads on the frozen teacher's block features. The teacher is held outside the module's
    parameters, so that the discriminator's state dict and optimiser see only the heads. `diffusion`
    is the teacher's process (ard.generation.teacher_process); max_t and augment: see
    GANSettings."""

    def __init__(self, teacher, diffusion, blocks, num_classes, max_t=300, augment=0):
        super().__init__()
        self.diffusion = diffusion
        hidden = teacher.pos_embed.shape[-1]
        self.blocks = sorted(blocks)
        bad = [b for b in self.blocks if not 0 <= b < len(teacher.blocks)]
        if bad:
            raise UserError(
                f"discriminator blocks {bad} are outside the teacher's {len(teacher.blocks)} blocks"
            )
        self.heads = nn.ModuleList([DiscriminatorHead(hidden, num_classes) for _ in self.blocks])
        self._teacher = [teacher]  # a list keeps it out of parameters(), state_dict() and .to()
        self.max_t, self.augment = max_t, augment

    @property
    def teacher(self):
        return self._teacher[0]

    def forward(self, x0, y):
        """Logits (N,) of clean images x0 with labels y: each translated at random by up to
        `augment` pixels and diffused to its own t ~ U[0, max_t) with fresh noise (draws from the
        global RNG)."""
        t = torch.randint(0, self.max_t, (len(x0),), device=x0.device)
        return self.logits_at(translate(x0, self.augment), y, t, torch.randn_like(x0))

    def logits_at(self, x0, y, t, noise):
        """Logits (N,) of clean x0 diffused to timesteps t of DiT's 1000-step diffusion with the
        given noise; a flow teacher reads t as the noise level t / 1000 in its own time
        convention."""
        if isinstance(self.diffusion, FlowMatching):
            s = t.float() / 1000
            xt, t = self.diffusion.q_sample(x0, s, noise), self.diffusion.model_time(s)
        else:
            xt = self.diffusion.q_sample(x0, t, noise)
        features = self.teacher.block_features(xt, t, y, self.blocks)
        logits = [head(f, y) for head, f in zip(self.heads, features)]
        return torch.stack(logits, dim=0).mean(dim=0)


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake):
    return -logits_fake.mean()


def gradient_norms(loss_reg, loss_gan, last_layer):
    """|grad L_reg| and |grad L_GAN| on last_layer (a parameter); the graph is kept for the backward
    pass."""
    g_reg = torch.autograd.grad(loss_reg, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(loss_gan, last_layer, retain_graph=True)[0]
    return g_reg.norm(), g_gan.norm()


def adaptive_weight(reg_norm, gan_norm, scale, max_weight):
    """lambda = scale * |grad L_reg| / |grad L_GAN|, clamped to [0, max_weight] (VQGAN's adaptive
    weight)."""
    return (scale * reg_norm / (gan_norm + 1e-8)).clamp(0.0, max_weight).detach()


def translate(x, max_shift):
    """Each image shifted by its own random offset in [-max_shift, max_shift] pixels along each
    axis, the uncovered border filled with the background value -1 (DiffAugment's translation, for
    both real and fake)."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    dy, dx = (torch.randint(-max_shift, max_shift + 1, (n,), device=x.device) for _ in range(2))
    rows = torch.arange(h, device=x.device)[None, :] + max_shift - dy[:, None]  # (n, h)
    cols = torch.arange(w, device=x.device)[None, :] + max_shift - dx[:, None]  # (n, w)
    idx = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class DiscriminatorStep(NamedTuple):
    loss: float  # the hinge loss
    real: float  # mean logit of the real batch
    fake: float  # mean logit of the fakes


class GANWeight(NamedTuple):
    weight: torch.Tensor  # lambda, detached
    grad_reg: float  # |grad L_reg| on the last layer, mean over ranks
    grad_gan: float  # |grad L_GAN| on the last layer, mean over ranks


class GANStage:
    """The adversarial half of a GAN fine-tuning step: the discriminator on the frozen teacher (its
    heads, their optimiser) and the real images it sees. train_ard.py's loop calls
    discriminator_step on the detached fake, then adds gan_weight(...).weight * generator_loss(fake,
    y) to the regression loss. `real_batches` yields the (x, y) batch of each step in [-1, 1] pixels
    (VAE encoded here in latent space); `state` is a checkpoint to resume the heads and their
    optimiser."""

    def __init__(
        self,
        teacher,
        teacher_config,
        settings,
        real_batches,
        device,
        vae=None,
        precision="fp32",
        state=None,
    ):
        self.settings, self.device, self.precision = settings, device, precision
        self.real_batches, self.vae = real_batches, vae
        self.disc = FeatureDiscriminator(
            teacher,
            teacher_process(teacher_config),
            settings.blocks,
            teacher_config["num_classes"],
            settings.max_t,
            settings.augment,
        ).to(device)
        self.disc_opt = torch.optim.AdamW(
            self.disc.parameters(), lr=settings.disc_lr, weight_decay=0
        )
        if state is not None:
            self.disc.load_state_dict(state["disc"])
            self.disc_opt.load_state_dict(state["disc_opt"])
        self.disc_ddp = dist_util.wrap_ddp(self.disc, device)

    def real(self):
        """The step's real batch, as the discriminator sees it: flipped at random (image folders),
        dequantised, and in latent space encoded."""
        x, y = next(self.real_batches)
        x, y = x.to(self.device), y.to(self.device)
        if self.settings.flip:
            flip = torch.rand(len(x), device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.settings.dequantize:
            # Real images take a few grey levels, the student's any value: hide the levels from the
            # heads.
            x = x + self.settings.dequantize * (torch.rand_like(x) - 0.5)
        return (vae_encode(self.vae, x) if self.vae is not None else x), y

    def discriminator_step(self, fake, y):
        """One optimiser step of the heads: hinge loss on a real batch and the (detached) fakes."""
        x_real, y_real = self.real()
        with dist_util.autocast(self.device, self.precision):
            logits = self.disc_ddp(torch.cat([x_real, fake]), torch.cat([y_real, y]))
            loss = hinge_d_loss(logits[: len(x_real)], logits[len(x_real) :])
        self.disc_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.disc_opt.step()
        # a gradient in a head from here on is the generator's
        self.disc_opt.zero_grad(set_to_none=True)
        real, fake = logits[: len(x_real)].mean().item(), logits[len(x_real) :].mean().item()
        return DiscriminatorStep(loss=loss.item(), real=real, fake=fake)

    def generator_loss(self, fake, y):
        """-D(fake), with the heads frozen: its gradient reaches the student through the teacher
        only."""
        requires_grad(self.disc, False)
        with dist_util.autocast(self.device, self.precision):
            loss = generator_loss(self.disc(fake.float(), y))
        requires_grad(self.disc, True)
        return loss

    def gan_weight(self, loss_reg, loss_gan, last_layer):
        """lambda for L_reg + lambda * L_GAN: the settings' fixed weight, or the adaptive one from
        the two losses' gradient norms on `last_layer` (averaged over ranks, so every rank uses one
        lambda)."""
        reg_norm, gan_norm = gradient_norms(loss_reg, loss_gan, last_layer)
        norms = dist_util.all_reduce_mean([reg_norm.item(), gan_norm.item()], self.device)
        reg_norm, gan_norm = (torch.tensor(v, device=self.device) for v in norms)
        if self.settings.fixed_weight is None:
            weight = adaptive_weight(
                reg_norm, gan_norm, self.settings.scale, self.settings.max_weight
            )
        else:
            weight = torch.tensor(self.settings.fixed_weight, device=self.device)
        return GANWeight(weight=weight, grad_reg=reg_norm.item(), grad_gan=gan_norm.item())

    def state_dict(self):
        return {
            "disc": self.disc.state_dict(),
            "disc_opt": self.disc_opt.state_dict(),
            "disc_blocks": self.disc.blocks,
        }
