"""The GAN fine-tuning stage: the discriminator, the losses, and one GAN step (GANStage).

ARD's second stage adds an adversarial loss to the regression loss, with the frozen teacher as the
feature network and one light head per teacher block. The public code's GAN functions are missing, so
what the heads see is our design, in the manner of ADD/LADD's feature discriminators:

  * Real x0 (training data, VAE-encoded in latent space) and generated x0 (the student's final-step
    prediction) are both diffused to the same random timestep t ~ U[0, --gan-max-t) with fresh noise,
    so the discriminator compares them at a noise level where the teacher's features are meaningful.
  * The frozen teacher runs on them with the true class label and t; the tokens after each selected
    block go to that block's head: LayerNorm, Linear(D, D/4), SiLU, then a per-token logit plus a
    class-projection term (Miyato & Koyama, 2018); a head's logit is the mean over tokens, and the
    discriminator's output is the mean over heads.
  * Hinge loss for the discriminator, -D(fake) for the generator. Gradients reach the student through
    the frozen teacher; only the heads are trained by the discriminator's optimiser.

The generator loss is L_reg + lambda * L_GAN with lambda = scale * |grad L_reg| / |grad L_GAN| measured
on the student's last output layer, clamped to [0, 1e4], and lambda = 0 during the first warm-up steps
(VQGAN's adaptive weight; ARD: scale 10, warm-up 3,000 steps).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import dist_util
from cli import UserError
from diffusion import create_diffusion
from image_data import image_folder, load_digits
from training import StepBatchSampler, requires_grad
from vae import vae_encode


class DiscriminatorHead(nn.Module):
    """Per-token logits from one block's tokens, class-conditioned by projection."""

    def __init__(self, hidden_size, num_classes, width_ratio=0.25):
        super().__init__()
        width = max(8, int(hidden_size * width_ratio))
        self.norm = nn.LayerNorm(hidden_size)
        self.proj = nn.Linear(hidden_size, width)
        self.out = nn.Linear(width, 1)
        self.class_embed = nn.Embedding(num_classes, width)
        nn.init.normal_(self.class_embed.weight, std=0.02)
        self.scale = width**-0.5

    def forward(self, tokens, y):  # tokens: (N, T, D), y: (N,)
        h = F.silu(self.proj(self.norm(tokens)))  # (N, T, W)
        logits = self.out(h).squeeze(-1) + self.scale * (h * self.class_embed(y)[:, None]).sum(-1)  # (N, T)
        return logits.mean(dim=1)  # (N,)


class FeatureDiscriminator(nn.Module):
    """Heads on the frozen teacher's block features. The teacher is held outside the module's parameters,
    so that the discriminator's state dict and optimiser see only the heads."""

    def __init__(self, teacher, diffusion, blocks, num_classes):
        super().__init__()
        self.diffusion = diffusion
        hidden = teacher.pos_embed.shape[-1]
        self.blocks = sorted(blocks)
        bad = [b for b in self.blocks if not 0 <= b < len(teacher.blocks)]
        if bad:
            raise UserError(f"discriminator blocks {bad} are outside the teacher's {len(teacher.blocks)} blocks")
        self.heads = nn.ModuleList([DiscriminatorHead(hidden, num_classes) for _ in self.blocks])
        self._teacher = [teacher]  # a list keeps it out of parameters(), state_dict() and .to()

    @property
    def teacher(self):
        return self._teacher[0]

    def forward(self, x0, y, t, noise):
        """Discriminator logits (N,) for clean x0, diffused to timesteps t with the given noise."""
        xt = self.diffusion.q_sample(x0, t, noise)
        features = self.teacher.block_features(xt, t, y, self.blocks)
        return torch.stack([head(f, y) for head, f in zip(self.heads, features)], dim=0).mean(dim=0)


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake):
    return -logits_fake.mean()


def adaptive_weight(loss_reg, loss_gan, last_layer, scale=10.0, max_weight=1e4):
    """scale * |grad L_reg| / |grad L_GAN| on last_layer (a parameter), clamped to [0, max_weight]; no graph kept."""
    g_reg = torch.autograd.grad(loss_reg, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(loss_gan, last_layer, retain_graph=True)[0]
    weight = scale * g_reg.norm() / (g_gan.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def real_images(data, image_size, global_batch, seed, rank, world_size, start_step, max_steps, num_workers):
    """An iterator over the real (x, y) batches of each step, for the discriminator: the embedded digits or
    an ImageFolder, in the same step-indexed order on resume."""
    dataset = torch.utils.data.TensorDataset(*load_digits("train", image_size)) if data == "digits" else image_folder(data, image_size)
    sampler = StepBatchSampler(len(dataset), global_batch, seed, rank, world_size, start_step, max_steps)
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=0 if data == "digits" else num_workers))


class GANStage:
    """The adversarial half of a GAN fine-tuning step. `step` trains the discriminator on a real batch and the
    student's (detached) final-step prediction, and returns the generator's loss, L_reg + lambda * L_GAN,
    with the figures to log (the discriminator's loss and lambda)."""

    def __init__(self, teacher, num_classes, blocks, device, real_batches, vae=None, disc_lr=1e-3, scale=10.0,
                 warmup=3000, max_t=1000, precision="fp32", state=None):
        self.diffusion = create_diffusion("")
        self.raw_disc = FeatureDiscriminator(teacher, self.diffusion, blocks, num_classes).to(device)
        self.disc_opt = torch.optim.AdamW(self.raw_disc.parameters(), lr=disc_lr, weight_decay=0)
        if state is not None:
            self.raw_disc.load_state_dict(state["disc"])
            self.disc_opt.load_state_dict(state["disc_opt"])
        self.disc = dist_util.wrap_ddp(self.raw_disc, device)
        self.real_batches, self.vae, self.device, self.precision = real_batches, vae, device, precision
        self.scale, self.warmup, self.max_t = scale, warmup, max_t

    def step(self, step, fake, y, loss_reg, last_layer):
        """fake: the student's final-step prediction (B, C, H, W) with its graph; last_layer: the parameter on
        which lambda compares the two gradients. Returns (generator loss, [discriminator loss, lambda])."""
        x_real, y_real = next(self.real_batches)
        x_real, y_real = x_real.to(self.device), y_real.to(self.device)
        if self.vae is not None:
            x_real = vae_encode(self.vae, x_real)
        # Discriminator step on detached samples, each diffused to a random t (one forward for both halves):
        t = torch.randint(0, self.max_t, (len(x_real) + len(fake),), device=self.device)
        both = torch.cat([x_real, fake.detach()])
        with dist_util.autocast(self.device, self.precision):
            logits = self.disc(both, torch.cat([y_real, y]), t, torch.randn_like(both))
            d_loss = hinge_d_loss(logits[: len(x_real)], logits[len(x_real) :])
        t = t[len(x_real) :]
        self.disc_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        self.disc_opt.step()
        # Generator: regression plus the adaptively weighted adversarial loss after the warm-up.
        weight, loss = torch.zeros((), device=self.device), loss_reg
        if step >= self.warmup:
            requires_grad(self.raw_disc, False)  # the generator's loss flows through the heads, not into them
            with dist_util.autocast(self.device, self.precision):
                g_loss = generator_loss(self.raw_disc(fake, y, t, torch.randn_like(fake)))
            weight = adaptive_weight(loss_reg, g_loss, last_layer, self.scale)
            weight = torch.tensor(dist_util.all_reduce_mean(weight.item(), self.device), device=self.device)
            loss = loss_reg + weight * g_loss
            requires_grad(self.raw_disc, True)
        return loss, [d_loss.item(), weight.item()]

    def state_dict(self):
        return {"disc": self.raw_disc.state_dict(), "disc_opt": self.disc_opt.state_dict(), "disc_blocks": self.raw_disc.blocks}
