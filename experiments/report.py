"""The tables and figures of an embedded experiment: every model against the real test images and against its
teacher's own samples, with intervals (over samples for one seed, over seeds for several), the degradation ratios
of the paper's form, the held-out per-step MSE, and the figures the docs show."""

import json
import os
import statistics

import numpy as np

# The flow-matching teacher (train.py --objective flow) writes its trajectories with Heun over FLOW_STEPS uniform steps
# in t: 2 * FLOW_STEPS - 1 model evaluations, about the 25 of the DDIM teacher; its students are judged against its
# samples of that sampler, FLOW_TEACHER.
FLOW_SOLVER, FLOW_STEPS = "heun", 13
FLOW_TEACHER = f"flow_teacher_{FLOW_SOLVER}{FLOW_STEPS}"


def teacher_sampler(name):
    """The sampler a teacher row's name says: 'teacher_ddim25', 'flow_teacher_heun13', 'flow_teacher_euler25_s1'."""
    return next(s for s in ("heun", "euler", "ddim") if f"_{s}" in name)


def mean_spread(values):
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def cell(results, names, key, digits):
    """One figure of a table: over several seeds their mean ± standard deviation; for one, the value and its 95%
    bootstrap interval over samples."""
    values = [results[n][key] for n in names if key in results[n]]
    if not values:
        return "-"
    if len(values) > 1:
        m, s = mean_spread(values)
        return f"{m:.{digits}f} ± {s:.{digits}f}"
    ci = results[names[0]].get(f"{key}_ci")
    return f"{values[0]:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def row_label(s, group, b):
    """'teacher_ddim25' -> 'Teacher DDIM, CFG 1.5'; 'k4_n3_x0' -> 'ARD (N=3), x0 target'; 'flow_teacher_heun13' ->
    'Flow teacher Heun, CFG 1.5'; 'flow_k4_n0_state' -> 'Flow teacher's step distillation (N=0)'; ..."""
    if group.startswith("flow_"):
        label = row_label(s, group[len("flow_") :], b)
        if label.startswith("Teacher"):
            return "Flow t" + label[1:]
        return "Flow teacher's " + (
            label if label.startswith("ARD") else label[0].lower() + label[1:]
        )
    if group.startswith("teacher"):
        sampler = {"ddim": "DDIM", "heun": "Heun", "euler": "Euler"}[teacher_sampler(group)]
        return f"Teacher {sampler}, CFG {s.cfg}" + (
            ", other noises (the floor)" if group.endswith("_s1") else ""
        )
    parts = group.split("_")
    n, target = int(parts[1][1:]), parts[2]
    label = "Step distillation (N=0)" if n == 0 else f"ARD (N={n})"
    if target == "x0":
        label += ", x0 target"
    if target == "short":
        label += f", after {b['headroom_steps']} steps (headroom)"
    if group.endswith("_gan"):
        label += " + GAN fine-tuning"
    return label


def degradation(s, results, groups, teacher, key, setting, prefix=""):
    """(FID_N=0 - FID_teacher) / (FID_ARD - FID_teacher) per seed, the teacher's figure being `teacher`; and whether
    some student is not clearly worse than the teacher: its figure, or the lower end of its interval, at or below the
    teacher's (then there is no degradation to compare, and the ratio means nothing). prefix 'flow_': the flow
    teacher's students."""
    names = {n: groups.get(f"{prefix}k4_n{n}_{setting}", []) for n in (0, s.history_layers)}
    sd, ard = ([results[name][key] for name in names[n]] for n in (0, s.history_layers))
    lows = [
        results[name].get(f"{key}_ci", [results[name][key]])[0] for n in names for name in names[n]
    ]
    return [(s - teacher) / (a - teacher) for s, a in zip(sd, ard)], min(
        sd + ard + lows, default=float("inf")
    ) <= teacher


def interval(values):
    """'mean ± std, 95% t-interval [lo, hi]' over seeds (the interval with 2 or more values)."""
    from scipy.stats import t

    m, s = mean_spread(values)
    text = f"{m:.2f} ± {s:.2f}"
    if len(values) > 1:
        half = t.ppf(0.975, len(values) - 1) * s / len(values) ** 0.5
        text += f", 95% t-interval [{m - half:.2f}, {m + half:.2f}]"
    return text


def step_mse(rows):
    """Each student group's held-out per-step MSE against the teacher's states, sampled (AR) and teacher-forced (TF),
    at the step of its checkpoint, from its run's metrics: {group: (AR per step, TF per step, seeds)}."""
    out = {}
    for name, steps, kind, source, group in rows:
        if kind != "student":
            continue
        run = os.path.dirname(os.path.dirname(source))
        at = int(os.path.basename(source).split(".")[0])
        path = os.path.join(run, "metrics.jsonl")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            record = next(
                (r for r in map(json.loads, f) if r.get("step") == at and "val_ar_step_mse" in r),
                None,
            )
        if record is not None:
            out.setdefault(group, []).append((record["val_ar_step_mse"], record["val_tf_step_mse"]))
    return {
        group: (
            [statistics.mean(v) for v in zip(*[r[0] for r in recs])],
            [statistics.mean(v) for v in zip(*[r[1] for r in recs])],
            len(recs),
        )
        for group, recs in out.items()
    }


def summarise(s, results, costs, real, rows, b, mse, mode, quick):
    """The tables of a run (markdown, and everything in them as JSON): every row against the real test images and
    against the teacher's own samples, the degradation ratios, the held-out per-step MSE."""
    groups = {}
    for name, steps, kind, source, group in rows:
        groups.setdefault(group, []).append(name)

    def sort_key(
        group,
    ):  # the teacher by steps, then the 4-step students, then the other step counts; the flow teacher's last
        steps = results[groups[group][0]]["steps"]
        plain = group[len("flow_") :] if group.startswith("flow_") else group
        return (
            group.startswith("flow_"),
            not plain.startswith("teacher"),
            plain.startswith("k") and steps != 4,
            steps,
            group,
        )

    lines = [
        f"Against {s.real} ({s.data} features; one seed: 95% bootstrap interval over samples; "
        "several: mean ± std over seeds):",
        "",
        "| model | steps | MFLOPs / image | CPU ms / image | FID | precision | recall | class accuracy | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fidelity = [
        "",
        "Against the 25-step teacher's own samples of the same noises and labels (teacher fidelity):",
        "",
        "| model | steps | FID vs teacher | precision vs teacher | recall vs teacher | seeds |",
        "|---|---|---|---|---|---|",
    ]
    out = {"rows": [], "budgets": b, "quick": quick, "mode": mode}
    for group in sorted(groups, key=sort_key):
        names, label = groups[group], row_label(s, group, b)
        steps = results[names[0]]["steps"]
        flops, seconds = costs[group]
        lines.append(
            f"| {label} | {steps} | {flops / 1e6:.1f} | {1000 * seconds:.2f} | {cell(results, names, 'fid', 2)} | "
            f"{cell(results, names, 'precision', 3)} | {cell(results, names, 'recall', 3)} | "
            f"{cell(results, names, 'class_accuracy', 3)} | {len(names)} |"
        )
        if "teacher_fid" in results[names[0]]:
            fidelity.append(
                f"| {label} | {steps} | {cell(results, names, 'teacher_fid', 2)} | {cell(results, names, 'teacher_precision', 3)} | "
                f"{cell(results, names, 'teacher_recall', 3)} | {len(names)} |"
            )
        keys = [
            k
            for k, v in results[names[0]].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "steps"
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
                    k: {
                        "mean": mean_spread([results[n][k] for n in names])[0],
                        "std": mean_spread([results[n][k] for n in names])[1],
                        "values": [results[n][k] for n in names],
                        "ci": [results[n].get(f"{k}_ci") for n in names],
                    }
                    for k in keys
                },
            )
        )
    lines.append(
        f"| {s.real_train} | - | - | - | {real['fid']:.2f} | {real['precision']:.3f} | "
        f"{real['recall']:.3f} | {real.get('class_accuracy', float('nan')):.3f} | - |"
    )
    lines += fidelity
    out["real_train"] = real
    out["teacher_fid"] = results["teacher_ddim25"]["fid"]
    settings = [
        ("", "teacher_ddim25", "state", "state target"),
        ("", "teacher_ddim25", "x0", "x0 target"),
        ("", "teacher_ddim25", "short", f"after {b.get('headroom_steps')} steps (headroom)"),
        (
            "flow_",
            FLOW_TEACHER,
            "state",
            f"flow teacher ({FLOW_SOLVER} {FLOW_STEPS}), state target",
        ),
    ]
    for prefix, own, setting, text in settings:
        if own not in results:
            continue
        floor = results.get(f"{own}_s1", {}).get("teacher_fid")
        for key, teacher, what in (
            ("fid", results[own]["fid"], "FID against the real test images"),
            ("teacher_fid", floor, "FID against the teacher (its floor as the teacher's figure)"),
        ):
            if teacher is None:
                continue
            ratios, no_gap = degradation(s, results, groups, teacher, key, setting, prefix)
            if not ratios:
                continue
            m, sd = mean_spread(ratios)
            lines += [
                "",
                f"Degradation ratio (N=0 - teacher) / (ARD - teacher), {what}, {text}: {interval(ratios)} over "
                f"{len(ratios)} seed(s), values {[round(r, 2) for r in ratios]} (the paper: 5.1)",
            ]
            if no_gap:
                lines.append(
                    f"(some students reach the teacher's {teacher:.2f}, or their interval does: there is no clear "
                    f"degradation to compare, and the ratio says nothing)"
                )
            out[f"degradation_{key}_{prefix}{setting}"] = {"mean": m, "std": sd, "values": ratios}
    if FLOW_TEACHER in results:
        teacher_fid = results[FLOW_TEACHER]["fid"]
        for n in (0, s.history_layers):
            fids = [results[name]["fid"] for name in groups.get(f"flow_k4_n{n}_state", [])]
            if fids:
                ratio = [f / teacher_fid for f in fids]
                lines += [
                    "",
                    f"Flow teacher's 4-step {'step distillation' if n == 0 else f'ARD (N={n})'}: FID / the teacher's "
                    f"({FLOW_SOLVER} {FLOW_STEPS}) {interval(ratio)} over {len(ratio)} seed(s)",
                ]
                out[f"flow_fid_ratio_n{n}"] = {
                    "mean": mean_spread(ratio)[0],
                    "std": mean_spread(ratio)[1],
                    "values": ratio,
                }
    if mse:
        lines += [
            "",
            "Held-out per-step MSE against the teacher's states (mean over seeds), sampled (the student's own inputs) "
            "/ teacher-forced:",
            "",
            "| model | " + " | ".join(f"step {k + 1}" for k in range(4)) + " | seeds |",
            "|---|" + "---|" * 5,
        ]
        for group in sorted(mse, key=sort_key):
            ar, tf, seeds = mse[group]
            if len(ar) == 4:
                lines.append(
                    f"| {row_label(s, group, b)} | "
                    + " | ".join(f"{a:.5f} / {t:.5f}" for a, t in zip(ar, tf))
                    + f" | {seeds} |"
                )
        out["step_mse"] = {
            group: {"sampled": ar, "teacher_forced": tf, "seeds": seeds}
            for group, (ar, tf, seeds) in mse.items()
        }
    return {"markdown": "\n".join(lines) + "\n", "json": out}


def save_figure(fig, path):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def samples_figure(p, path, shown):
    """One row per (samples name, title): the first sample of each class, the same noise in every row."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(shown), 1, figsize=(8, 1.1 * len(shown)))
    for ax, (name, title) in zip(axes, shown):
        with np.load(p.path("samples", f"{name}.npz"), allow_pickle=False) as data:
            images, labels = data["arr_0"], data["arr_1"]
        picks = [
            int(np.flatnonzero(labels == c)[0]) for c in range(10)
        ]  # the first sample of each class: same noise across models
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


def val_mse_figure(s, p, path):
    """Held-out final-step MSE against the teacher's samples during distillation, N = 0 against ARD."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, colour, label in (
        ("k4_n0_state_s0", "b", "step distillation (N=0)"),
        (f"k4_n{s.history_layers}_state_s0", "r", f"ARD (N={s.history_layers})"),
    ):
        with open(p.path("students", name, "metrics.jsonl")) as f:
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


def gan_figure(s, p, path):
    """The GAN stage's logged figures over its steps, for both seed-0 GAN runs: lambda, the two gradient norms on the
    last head, mean D(real) and D(fake), and the range of the fakes."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    for n, colour in ((0, "b"), (s.history_layers, "r")):
        with open(p.path("students", f"gan_k4_n{n}_state_s0", "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        steps, label = (
            [r["step"] for r in records],
            "step distillation" if n == 0 else f"ARD (N={n})",
        )
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


def fid_steps_figure(s, rows, results, path):
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(5, 3.5))
    teacher = sorted(
        (r[1], results[r[0]]["fid"])
        for r in rows
        if r[2] == "teacher" and r[4].startswith("teacher_ddim") and not r[4].endswith("_s1")
    )
    ax.plot(*zip(*teacher), "k-o", label=f"teacher DDIM (CFG {s.cfg})")
    for n, style, label in (
        (0, "b-s", "step distillation (N=0)"),
        (s.history_layers, "r-^", f"ARD (N={s.history_layers})"),
    ):
        points = sorted(
            (r[1], results[r[0]]["fid"])
            for r in rows
            if r[4] == f"k{r[1]}_n{n}_state" and r[0].endswith("_s0")
        )
        ax.plot(*zip(*points), style, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([2, 3, 4, 5, 8, 16, 25])
    ax.set_xticklabels(["2", "3", "4", "5", "8", "16", "25"])
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(f"FID ({s.data} features)")
    ax.legend(fontsize=8)
    save_figure(fig, path)
