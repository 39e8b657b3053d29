"""The GAN stage's parts: the differentiable rollout, what each update may touch, lambda, the
augmentation."""

import math

import pytest
import torch
from helpers import randomised

from ard.gan import GANSettings, GANStage, adaptive_weight, translate
from ard_models import ARD
from models import DiT


def tiny(seed=0, K=3, N=2):
    teacher = randomised(
        DiT(
            input_size=8,
            patch_size=2,
            in_channels=1,
            hidden_size=32,
            depth=3,
            num_heads=2,
            num_classes=4,
        ),
        seed,
    )
    student = ARD(
        timesteps=torch.linspace(999, 999 / K, K).round().tolist(),
        history_layers=N,
        input_size=8,
        patch_size=2,
        in_channels=1,
        hidden_size=32,
        depth=3,
        num_heads=2,
        num_classes=4,
    )
    return teacher.eval(), randomised(student.load_teacher(teacher.state_dict()), seed + 1)


def test_rollout_fake_equals_samples_last_step_and_its_gradient_reaches_every_head():
    _, student = tiny()
    noise, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 3])
    fake = student.rollout(noise, y)[:, -1]
    torch.testing.assert_close(fake, student.sample(noise, y)[:, -1], rtol=0, atol=0)
    fake.square().mean().backward()
    for k, head in enumerate(student.heads):
        assert head.linear.weight.grad is not None and head.linear.weight.grad.abs().sum() > 0, (
            f"no gradient reaches head {k}"
        )


def stage(teacher, warmup=0, scale=0.5, max_weight=10.0, dequantize=0.0, real=None):
    for p in teacher.parameters():
        p.requires_grad = False
    if real is None:
        real = iter([(torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 3]))] * 10)
    settings = GANSettings(
        blocks=(0, 2),
        disc_lr=1e-2,
        scale=scale,
        max_weight=max_weight,
        fixed_weight=None,
        warmup=warmup,
        max_t=300,
        augment=1,
        flip=False,
        dequantize=dequantize,
    )
    config = dict(num_classes=4, learn_sigma=True)
    return GANStage(teacher, config, settings, real, torch.device("cpu"))


def gan_step(gan, step, student, inputs, y, loss_reg):
    """train_ard.py's GAN stage for one step: the discriminator's update, then the generator's
    loss."""
    adversarial = step >= gan.settings.warmup
    fake = (student.rollout if adversarial else student.sample)(inputs[:, 0], y)[:, -1]
    d = gan.discriminator_step(fake.detach(), y)
    if not adversarial:
        return loss_reg, d, None
    loss_gan = gan.generator_loss(fake, y)
    weight = gan.gan_weight(loss_reg, loss_gan, student.last_layer)
    return loss_reg + weight.weight * loss_gan, d, weight


def test_the_discriminator_step_never_changes_the_teacher_nor_the_generator_step_the_heads():
    teacher, student = tiny()
    gan = stage(teacher)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    disc_before = {k: v.clone() for k, v in gan.disc.state_dict().items()}
    inputs, y = torch.randn(4, 3, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    loss_reg = (student(inputs, y) - inputs).square().mean()
    loss, d, weight = gan_step(gan, 0, student, inputs, y, loss_reg)
    assert any(not torch.equal(v, disc_before[k]) for k, v in gan.disc.state_dict().items()), (
        "the discriminator did not train"
    )
    disc_after_d = {k: v.clone() for k, v in gan.disc.state_dict().items()}
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    opt.zero_grad()
    loss.backward()  # the generator's update
    opt.step()
    assert all(p.grad is None for p in gan.disc.parameters()), (
        "the generator's loss left gradients in the heads"
    )
    assert all(torch.equal(v, disc_after_d[k]) for k, v in gan.disc.state_dict().items())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert weight.weight > 0 and all(map(math.isfinite, (*d, *weight)))


def test_lambda_stays_within_its_bounds():
    assert adaptive_weight(torch.tensor(1.0), torch.tensor(1e-12), 0.5, 10.0).item() == 10.0
    assert adaptive_weight(torch.tensor(0.0), torch.tensor(1.0), 0.5, 10.0).item() == 0.0
    assert adaptive_weight(torch.tensor(2.0), torch.tensor(4.0), 0.5, 10.0).item() == pytest.approx(
        0.25
    )


def test_translation_shifts_each_image_and_fills_the_border_with_background():
    torch.manual_seed(0)
    x = torch.arange(2 * 16, dtype=torch.float32).view(2, 1, 4, 4)
    out = translate(x, 1)
    assert out.shape == x.shape
    for i in range(2):
        shifts = [
            (dy, dx)
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if torch.equal(
                out[i],
                torch.nn.functional.pad(x[i], [1] * 4, value=-1.0)[
                    :, 1 - dy : 5 - dy, 1 - dx : 5 - dx
                ],
            )
        ]
        assert len(shifts) == 1


def test_real_images_are_dequantised_within_one_grey_level():
    teacher, _ = tiny()
    levels = torch.randint(0, 17, (4, 1, 8, 8)).float() / 8 - 1  # the digits' 17 grey levels
    real = iter([(levels, torch.tensor([0, 1, 2, 3]))])
    gan = stage(teacher, dequantize=2 / 16, real=real)
    x, _ = gan.real()
    assert (x - levels).abs().max() <= 1 / 16 and (
        x - levels
    ).abs().min() > 0  # off the levels, never past half a level
