"""The ARD student: teacher-forced forward equals KV-cached sampling, block causality, teacher
loading."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ard_models import ARD, ARD_models, block_causal_mask, dense_forward
from models import DiT, DiT_models


def student(K=4, N=2, patch=2, size=8, C=3, depth=3, D=32, heads=2, classes=5, seed=0):
    torch.manual_seed(seed)
    timesteps = torch.linspace(999, 999 / K, K).round().tolist()
    model = ARD(
        timesteps=timesteps,
        history_layers=N,
        input_size=size,
        patch_size=patch,
        in_channels=C,
        hidden_size=D,
        depth=depth,
        num_heads=heads,
        num_classes=classes,
    )
    with torch.no_grad():  # random weights everywhere, so that every path carries signal
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.15)
    return model.eval()


CASES = [(1, 0, 2), (1, 3, 2), (2, 1, 1), (3, 0, 4), (4, 2, 2), (4, 3, 2), (3, 3, 4), (5, 1, 2)]


@pytest.mark.parametrize("K,N,patch", CASES)
def test_sample_matches_teacher_forced_forward(K, N, patch):
    model = student(K=K, N=N, patch=patch)
    noise, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 4])
    traj = model.sample(noise, y)
    assert traj.shape == (2, K, 3, 8, 8)
    forced = model(torch.cat([noise[:, None], traj[:, :-1]], dim=1), y)
    torch.testing.assert_close(forced, traj, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("K,N,patch", CASES)
def test_the_preallocated_kv_cache_samples_bit_for_bit_what_the_growing_one_does(K, N, patch):
    from models import KVCache

    model = student(K=K, N=N, patch=patch)
    noise, y = torch.randn(3, 3, 8, 8), torch.tensor([1, 4, 0])
    with torch.no_grad():
        growing = model.rollout(noise, y, cache=KVCache)
    assert torch.equal(model.sample(noise, y), growing)


def perturb_each_step(model, K):
    """Yields (j, outputs, outputs with input step j perturbed) for every step j."""
    x, y = torch.randn(2, K, 3, 8, 8), torch.tensor([0, 3])
    base = model(x, y)
    for j in range(K):
        x2 = x.clone()
        x2[:, j] += torch.randn_like(x2[:, j])
        yield j, base, model(x2, y)


@pytest.mark.parametrize("N", [1, 2, 3])
def test_perturbing_step_j_leaves_earlier_predictions_bit_identical(N):
    K = 4
    model = student(K=K, N=N)
    for j, base, out in perturb_each_step(model, K):
        assert torch.equal(out[:, :j], base[:, :j]), f"steps before {j} changed"
        assert not torch.allclose(out[:, j], base[:, j]), f"step {j} ignores its own input"
        if j + 1 < K:
            assert not torch.allclose(out[:, j + 1 :], base[:, j + 1 :]), (
                f"history of step {j} is not used"
            )


def test_without_history_each_prediction_depends_on_its_own_input_only():
    K = 4
    model = student(K=K, N=0)
    for j, base, out in perturb_each_step(model, K):
        others = [k for k in range(K) if k != j]
        assert torch.equal(out[:, others], base[:, others])
        assert not torch.allclose(out[:, j], base[:, j])


def random_teacher(C=3, patch=2, size=8, depth=3, D=32, heads=2, classes=5):
    torch.manual_seed(1)
    teacher = DiT(
        input_size=size,
        patch_size=patch,
        in_channels=C,
        hidden_size=D,
        depth=depth,
        num_heads=heads,
        num_classes=classes,
        learn_sigma=True,
    )
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.15)
    return teacher.eval()


@pytest.mark.parametrize("N", [0, 3])
def test_one_step_student_loaded_from_teacher_equals_teacher_noise_channels(N):
    teacher = random_teacher()
    model = (
        ARD(
            timesteps=[957],
            history_layers=N,
            input_size=8,
            patch_size=2,
            in_channels=3,
            hidden_size=32,
            depth=3,
            num_heads=2,
            num_classes=5,
        )
        .load_teacher(teacher.state_dict())
        .eval()
    )
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 2, 4])
    expected = teacher(x, torch.full((3,), 957), y)[:, :3]
    torch.testing.assert_close(model(x[:, None], y)[:, 0], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.sample(x, y)[:, 0], expected, rtol=1e-4, atol=1e-5)


def test_load_teacher_names_missing_and_mismatched_keys():
    teacher = random_teacher(depth=2)
    model = student(depth=3)
    with pytest.raises(ValueError, match=r"missing: blocks\.2\."):
        model.load_teacher(teacher.state_dict())
    wide = random_teacher(D=48, heads=2)
    with pytest.raises(
        ValueError, match=r"shape mismatch: pos_embed \(1, 16, 48\) vs \(1, 16, 32\)"
    ):
        model.load_teacher(wide.state_dict())


def test_every_head_starts_as_the_teachers_final_layer():
    teacher = random_teacher()
    model = student(K=3).load_teacher(teacher.state_dict())
    for head in model.heads:
        for name, value in head.state_dict().items():
            assert torch.equal(value, model.heads[0].state_dict()[name])


def test_block_causal_mask_lets_each_step_see_itself_and_its_past():
    mask = block_causal_mask(3, 2)
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("key", sorted(ARD_models))
def test_every_config_builds_on_meta_and_counts_flops(key):
    assert set(ARD_models) == set(DiT_models)
    with torch.device("meta"):
        model = ARD_models[key](
            timesteps=[999, 500], history_layers=2, input_size=16, num_classes=10
        )
        x, y = torch.randn(1, 2, 4, 16, 16), torch.zeros(1, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            model.sample(x[:, 0], y)
        assert counter.get_total_flops() > 0
        with FlopCounterMode(display=False) as counter:
            model(x, y).sum().backward()
        assert counter.get_total_flops() > 0


def test_nothing_is_hardcoded_odd_steps_patch_size_input_and_depth():
    model = student(K=3, N=2, patch=4, size=12, C=1, depth=5, D=24, heads=3, classes=7)
    noise, y = torch.randn(2, 1, 12, 12), torch.tensor([0, 6])
    traj = model.sample(noise, y)
    assert traj.shape == (2, 3, 1, 12, 12)
    torch.testing.assert_close(
        model(torch.cat([noise[:, None], traj[:, :-1]], 1), y), traj, rtol=1e-4, atol=1e-5
    )


def test_history_layers_outside_the_depth_are_refused():
    with pytest.raises(ValueError, match="history_layers"):
        ARD(
            timesteps=[999],
            history_layers=4,
            input_size=8,
            patch_size=2,
            in_channels=1,
            hidden_size=16,
            depth=3,
            num_heads=2,
        )


@pytest.mark.parametrize("per_token", [False, True])
def test_efficient_forward_equals_dense_all_layers_masked_forward(per_token):
    model = student(K=4, N=2)
    x, y = torch.randn(2, 4, 3, 8, 8), torch.tensor([1, 2])
    torch.testing.assert_close(
        model(x, y), dense_forward(model, x, y, per_token), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("K,N,patch", [(1, 2, 2), (3, 1, 4), (4, 2, 2), (5, 3, 2)])
def test_per_step_history_attention_is_the_masked_function_with_the_same_gradients(K, N, patch):
    """The flash-eligible pass (each step's queries over the keys of steps <= k, no mask) against
    the dense masked reference: outputs and every parameter's gradient, within fp32 rounding."""
    model = student(K=K, N=N, patch=patch).train()
    x, y = torch.randn(2, K, 3, 8, 8), torch.tensor([1, 4])
    target = torch.randn(2, K, 3, 8, 8)
    grads = {}
    for mode in ("mask", "per_step"):
        model.history_attention = mode
        model.zero_grad()
        out = model(x, y)
        ((out - target) ** 2).mean().backward()
        grads[mode] = (
            out.detach(),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        )
    torch.testing.assert_close(
        grads["per_step"][0], dense_forward(model, x, y), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(grads["per_step"][0], grads["mask"][0], rtol=1e-5, atol=1e-6)
    assert grads["per_step"][1].keys() == grads["mask"][1].keys()
    for name, g in grads["mask"][1].items():
        torch.testing.assert_close(grads["per_step"][1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_per_step_history_attention_is_block_causal():
    model = student(K=4, N=3)
    model.history_attention = "per_step"
    x, y = torch.randn(1, 4, 3, 8, 8), torch.tensor([2])
    later = x.clone()
    later[:, 2:] += 1.0  # change steps 2 and 3: steps 0 and 1 must not move
    a, b = model(x, y), model(later, y)
    assert torch.equal(a[:, :2], b[:, :2]) and not torch.allclose(a[:, 2:], b[:, 2:])
