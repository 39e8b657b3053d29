"""The tables and figures of an embedded experiment: every model against the real test images and
against its teacher's own samples, with intervals (over samples for one seed, over seeds for
several), the degradation ratios of the paper's form, the held-out per-step MSE, and the figures
the docs show. A table's rows are pipeline.Row: each knows its group, teacher, sampler, N, target,
variant and seed."""

import json
import os
import statistics
from dataclasses import dataclass

import numpy as np

# The flow-matching teacher (train.py --objective flow) writes its trajectories with Heun over
# FLOW_STEPS uniform steps in t: 2 * FLOW_STEPS - 1 model evaluations, about the 25 of the DDIM
# teacher; its students are judged against its samples of that sampler, FLOW_TEACHER.
FLOW_SOLVER, FLOW_STEPS = "heun", 13
FLOW_TEACHER = f"flow_teacher_{FLOW_SOLVER}{FLOW_STEPS}"


# The samples each teacher's rows and students are judged against (teacher fidelity): its own, by
# the sampler that wrote its trajectories.
TEACHER_REFERENCE = {"ddpm": "teacher_ddim25", "flow": FLOW_TEACHER}
SAMPLER_NAMES = {"ddim": "DDIM", "heun": "Heun", "euler": "Euler"}


@dataclass(frozen=True)
class Comparison:
    """Step distillation (N = 0) against ARD: 4-step students of one teacher, target and variant."""

    key: str  # its name in results.json: degradation_fid_KEY, degradation_teacher_fid_KEY
    text: str  # what the table says it compares
    teacher_objective: str = "ddpm"
    target: str = "state"
    variant: str = "plain"


def comparisons(budget):
    """The degradation ratios a run reports, where it has their rows."""
    return [
        Comparison("state", "state target"),
        Comparison("x0", "x0 target", target="x0"),
        Comparison(
            "short", f"after {budget.get('headroom_steps')} steps (headroom)", variant="short"
        ),
        Comparison("long", f"after {budget.get('long_steps', 0):,} steps", variant="long"),
        Comparison(
            "flow_state",
            f"flow teacher ({FLOW_SOLVER} {FLOW_STEPS}), state target",
            teacher_objective="flow",
        ),
    ]


def seeds_of(
    rows, history_layers, teacher_objective="ddpm", target="state", variant="plain", noise=0.0
):
    """The names of the rows of one 4-step student, its seeds in the order they were declared."""
    return [
        row.name
        for row in rows
        if not row.is_teacher
        and row.steps == 4
        and (row.history_layers, row.teacher_objective, row.target, row.variant, row.history_noise)
        == (history_layers, teacher_objective, target, variant, noise)
    ]


def mean_spread(values):
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def cell(results, names, key, digits):
    """One figure of a table: over several seeds their mean ± standard deviation; for one, the value
    and its 95% bootstrap interval over samples."""
    values = [results[name][key] for name in names if key in results[name]]
    if not values:
        return "-"
    if len(values) > 1:
        mean, std = mean_spread(values)
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    ci = results[names[0]].get(f"{key}_ci")
    return f"{values[0]:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def row_label(setting, row, budget):
    """The line of a row's group: 'Teacher DDIM, CFG 1.5', 'ARD (N=3), x0 target',
    'Flow teacher Heun, CFG 1.5', "Flow teacher's step distillation (N=0)", ..."""
    flow = row.teacher_objective == "flow"
    if row.is_teacher:
        teacher = "Flow teacher" if flow else "Teacher"
        label = f"{teacher} {SAMPLER_NAMES[row.sampler]}, CFG {setting.cfg}"
        return label + (", other noises (the floor)" if row.seed else "")
    if row.history_layers == 0:
        label = "Flow teacher's step distillation (N=0)" if flow else "Step distillation (N=0)"
    else:
        label = ("Flow teacher's " if flow else "") + f"ARD (N={row.history_layers})"
    if row.target == "x0":
        label += ", x0 target"
    if row.variant == "short":
        label += f", after {budget['headroom_steps']} steps (headroom)"
    if row.variant == "long":
        label += f", after {budget['long_steps']:,} steps"
    if row.variant == "gan":
        label += " + GAN fine-tuning"
    if row.history_noise:
        label += f", history noise {row.history_noise:g}"
    return label


def seed_pairs(setting, rows, comparison):
    """{seed: (step distillation's row name, ARD's)} of the comparison's students, for the seeds
    that have both (an --only part may hold one student of a seed and not the other)."""
    seed_of = {row.name: row.seed for row in rows}
    distilled, ard = (
        {
            seed_of[name]: name
            for name in seeds_of(
                rows, layers, comparison.teacher_objective, comparison.target, comparison.variant
            )
        }
        for layers in (0, setting.history_layers)
    )
    return {seed: (distilled[seed], ard[seed]) for seed in distilled if seed in ard}


def degradation(setting, results, rows, comparison, teacher, key):
    """(FID_N=0 - FID_teacher) / (FID_ARD - FID_teacher) per seed that has both of the comparison's
    students (paired by seed: an --only part may hold one student of a seed and not the other), the
    teacher's figure being `teacher`; and whether some student is not clearly worse than the
    teacher: its figure, or the lower end of its interval, at or below the teacher's (then there is
    no degradation to compare, and the ratio means nothing)."""
    pairs = seed_pairs(setting, rows, comparison)
    ratios = [
        (results[distilled][key] - teacher) / (results[ard][key] - teacher)
        for distilled, ard in pairs.values()
    ]
    names = [name for pair in pairs.values() for name in pair]
    return ratios, not clearly_worse(results, names, key, teacher)


def clearly_worse(results, names, key, teacher):
    """Whether every named student's figure `key`, and the lower end of its interval, is above the
    teacher's figure: a degradation to divide by. The rule where only each row's own interval is
    known; where a seed's paired bootstrap ran, degradation.paired_comparison's is sharper."""
    return all(
        min(results[name][key], results[name].get(f"{key}_ci", [results[name][key]])[0]) > teacher
        for name in names
    )


def paired_text(seed, comparison):
    """One seed's paired comparison (degradation.paired_comparison, one reference) in words: 'seed
    0: N=0 - ARD +0.52 [+0.10, +0.95], ratio 1.30 [1.05, 1.61]'; no ratio where a student's
    interval reaches the teacher."""
    lo, hi = comparison["difference_ci95"]
    text = f"seed {seed}: N=0 - ARD {comparison['difference']:+.2f} [{lo:+.2f}, {hi:+.2f}]"
    if not comparison["clearly_worse_than_teacher"]:
        return text + ", no ratio"
    lo, hi = comparison["ratio_ci95"]
    return text + f", ratio {comparison['ratio']:.2f} [{lo:.2f}, {hi:.2f}]"


def interval(values):
    """'mean ± std, 95% t-interval [lo, hi]' over seeds (the interval with 2 or more values)."""
    from scipy.stats import t

    mean, std = mean_spread(values)
    text = f"{mean:.2f} ± {std:.2f}"
    if len(values) > 1:
        half = t.ppf(0.975, len(values) - 1) * std / len(values) ** 0.5
        text += f", 95% t-interval [{mean - half:.2f}, {mean + half:.2f}]"
    return text


def validation_record(row):
    """The validation a student's run logged at the step of the row's checkpoint (its held-out
    per-step MSE, val_ar_step_mse and val_tf_step_mse), or None."""
    run = os.path.dirname(os.path.dirname(row.checkpoint))
    at = int(os.path.basename(row.checkpoint).split(".")[0])
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return next(
            (r for r in map(json.loads, f) if r.get("step") == at and "val_ar_step_mse" in r),
            None,
        )


def step_mse(rows):
    """Each student group's held-out per-step MSE against the teacher's states, sampled (AR) and
    teacher-forced (TF), at the step of its checkpoint, from its run's metrics:
    {group: {sampled, teacher_forced, seeds}}."""
    records = {}
    for row in rows:
        record = None if row.is_teacher else validation_record(row)
        if record is not None:
            records.setdefault(row.group, []).append(record)
    return {
        group: {
            "sampled": [statistics.mean(v) for v in zip(*[r["val_ar_step_mse"] for r in recs])],
            "teacher_forced": [
                statistics.mean(v) for v in zip(*[r["val_tf_step_mse"] for r in recs])
            ],
            "seeds": len(recs),
        }
        for group, recs in records.items()
    }


def history_students(setting, rows, variant):
    """The 4-step state students of DiT's teacher in `variant` (short: the headroom checkpoints;
    plain), if some differ from the main pair in their depth of history or in noise on it (the
    --history modes); else []."""
    students = [
        row
        for row in rows
        if not row.is_teacher
        and (row.teacher_objective, row.target, row.variant, row.steps)
        == ("ddpm", "state", variant, 4)
    ]
    others = [
        row
        for row in students
        if row.history_layers not in (0, setting.history_layers) or row.history_noise
    ]
    return students if others else []


def history_table(setting, results, rows, budget, paired, variant="short"):
    """The students of `variant` by depth of history and noise on it (the --history modes): markdown
    lines and their JSON. Every ratio and difference is against step distillation (N = 0, no
    noise) of the same seed; a ratio is shown only where both students are clearly worse than the
    teacher by the paired bootstrap (else there is no degradation to divide by)."""
    short = history_students(setting, rows, variant)

    def clear(row, ref):
        # Both students clearly worse than the teacher, by the seed's paired bootstrap.
        return paired[row.name][ref]["clearly_worse_than_teacher"]

    def final(row, which):
        record = validation_record(row)
        return record[f"val_{which}_step_mse"][-1] if record else None

    def mse_cell(values):
        # '-' where a seed's run logged no validation at this step.
        if None in values:
            return "-"
        mean, spread = mean_spread(values)
        return f"{mean:.5f} ± {spread:.5f}"

    if variant == "short":
        what = f"The headroom setting ({budget['headroom_steps']} steps)"
    else:
        what = f"The {budget['distil_steps']:,}-step students"
    lines = [
        "",
        f"{what} by depth of history N and noise on the history "
        "inputs in training (mean ± std over seeds; ratio = (N=0 - teacher) / (model - teacher) "
        "per seed against step distillation of the same seed, with its 95% t-interval over seeds; "
        "'-' where, on some seed, the paired bootstrap's 95% interval of a student's FID minus "
        "the teacher's reaches 0):",
        "",
        "| N | history noise | FID vs real | FID vs teacher | sampled final-step MSE "
        "| teacher-forced final-step MSE | ratio vs real | ratio vs teacher | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups = {}
    for row in short:
        groups.setdefault((row.history_noise, row.history_layers), []).append(row)
    out = {}
    for (noise, layers), group in sorted(groups.items()):
        names = [row.name for row in group]
        sampled = [final(row, "ar") for row in group]
        forced = [final(row, "tf") for row in group]
        cells = []
        for ref in ("real", "teacher"):
            if layers == 0 and not noise:
                cells.append("1 (the baseline)")
            elif all(row.name in paired and clear(row, ref) for row in group):
                cells.append(interval([paired[row.name][ref]["ratio"] for row in group]))
            else:
                cells.append("-")
        lines.append(
            f"| {layers} | {noise:g} | {cell(results, names, 'fid', 2)} | "
            f"{cell(results, names, 'teacher_fid', 2)} | "
            f"{mse_cell(sampled)} | {mse_cell(forced)} | "
            f"{cells[0]} | {cells[1]} | {len(group)} |"
        )
        out[f"n{layers}_noise{noise:g}"] = dict(
            history_layers=layers,
            history_noise=noise,
            seeds=[row.seed for row in group],
            fid=[results[n]["fid"] for n in names],
            teacher_fid=[results[n]["teacher_fid"] for n in names],
            sampled_final_mse=sampled,
            teacher_forced_final_mse=forced,
            paired={row.seed: paired.get(row.name) for row in group},
        )
    lines += [
        "",
        "Each seed against step distillation of the same seed (95% percentile intervals of one "
        "paired bootstrap over its samples; difference = FID of N=0 minus the model's, so "
        "positive means the model is closer):",
        "",
        "| N | history noise | seed | ratio vs real | difference vs real | ratio vs teacher "
        "| difference vs teacher |",
        "|---|---|---|---|---|---|---|",
    ]
    for (noise, layers), group in sorted(groups.items()):
        for row in group:
            if row.name not in paired:
                continue
            figures = []
            for ref in ("real", "teacher"):
                p = paired[row.name][ref]
                lo, hi = p["ratio_ci95"]
                figures.append(f"{p['ratio']:.2f} [{lo:.2f}, {hi:.2f}]" if clear(row, ref) else "-")
                lo, hi = p["difference_ci95"]
                figures.append(f"{p['difference']:.2f} [{lo:.2f}, {hi:.2f}]")
            lines.append(f"| {layers} | {noise:g} | {row.seed} | " + " | ".join(figures) + " |")
    return lines, out


def summarise(setting, results, costs, real, rows, budget, mse, mode, quick, paired=None):
    """The tables of a run (markdown, and everything in them as JSON): every row against the real
    test images and against the teacher's own samples, the degradation ratios, the held-out per-step
    MSE; with `paired` (pipeline.paired_students) each ratio's per-seed paired comparison, and the
    tables by depth of history and noise."""
    groups = {}
    for row in rows:
        groups.setdefault(row.group, []).append(row)

    def sort_key(group):
        # The teacher by steps, the 4-step students, the other step counts; the flow teacher's last.
        row = groups[group][0]
        student = not row.is_teacher
        return (
            row.teacher_objective == "flow",
            student,
            student and row.steps != 4,
            row.steps,
            group,
        )

    lines = [
        f"Against {setting.real} ({setting.data} features; one seed: 95% bootstrap interval over "
        "samples; several: mean ± std over seeds):",
        "",
        "| model | steps | MFLOPs / image | CPU ms / image | FID | precision | recall "
        "| class accuracy | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fidelity = [
        "",
        "Against the 25-step teacher's own samples of the same noises and labels "
        "(teacher fidelity):",
        "",
        "| model | steps | FID vs teacher | precision vs teacher | recall vs teacher | seeds |",
        "|---|---|---|---|---|---|",
    ]
    out = {"rows": [], "budgets": budget, "quick": quick, "mode": mode}
    for group in sorted(groups, key=sort_key):
        names = [row.name for row in groups[group]]
        label = row_label(setting, groups[group][0], budget)
        steps = groups[group][0].steps
        flops, seconds = costs[group]
        lines.append(
            f"| {label} | {steps} | {flops / 1e6:.1f} | {1000 * seconds:.2f} | "
            f"{cell(results, names, 'fid', 2)} | {cell(results, names, 'precision', 3)} | "
            f"{cell(results, names, 'recall', 3)} | {cell(results, names, 'class_accuracy', 3)} | "
            f"{len(names)} |"
        )
        if "teacher_fid" in results[names[0]]:
            fidelity.append(
                f"| {label} | {steps} | {cell(results, names, 'teacher_fid', 2)} | "
                f"{cell(results, names, 'teacher_precision', 3)} | "
                f"{cell(results, names, 'teacher_recall', 3)} | {len(names)} |"
            )
        keys = [
            key
            for key, value in results[names[0]].items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        ]
        out["rows"].append(
            dict(
                group=group,
                label=label,
                steps=steps,
                flops_per_image=flops,
                cpu_seconds_per_image=seconds,
                seeds=len(names),
                **{
                    key: {
                        "mean": mean_spread([results[name][key] for name in names])[0],
                        "std": mean_spread([results[name][key] for name in names])[1],
                        "values": [results[name][key] for name in names],
                        "ci": [results[name].get(f"{key}_ci") for name in names],
                    }
                    for key in keys
                },
            )
        )
    lines.append(
        f"| {setting.real_train} | - | - | - | {real['fid']:.2f} | {real['precision']:.3f} | "
        f"{real['recall']:.3f} | {real.get('class_accuracy', float('nan')):.3f} | - |"
    )
    lines += fidelity
    out["real_train"] = real
    out["teacher_fid"] = results[TEACHER_REFERENCE["ddpm"]]["fid"]
    seed_of = {row.name: row.seed for row in rows}
    # Each teacher's floor against its own samples: its samples of other noises.
    floors = {row.teacher_objective: row.name for row in rows if row.is_teacher and row.seed == 1}
    for comparison in comparisons(budget):
        own = TEACHER_REFERENCE[comparison.teacher_objective]
        if own not in results:
            continue
        floor = results.get(floors.get(comparison.teacher_objective), {}).get("teacher_fid")
        for key, teacher, what in (
            ("fid", results[own]["fid"], "FID against the real test images"),
            ("teacher_fid", floor, "FID against the teacher (its floor as the teacher's figure)"),
        ):
            if teacher is None:
                continue
            ratios, no_gap = degradation(setting, results, rows, comparison, teacher, key)
            if not ratios:
                continue
            # The seeds the ratios are of: those with both students.
            by_seed = seed_pairs(setting, rows, comparison)
            ard = [name for _, name in by_seed.values()]
            ref = "real" if key == "fid" else "teacher"
            pairs = {name: paired[name][ref] for name in ard if name in (paired or {})}
            if len(pairs) == len(ard):
                # Each seed's paired bootstrap: the sharper rule of whether there is a degradation.
                no_gap = not all(p["clearly_worse_than_teacher"] for p in pairs.values())
            mean, std = mean_spread(ratios)
            head = (
                f"Degradation ratio (N=0 - teacher) / (ARD - teacher), {what}, {comparison.text}: "
            )
            if no_gap:
                lines += [
                    "",
                    head + f"none: not every student is clearly worse than the teacher's "
                    f"{teacher:.2f} (a student's FID or its interval reaches it, or on some seed "
                    "the paired bootstrap's 95% interval of its FID minus the teacher's reaches "
                    "0); there is no degradation to divide by",
                ]
            else:
                lines += [
                    "",
                    head + f"{interval(ratios)} over {len(ratios)} seed(s), values "
                    f"{[round(ratio, 2) for ratio in ratios]} (the paper: 5.1)",
                ]
            if pairs:
                lines.append(
                    "Each seed's paired bootstrap (95% percentile intervals; N=0 - ARD: FID of "
                    "step distillation minus ARD's, positive where ARD is closer): "
                    + "; ".join(paired_text(seed_of[name], p) for name, p in pairs.items())
                )
            out[f"degradation_{key}_{comparison.key}"] = {
                "mean": mean,
                "std": std,
                "values": ratios,
                "seeds": list(by_seed),  # the seed of each value
                "defined": not no_gap,
                "paired": pairs,
            }
    if FLOW_TEACHER in results:
        teacher_fid = results[FLOW_TEACHER]["fid"]
        for layers in (0, setting.history_layers):
            fids = [
                results[name]["fid"] for name in seeds_of(rows, layers, teacher_objective="flow")
            ]
            if fids:
                ratio = [fid / teacher_fid for fid in fids]
                student = "step distillation" if layers == 0 else f"ARD (N={layers})"
                lines += [
                    "",
                    f"Flow teacher's 4-step {student}: FID / the teacher's "
                    f"({FLOW_SOLVER} {FLOW_STEPS}) {interval(ratio)} over {len(ratio)} seed(s)",
                ]
                out[f"flow_fid_ratio_n{layers}"] = {
                    "mean": mean_spread(ratio)[0],
                    "std": mean_spread(ratio)[1],
                    "values": ratio,
                }
    if mse:
        lines += [
            "",
            "Held-out per-step MSE against the teacher's states (mean over seeds), sampled "
            "(the student's own inputs) / teacher-forced:",
            "",
            "| model | " + " | ".join(f"step {k + 1}" for k in range(4)) + " | seeds |",
            "|---|" + "---|" * 5,
        ]
        for group in sorted(mse, key=sort_key):
            sampled, forced = mse[group]["sampled"], mse[group]["teacher_forced"]
            if len(sampled) == 4:
                lines.append(
                    f"| {row_label(setting, groups[group][0], budget)} | "
                    + " | ".join(f"{a:.5f} / {t:.5f}" for a, t in zip(sampled, forced))
                    + f" | {mse[group]['seeds']} |"
                )
        out["step_mse"] = mse
    for variant, name in (("short", "history"), ("plain", "history_plain")):
        if paired and history_students(setting, rows, variant):
            history_lines, out[name] = history_table(
                setting, results, rows, budget, paired, variant
            )
            lines += history_lines
    return {"markdown": "\n".join(lines) + "\n", "json": out}


def save_figure(fig, path):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def samples_figure(runner, path, shown):
    """One row per (samples name, title): the first sample of each class, the same noise in each."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(shown), 1, figsize=(8, 1.1 * len(shown)))
    for ax, (name, title) in zip(axes, shown):
        with np.load(runner.path("samples", f"{name}.npz"), allow_pickle=False) as data:
            images, labels = data["arr_0"], data["arr_1"]
        # The first sample of each class: the same noise across models.
        picks = [int(np.flatnonzero(labels == label)[0]) for label in range(10)]
        ax.imshow(
            np.concatenate(
                [np.pad(images[i, :, :, 0], 1, constant_values=255) for i in picks], axis=1
            ),
            cmap="gray",
            vmin=0,
            vmax=255,
        )
        ax.set_title(title, fontsize=8, loc="left")
        ax.axis("off")
    save_figure(fig, path)


def val_mse_figure(setting, runner, path):
    """Held-out final-step MSE against the teacher's samples during distillation, N = 0 and ARD."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, colour, label in (
        ("k4_n0_state_s0", "b", "step distillation (N=0)"),
        (f"k4_n{setting.history_layers}_state_s0", "r", f"ARD (N={setting.history_layers})"),
    ):
        with open(runner.path("students", name, "metrics.jsonl")) as f:
            records = [r for r in map(json.loads, f) if "val_ar_final_mse" in r]
        steps = [r["step"] for r in records]
        ax.plot(
            steps,
            [r["val_ar_final_mse"] for r in records],
            f"{colour}-o",
            label=f"{label}, sampled (AR)",
        )
        ax.plot(
            steps,
            [r["val_tf_final_mse"] for r in records],
            f"{colour}--",
            label=f"{label}, teacher-forced",
        )
    ax.set_yscale("log")
    ax.set_xlabel("distillation step")
    ax.set_ylabel("final-step MSE vs teacher (held out)")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def gan_figure(setting, runner, path):
    """The GAN stage's logged figures over its steps, for both seed-0 GAN runs: lambda, the two
    gradient norms on the last head, mean D(real) and D(fake), and the range of the fakes."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    for layers, colour in ((0, "b"), (setting.history_layers, "r")):
        with open(runner.path("students", f"gan_k4_n{layers}_state_s0", "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        steps = [r["step"] for r in records]
        label = "step distillation" if layers == 0 else f"ARD (N={layers})"
        axes[0].plot(steps, [r["gan_weight"] for r in records], f"{colour}-", label=label)
        axes[1].plot(
            steps, [r["grad_reg"] for r in records], f"{colour}-", label=f"{label}: |grad L_reg|"
        )
        axes[1].plot(
            steps, [r["grad_gan"] for r in records], f"{colour}--", label=f"{label}: |grad L_GAN|"
        )
        axes[2].plot(steps, [r["d_real"] for r in records], f"{colour}-", label=f"{label}: D(real)")
        axes[2].plot(
            steps, [r["d_fake"] for r in records], f"{colour}--", label=f"{label}: D(fake)"
        )
        axes[3].plot(steps, [r["fake_min"] for r in records], f"{colour}-", label=f"{label}: min")
        axes[3].plot(steps, [r["fake_max"] for r in records], f"{colour}--", label=f"{label}: max")
    for ax, title in zip(
        axes,
        (
            "lambda",
            "gradient norms on the last head",
            "mean discriminator logits",
            "range of the fakes",
        ),
    ):
        ax.set(xlabel="GAN step", title=title)
        ax.legend(fontsize=6)
    axes[1].set_yscale("log")
    save_figure(fig, path)


def fid_steps_figure(setting, rows, results, path):
    """FID against sampling steps: the teacher's DDIM, the seed-0 state students N = 0 and ARD."""
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(5, 3.5))
    teacher = sorted(
        (row.steps, results[row.name]["fid"])
        for row in rows
        if row.is_teacher
        and row.teacher_objective == "ddpm"
        and row.sampler == "ddim"
        and row.seed == 0
    )
    ax.plot(*zip(*teacher), "k-o", label=f"teacher DDIM (CFG {setting.cfg})")
    for layers, style, label in (
        (0, "b-s", "step distillation (N=0)"),
        (setting.history_layers, "r-^", f"ARD (N={setting.history_layers})"),
    ):
        points = sorted(
            (row.steps, results[row.name]["fid"])
            for row in rows
            if not row.is_teacher
            and (row.teacher_objective, row.history_layers, row.target, row.variant, row.seed)
            == ("ddpm", layers, "state", "plain", 0)
            and not row.history_noise
        )
        ax.plot(*zip(*points), style, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([2, 3, 4, 5, 8, 16, 25])
    ax.set_xticklabels(["2", "3", "4", "5", "8", "16", "25"])
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(f"FID ({setting.data} features)")
    ax.legend(fontsize=8)
    save_figure(fig, path)
