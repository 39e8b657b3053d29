"""The GAN fine-tuning stage: the discriminator, the losses, and one GAN step (GANStage).

ARD's second stage adds an adversarial loss to the regression loss, with the frozen teacher as the feature
network and one light head per teacher block (the paper's elements). The public code's GAN functions are
missing; what the heads see, at which noise levels, and how the two losses are balanced is our design, after
ADD/LADD's feature discriminators and what failed on the digits (docs/gan.md):

  * The fake is the student's own sample: a differentiable rollout of its K steps (ARD.rollout), the way it
    samples, so the adversarial loss sees the errors it accumulates and its gradient reaches every step's head.
  * Real x0 (training data; in latent space VAE-encoded, with random horizontal flips) and fake x0 are
    translated at random by up to an eighth of their side (DiffAugment's translation; pixel space only) and
    diffused to the same kind of noise level, t ~ U[0, --gan-max-t) with fresh noise. The default keeps
    t < 300, where alpha-bar >= 0.4: at higher t the teacher's features cannot tell real from fake, and the
    gradient reaching the sample is scaled by sqrt(alpha-bar).
  * The frozen teacher runs on them with the true class and t; the tokens after each selected block go to that
    block's head: LayerNorm, spectrally normalised Linear(D, D/4), SiLU, then a spectrally normalised per-token
    logit plus a class-projection term (Miyato & Koyama, 2018); a head's logit is the mean over tokens, the
    discriminator's the mean over heads. Spectral norm bounds how sharp the heads can become.
  * Hinge loss for the discriminator (AdamW at --disc-lr), -D(fake) for the generator. Gradients reach the
    student through the frozen teacher; only the heads are trained by the discriminator's optimiser.

The generator's loss is L_reg + lambda * L_GAN, with lambda = scale * |grad L_reg| / |grad L_GAN| measured on
the student's last output layer (VQGAN's adaptive weight), clamped to [0, --gan-max-weight], and lambda = 0
during the first --gan-warmup steps (the discriminator trains during the warm-up). The paper uses scale 10;
on the digits that lets the adversarial gradient dominate and the student drifts, so the default is 0.5:
the regression to the teacher's trajectories stays the anchor.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from ard import dist_util
from ard.cli import UserError
from ard.data import EMBEDDED, image_folder, load_embedded
from ard.training import StepBatchSampler, requires_grad
from ard.vae import vae_encode
from diffusion import create_diffusion
from diffusion.flow import FlowMatching


class DiscriminatorHead(nn.Module):
    """Per-token logits from one block's tokens, class-conditioned by projection, spectrally normalised."""

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
        logits = self.out(h).squeeze(-1) + self.scale * (h * self.class_embed(y)[:, None]).sum(
            -1
        )  # (N, T)
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
            raise UserError(
                f"discriminator blocks {bad} are outside the teacher's {len(teacher.blocks)} blocks"
            )
        self.heads = nn.ModuleList([DiscriminatorHead(hidden, num_classes) for _ in self.blocks])
        self._teacher = [teacher]  # a list keeps it out of parameters(), state_dict() and .to()

    @property
    def teacher(self):
        return self._teacher[0]

    def forward(self, x0, y, t, noise):
        """Discriminator logits (N,) for clean x0, diffused to timesteps t of DiT's 1000-step diffusion with the given
        noise; a flow teacher reads t as the noise level t / 1000 in its own time convention."""
        if isinstance(self.diffusion, FlowMatching):
            s = t.float() / 1000
            xt, t = self.diffusion.q_sample(x0, s, noise), self.diffusion.model_time(s)
        else:
            xt = self.diffusion.q_sample(x0, t, noise)
        features = self.teacher.block_features(xt, t, y, self.blocks)
        return torch.stack([head(f, y) for head, f in zip(self.heads, features)], dim=0).mean(dim=0)


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake):
    return -logits_fake.mean()


def gradient_norms(loss_reg, loss_gan, last_layer):
    """|grad L_reg| and |grad L_GAN| on last_layer (a parameter); the graph is kept for the backward pass."""
    g_reg = torch.autograd.grad(loss_reg, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(loss_gan, last_layer, retain_graph=True)[0]
    return g_reg.norm(), g_gan.norm()


def adaptive_weight(reg_norm, gan_norm, scale, max_weight):
    """lambda = scale * |grad L_reg| / |grad L_GAN|, clamped to [0, max_weight] (VQGAN's adaptive weight)."""
    return (scale * reg_norm / (gan_norm + 1e-8)).clamp(0.0, max_weight).detach()


def translate(x, max_shift):
    """Each image shifted by its own random offset in [-max_shift, max_shift] pixels along each axis, the
    uncovered border filled with the background value -1 (DiffAugment's translation, for both real and fake)."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    dy, dx = (torch.randint(-max_shift, max_shift + 1, (n,), device=x.device) for _ in range(2))
    rows = torch.arange(h, device=x.device)[None, :] + max_shift - dy[:, None]  # (n, h)
    cols = torch.arange(w, device=x.device)[None, :] + max_shift - dx[:, None]  # (n, w)
    idx = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def real_images(
    data,
    image_size,
    global_batch,
    seed,
    rank,
    world_size,
    start_step,
    max_steps,
    num_workers,
    worker_init_fn=None,
):
    """An iterator over the real (x, y) batches of each step, for the discriminator: an embedded dataset or
    an ImageFolder, in the same step-indexed order on resume."""
    dataset = (
        torch.utils.data.TensorDataset(*load_embedded(data, "train", image_size))
        if data in EMBEDDED
        else image_folder(data, image_size)
    )
    sampler = StepBatchSampler(
        len(dataset), global_batch, seed, rank, world_size, start_step, max_steps
    )
    return iter(
        torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=0 if data in EMBEDDED else num_workers,
            worker_init_fn=worker_init_fn,
        )
    )


class GANStage:
    """The adversarial half of a GAN fine-tuning step. `step` makes the fake (the student's differentiable rollout),
    trains the discriminator on a real batch and the detached fake, and returns the generator's loss
    L_reg + lambda * L_GAN with the figures to log."""

    FIGURES = (
        "d_loss",
        "gan_weight",
        "grad_reg",
        "grad_gan",
        "d_real",
        "d_fake",
        "fake_min",
        "fake_max",
    )

    def __init__(
        self,
        teacher,
        num_classes,
        blocks,
        device,
        real_batches,
        vae=None,
        disc_lr=2e-4,
        scale=0.5,
        max_weight=10.0,
        warmup=100,
        max_t=300,
        augment=0,
        flip=False,
        dequantize=0.0,
        precision="fp32",
        state=None,
        weight=None,
        process=None,
    ):
        self.diffusion = (
            process if process is not None else create_diffusion("")
        )  # the teacher's (teacher_process)
        self.raw_disc = FeatureDiscriminator(teacher, self.diffusion, blocks, num_classes).to(
            device
        )
        self.disc_opt = torch.optim.AdamW(self.raw_disc.parameters(), lr=disc_lr, weight_decay=0)
        if state is not None:
            self.raw_disc.load_state_dict(state["disc"])
            self.disc_opt.load_state_dict(state["disc_opt"])
        self.disc = dist_util.wrap_ddp(self.raw_disc, device)
        self.real_batches, self.vae, self.device, self.precision = (
            real_batches,
            vae,
            device,
            precision,
        )
        self.scale, self.max_weight, self.warmup, self.max_t = scale, max_weight, warmup, max_t
        self.augment, self.flip, self.dequantize, self.fixed_weight = (
            augment,
            flip,
            dequantize,
            weight,
        )

    def real(self):
        x, y = next(self.real_batches)
        x, y = x.to(self.device), y.to(self.device)
        if (
            self.flip
        ):  # image folders: random horizontal flips, drawn from the step's seeded generator
            x = torch.where(
                (torch.rand(len(x), device=x.device) < 0.5)[:, None, None, None], x.flip(-1), x
            )
        if self.dequantize:  # real images take a few grey levels, the student's any value: hide the levels from the heads
            x = x + self.dequantize * (torch.rand_like(x) - 0.5)
        return (vae_encode(self.vae, x) if self.vae is not None else x), y

    def logits(self, disc, x0, y):
        t = torch.randint(0, self.max_t, (len(x0),), device=self.device)
        return disc(translate(x0, self.augment), y, t, torch.randn_like(x0))

    def step(self, step, student, noise, y, loss_reg, last_layer):
        """student: the raw student (its rollout from `noise` and labels `y` is the fake); last_layer: the parameter
        on which lambda compares the two gradients. Returns (generator loss, figures in the order of FIGURES)."""
        adversarial = step >= self.warmup
        with dist_util.autocast(self.device, self.precision):
            fake = (student.rollout if adversarial else student.sample)(noise, y)[:, -1]
        # Discriminator step on the detached fake and a real batch:
        x_real, y_real = self.real()
        with dist_util.autocast(self.device, self.precision):
            logits = self.logits(
                self.disc, torch.cat([x_real, fake.detach()]), torch.cat([y_real, y])
            )
            d_loss = hinge_d_loss(logits[: len(x_real)], logits[len(x_real) :])
        self.disc_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        self.disc_opt.step()
        self.disc_opt.zero_grad(
            set_to_none=True
        )  # any gradient a head holds from here on would be the generator's
        figures = [
            d_loss.item(),
            0.0,
            0.0,
            0.0,
            logits[: len(x_real)].mean().item(),
            logits[len(x_real) :].mean().item(),
            fake.min().item(),
            fake.max().item(),
        ]
        if not adversarial:
            return loss_reg, figures
        # Generator: regression plus the adaptively weighted adversarial loss; the heads are frozen for it.
        requires_grad(self.raw_disc, False)
        with dist_util.autocast(self.device, self.precision):
            g_loss = generator_loss(self.logits(self.raw_disc, fake.float(), y))
        requires_grad(self.raw_disc, True)
        reg_norm, gan_norm = gradient_norms(loss_reg, g_loss, last_layer)
        reg_norm, gan_norm = (
            torch.tensor(v, device=self.device)
            for v in dist_util.all_reduce_mean([reg_norm.item(), gan_norm.item()], self.device)
        )
        weight = (
            adaptive_weight(reg_norm, gan_norm, self.scale, self.max_weight)
            if self.fixed_weight is None
            else torch.tensor(self.fixed_weight, device=self.device)
        )
        figures[1:4] = [weight.item(), reg_norm.item(), gan_norm.item()]
        return loss_reg + weight * g_loss, figures

    def state_dict(self):
        return {
            "disc": self.raw_disc.state_dict(),
            "disc_opt": self.disc_opt.state_dict(),
            "disc_blocks": self.raw_disc.blocks,
        }
