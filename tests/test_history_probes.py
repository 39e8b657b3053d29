"""The history probes, the boundary schedules and the teacher-fidelity figures."""

import numpy as np
import pytest
import torch

from ard.seeding import EVALUATION_STREAM, per_index_noise
from ard.trajectory_store import BOUNDARY_SCHEDULES, default_boundaries
from ard_models import ARD
from diffusion import create_diffusion
from diffusion.ode import solver_grid
from evaluator.metrics import two_set_figures
from experiments.history_probe import attention_mass, dose_response, history_swap, same_class_donors


def student(history_layers, num_steps=4, seed=0):
    torch.manual_seed(seed)
    model = ARD(
        timesteps=torch.linspace(999, 999 / num_steps, num_steps).round().tolist(),
        history_layers=history_layers,
        input_size=8,
        patch_size=2,
        in_channels=1,
        hidden_size=32,
        depth=3,
        num_heads=2,
        num_classes=3,
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "pos_embed":
                param.normal_(0, 0.15)
    return model.eval()


def batch(size=12, num_steps=4):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(size, num_steps, 1, 8, 8, generator=gen), torch.arange(size) % 3


@pytest.mark.parametrize("history_layers", [0, 2])
def test_history_swap_changes_nothing_without_history_and_at_the_first_step(history_layers):
    x, y = batch()
    donors = same_class_donors(y, torch.Generator().manual_seed(0))
    assert torch.equal(y[donors], y) and (donors != torch.arange(len(y))).all()
    change = history_swap(student(history_layers), x, y, donors)
    assert change[0] == 0
    if history_layers == 0:
        assert (change == 0).all()
    else:
        assert (change[1:] > 0).all()


def test_attention_mass_on_earlier_steps_is_zero_at_the_first_step_and_a_share_elsewhere():
    x, y = batch()
    mass = attention_mass(student(2), x, y)
    assert mass.shape == (2, 4) and (mass[:, 0] == 0).all()
    assert ((mass[:, 1:] > 0) & (mass[:, 1:] < 1)).all()


def test_dose_response_without_perturbation_is_the_plain_samples_error():
    model = student(2)
    noise, y = batch()[0][:, 0], batch()[1]
    target = torch.randn_like(noise)
    errors = dose_response(model, noise, y, target, [0.0, 0.1])
    assert errors[0.0] == pytest.approx(
        (model.sample(noise, y)[:, -1] - target).square().mean().item(), rel=1e-6
    )
    assert errors[0.1] != errors[0.0]


@pytest.mark.parametrize("schedule", sorted(BOUNDARY_SCHEDULES))
@pytest.mark.parametrize("num_steps", [1, 2, 3, 4, 5])
def test_every_boundary_schedule_starts_at_the_noise_ends_at_the_sample_and_increases(
    schedule, num_steps
):
    grid = solver_grid(create_diffusion("25"))
    bounds = default_boundaries(list(range(26)), grid, num_steps, schedule)
    assert bounds[0] == 0 and bounds[-1] == 25 and len(bounds) == num_steps + 1
    assert all(a < b for a, b in zip(bounds, bounds[1:]))
    manifest = {"save_steps": list(range(26)), "save_timesteps": grid}  # what a store records
    saved = manifest["save_steps"], manifest["save_timesteps"]
    assert default_boundaries(*saved, num_steps, schedule) == bounds


def test_log_snr_boundaries_put_more_content_in_each_step_than_the_t_schedule():
    grid = solver_grid(create_diffusion("25"))
    t_bounds, snr_bounds = (
        default_boundaries(list(range(26)), grid, 4, "t"),
        default_boundaries(list(range(26)), grid, 4, "logsnr"),
    )
    assert [grid[step] for step in t_bounds[1:-1]] == [749, 500, 250]
    # Later (cleaner) states.
    assert all(grid[a] <= grid[b] for a, b in zip(snr_bounds[1:-1], t_bounds[1:-1]))


def test_teacher_fidelity_of_the_teachers_own_samples_is_zero():
    feats = np.random.default_rng(0).standard_normal((400, 16))
    figures = two_set_figures(feats, feats, bootstrap=10)
    assert abs(figures["fid"]) < 1e-8 and figures["precision"] == figures["recall"] == 1.0
    for name in ("fid", "precision", "recall"):  # each interval holds its figure
        assert figures[f"{name}_ci"][0] <= figures[name] <= figures[f"{name}_ci"][1]


def test_the_teachers_floor_compares_two_disjoint_noise_sets_with_the_same_labels():
    # The pipeline's floor: the teacher sampled with --global-seed 0, and with --global-seed 1 and
    # --label-seed 0.
    labels, noise = per_index_noise(0, range(50), (1, 8, 8), EVALUATION_STREAM, num_classes=10)
    floor_labels, floor_noise = per_index_noise(
        1, range(50), (1, 8, 8), EVALUATION_STREAM, num_classes=10, label_seed=0
    )
    assert torch.equal(labels, floor_labels) and len(labels.unique()) > 5
    distances = torch.cdist(noise.flatten(1), floor_noise.flatten(1))
    assert distances.min() > 1.0  # no noise of one set reappears in the other
    own_labels, own_noise = per_index_noise(
        1, range(50), (1, 8, 8), EVALUATION_STREAM, num_classes=10
    )
    # Only the labels moved.
    assert torch.equal(own_noise, floor_noise) and not torch.equal(own_labels, labels)


@pytest.mark.parametrize("near", [64, 4])  # 4: most radii need the fallback over the whole row
def test_bootstrap_precision_recall_from_distances_computed_once_equals_recomputing_them(near):
    from evaluator.metrics import _resampled_precision_recall, precision_recall

    rng = np.random.default_rng(1)
    # 400 fakes: with fewer, numpy's partial sort returns each row's nearest already sorted and a
    # missing sort would pass.
    real, fake = rng.standard_normal((120, 8)), rng.standard_normal((400, 8)) * 1.3
    # Repeated samples (a collapsed model): distances tie, and the radii must not depend on their
    # order.
    fake[350:] = fake[:50]
    fast = _resampled_precision_recall(real, fake, 3, near=near)
    for _ in range(5):
        idx = rng.integers(0, len(fake), len(fake))
        # The same order statistics, exactly.
        assert fast(idx) == precision_recall(real, fake[idx], k=3)


def test_paired_bootstrap_degradation_ratio_is_one_for_the_same_student_and_holds_its_estimate():
    from experiments.degradation import paired_ratios

    rng = np.random.default_rng(0)
    real, teacher, floor = (
        rng.normal(size=(300, 6)),
        rng.normal(0.1, 1, (300, 6)),
        rng.normal(0.1, 1, (300, 6)),
    )
    student = rng.normal(0.5, 1.2, (300, 6))
    point, draws = paired_ratios(real, teacher, floor, student, student, resamples=20)
    # The same student twice: no difference, ratio 1.
    assert np.allclose(point, 1.0) and np.allclose(draws, 1.0)
    # ARD further from the teacher than step distillation: ratio below 1.
    worse = rng.normal(0.8, 1.4, (300, 6))
    point, draws = paired_ratios(real, teacher, floor, student, worse, resamples=50)
    assert point[0] < 1 and point[1] < 1 and draws.shape == (50, 2)
    lo, hi = np.percentile(draws[:, 1], [2.5, 97.5])
    assert lo <= point[1] <= hi


def test_paired_comparison_gives_each_model_its_ratio_and_difference_against_the_baseline():
    from experiments.degradation import paired_comparison, paired_fids, paired_ratios

    rng = np.random.default_rng(1)
    real, teacher, floor = (rng.normal(0.1 * i, 1, (300, 6)) for i in range(3))
    n0, worse = rng.normal(0.5, 1.2, (300, 6)), rng.normal(0.8, 1.4, (300, 6))
    point, draws = paired_fids(real, teacher, floor, dict(n0=n0, ard=worse), resamples=30)
    against = paired_comparison(point, draws, "n0", "ard")
    # The same draws as the one-pair function, and the difference is the FIDs' own.
    ratios, ratio_draws = paired_ratios(real, teacher, floor, n0, worse, resamples=30)
    for i, ref in enumerate(("real", "teacher")):
        assert against[ref]["ratio"] == pytest.approx(ratios[i])
        assert against[ref]["ratio_ci95"] == pytest.approx(
            np.percentile(ratio_draws[:, i], [2.5, 97.5])
        )
        assert against[ref]["difference"] == pytest.approx(point[ref]["n0"] - point[ref]["ard"])
        # A model further from the reference than the baseline: a negative difference.
        assert against[ref]["difference"] < 0 and against[ref]["difference_ci95"][1] < 0
        # Both students far from the teacher: a degradation to divide by.
        assert against[ref]["clearly_worse_than_teacher"]


def test_no_degradation_to_divide_by_when_a_students_paired_interval_reaches_the_teacher():
    from experiments.degradation import paired_comparison, paired_fids

    rng = np.random.default_rng(2)
    real = rng.normal(0, 1, (300, 6))
    teacher, floor = rng.normal(0, 1, (300, 6)), rng.normal(0, 1, (300, 6))
    like_teacher = teacher + rng.normal(0, 0.01, (300, 6))  # the teacher's samples, barely moved
    worse = rng.normal(0.8, 1.4, (300, 6))
    point, draws = paired_fids(real, teacher, floor, dict(n0=worse, ard=like_teacher), 30)
    against = paired_comparison(point, draws, "n0", "ard")
    assert not against["real"]["clearly_worse_than_teacher"]


def test_a_ratio_has_a_degradation_to_divide_by_only_when_every_student_and_its_interval_is_above():
    from experiments.report import clearly_worse

    results = dict(
        far=dict(fid=14.0, fid_ci=[12.5, 15.5]),
        touching=dict(fid=13.0, fid_ci=[11.0, 15.0]),  # the interval reaches the teacher's 11.05
        point_only=dict(fid=12.0),
        better=dict(fid=10.0),
    )
    assert clearly_worse(results, ["far"], "fid", 11.05)
    assert clearly_worse(results, ["far", "point_only"], "fid", 11.05)
    assert not clearly_worse(results, ["far", "touching"], "fid", 11.05)
    assert not clearly_worse(results, ["better"], "fid", 11.05)


def _two_seeds_of_both_students(fids, teacher_fid=10.0):
    """A table's inputs with the teacher and step distillation and ARD of seeds 0 and 1, each
    student's FID `fids[(N, seed)]` (FID against the teacher: the same, the floor 1.0)."""
    from experiments import fashion
    from experiments.pipeline import Row

    setting = fashion.FASHION
    rows = [Row("teacher_ddim25", "teacher_ddim25", 25, "t.pt", "teacher", sampler="ddim")]
    rows.append(
        Row("teacher_ddim25_s1", "teacher_ddim25_s1", 25, "t.pt", "teacher", "ddpm", "ddim", 1)
    )
    results = {
        "teacher_ddim25": dict(fid=teacher_fid, teacher_fid=0.0),
        "teacher_ddim25_s1": dict(fid=teacher_fid, teacher_fid=1.0),
    }
    for (n, seed), fid in fids.items():
        name = f"k4_n{n}_state_s{seed}"
        rows.append(
            Row(
                name,
                f"k4_n{n}_state",
                4,
                "missing.pt",
                "s",
                seed=seed,
                history_layers=n,
                target="state",
            )
        )
        results[name] = dict(fid=fid, teacher_fid=fid - teacher_fid + 1.0)
    costs = {row.group: (1.0, 1.0) for row in rows}
    real = dict(fid=1.0, precision=0.5, recall=0.5)
    return setting, rows, results, costs, real


def test_degradation_pairs_each_seeds_students_by_seed_and_drops_a_seed_missing_one():
    from experiments import fashion
    from experiments.report import comparisons, degradation, summarise

    layers = fashion.FASHION.history_layers
    # Declared out of seed order, as an --only part may leave them, and seed 2 without ARD.
    fids = {(0, 1): 16.0, (layers, 0): 12.0, (0, 0): 14.0, (layers, 1): 12.5, (0, 2): 30.0}
    setting, rows, results, costs, real = _two_seeds_of_both_students(fids)
    state = comparisons(fashion.BUDGETS["quick"])[0]
    ratios, no_gap = degradation(setting, results, rows, state, 10.0, "fid")
    assert sorted(ratios) == [2.0, 2.4]  # (14 - 10) / (12 - 10) and (16 - 10) / (12.5 - 10)
    assert not no_gap
    # The JSON says which seed each ratio is of (seed 2 has no ARD: no ratio, not listed).
    paired = {name: _paired(1.0, True) for name in results if name.startswith("k4_n")}
    budget = fashion.BUDGETS["quick"]
    table = summarise(setting, results, costs, real, rows, budget, {}, "test", True, paired)
    record = table["json"]["degradation_fid_state"]
    assert dict(zip(record["seeds"], record["values"])) == {0: 2.0, 1: 2.4}


def _paired(difference, clearly_worse):
    return {
        ref: dict(
            ratio=2.0,
            ratio_ci95=[1.5, 2.5],
            difference=difference,
            difference_ci95=[difference - 0.5, difference + 0.5],
            clearly_worse_than_teacher=clearly_worse,
        )
        for ref in ("real", "teacher")
    }


def test_every_ratio_shows_each_seeds_paired_difference_and_none_without_a_degradation():
    from experiments import fashion
    from experiments.report import summarise

    layers = fashion.FASHION.history_layers
    fids = {(0, 0): 14.0, (layers, 0): 12.0, (0, 1): 16.0, (layers, 1): 12.5}
    setting, rows, results, costs, real = _two_seeds_of_both_students(fids)
    budget = fashion.BUDGETS["quick"]
    paired = {
        f"k4_n{layers}_state_s0": _paired(2.0, True),
        f"k4_n{layers}_state_s1": _paired(2.5, True),
    }
    table = summarise(setting, results, costs, real, rows, budget, {}, "test", True, paired)
    text = table["markdown"]
    # The ratio over seeds, and beside it each seed's paired difference N=0 - ARD.
    assert "state target: 2.20 ± 0.28" in text
    assert "seed 0: N=0 - ARD +2.00 [+1.50, +2.50], ratio 2.00" in text
    assert "seed 1: N=0 - ARD +2.50 [+2.00, +3.00], ratio 2.00" in text
    assert table["json"]["degradation_fid_state"]["defined"]
    # A seed with ARD alone (an --only part) leaves the paired rule in force for the seeds paired.
    lone = [r for r in rows if r.name != "k4_n0_state_s1"]
    paired_lone = {f"k4_n{layers}_state_s0": _paired(2.0, False)}  # no pair for seed 1
    table = summarise(setting, results, costs, real, lone, budget, {}, "test", True, paired_lone)
    assert not table["json"]["degradation_fid_state"]["defined"]
    # One seed whose paired interval reaches the teacher: no ratio, the differences still shown.
    paired[f"k4_n{layers}_state_s1"] = _paired(2.5, False)
    table = summarise(setting, results, costs, real, rows, budget, {}, "test", True, paired)
    text = table["markdown"]
    assert "state target: none: not every student is clearly worse" in text and "2.20 ±" not in text
    assert "seed 1: N=0 - ARD +2.50 [+2.00, +3.00], no ratio" in text
    assert not table["json"]["degradation_fid_state"]["defined"]
