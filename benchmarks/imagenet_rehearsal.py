"""A rehearsal of the ImageNet recipe on a CPU: the commands of docs/imagenet.md's recipe, read off
the page's text, run as they are written at the real shapes (DiT-XL/2 width, 256x256 images, the
SD-VAE's configuration), with only counts and paths changed, on inputs made here with random
weights; per stage its wall time, CPU time, peak memory and bytes written, and the full recipe's
disk and GPU-hours extrapolated from them.

    python -m benchmarks.imagenet_rehearsal --out /tmp/rehearsal             # 10 of the 28 blocks
    python -m benchmarks.imagenet_rehearsal --out /tmp/rehearsal --depth 1   # the first block only

Stages, each a subprocess with its log in OUT/logs/STAGE.log, run in OUT/work (so that
pretrained_models/ resolves there):
  inputs        an official-format DiT-XL/2 state dict with random weights, a random AutoencoderKL
                of sd-vae-ft-ema's configuration in a Hugging Face cache under OUT (the scripts run
                with HF_HUB_OFFLINE=1), an ImageFolder of 256x256 images, ADM's reference batch made
                from it (evaluator.make_reference), random Inception weights under their official
                name
  trajectories  train_teacher_traj.py        regression  train_ard.py
  gan           train_ard.py --gan           sample      sample_ddp.py
  evaluator     python -m evaluator, with --skip-weights-checksum (its weights are random)

Writes OUT/rehearsal.json and OUT/rehearsal.md. A stage that fails stops the rehearsal with its
exit status and the tail of its log. --depth D keeps the first D of DiT-XL/2's 28 blocks (10 by
default: at 20 the GAN stage ran out of 24 GB); each subprocess then starts through a
bootstrap that sets DiT-XL's depth to D, since the scripts read a bare state dict's config off its
depth and width, and --history-layers is cut to D where D < 6.
"""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time

from ard import cli
from ard.cli import UserError, positive_int

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE_PAGE = os.path.join("docs", "imagenet.md")
RECIPE_HEADING = "## The paper's recipe with an official DiT-XL/2 teacher"
FULL_DEPTH = 28
# On 2 AMD EPYC cores with 24 GB, batch 1: at 28 blocks the regression stage peaked at 20.5 GiB
# and the GAN stage, which also holds the frozen teacher, the heads and the discriminator's
# optimiser, reached 22.7 GiB before its first step; at 20 blocks the regression stage peaked at
# 15.1 GiB and the GAN stage was killed for memory in its first step (18.1 GB resident). 10 blocks
# ran every stage, the GAN stage peaking at 10.4 GiB (docs/imagenet.md has the figures).
DEFAULT_DEPTH = 10
HF_REPO = "stabilityai/sd-vae-ft-ema"  # what `--vae ema` names (ard.vae.SD_VAES)
# sd-vae-ft-ema's config.json, the values that shape the network
SD_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    act_fn="silu",
    norm_num_groups=32,
    sample_size=256,
    scaling_factor=0.18215,
)
IMAGE_SIZE = 256
CLASSES, IMAGES_PER_CLASS = 2, 4  # the ImageFolder; the reference batch holds all 8
# The full recipe's counts (docs/imagenet.md) and the H200 throughputs its cost table quotes from
# docs/performance.md: the extrapolation's inputs.
RECIPE_TRAJECTORIES = 1_200_000
RECIPE_SAMPLES = 50_000
H200 = dict(trajectories_per_s=22.3, training_trajectories_per_s=60.5, ms_per_image=3.7)
H200_SOURCE = "GPU throughput measured by benchmarks.gpu_check on an H200"


#################################################################################
#                          The commands of a page                               #
#################################################################################


def bash_commands(text):
    """The command lines (as word lists) of every bash block of a Markdown text: continued lines
    joined, comment lines and trailing comments dropped."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split(" #", 1)[0]) if not line.startswith("#") else []
            if words:
                found.append(words)
    return found


def recipe_commands(page=None):
    """The command lines of the first bash block under the recipe's heading."""
    text = open(page or os.path.join(ROOT, RECIPE_PAGE)).read()
    start = text.find(RECIPE_HEADING)
    if start < 0:
        raise UserError(f"{RECIPE_PAGE} has no section {RECIPE_HEADING!r}")
    blocks = re.findall(r"```bash\n.*?```", text[start:], re.S)
    if not blocks:
        raise UserError(f"{RECIPE_PAGE}'s section {RECIPE_HEADING!r} shows no bash block")
    return bash_commands(blocks[0])


def split_flags(words):
    """(positionals, [(flag, [values])]) of a command's arguments, in order; a flag takes the words
    up to the next flag, and --flag=value is one flag with one value."""
    positionals, flags = [], []
    for word in words:
        if word.startswith("--"):
            name, eq, value = word.partition("=")
            flags.append((name, [value] if eq else []))
        elif flags:
            flags[-1][1].append(word)
        else:
            positionals.append(word)
    return positionals, flags


def program(words):
    """(launcher, program, arguments) of a command line: 'torchrun' or 'python', and a script or
    'evaluator' (python -m evaluator)."""
    if words[0] == "torchrun":
        script = next((i for i, w in enumerate(words) if i and not w.startswith("--")), None)
        options = words[1:script]
        if script is None or len(options) != 1 or not options[0].startswith("--nproc_per_node="):
            raise UserError(f"the rehearsal knows no such torchrun launch: {shlex.join(words)}")
        return "torchrun", words[script], words[script + 1 :]
    if words[:2] == ["python", "-m"]:
        return "python", words[2], words[3:]
    if words[0] == "python":
        return "python", words[1], words[2:]
    raise UserError(f"the rehearsal knows no such command: {shlex.join(words)}")


#################################################################################
#                       What the rehearsal may change                           #
#################################################################################

STEPS, BATCH = 2, 1  # optimiser steps and global batch of both training stages
# Each stage: the page's command it rehearses (program, and whether --gan is given), the flags kept
# as written, the counts and intervals set to the rehearsal's ((kind, a function of the Plan)), the
# paths (mapped by kind, see map_path), and flags the page does not show that the rehearsal adds.
# A flag of the page's command that is none of these stops the rehearsal: it is classified here
# before it is rehearsed.
STAGES = [
    dict(
        name="trajectories",
        program=("train_teacher_traj.py", False),
        keep={"--ckpt", "--save-steps", "--dtype", "--precision"},
        counts={
            "--num-trajectories": ("count", lambda p: p.trajectories),
            "--batch-size": ("count", lambda p: p.trajectories),
        },
        paths={"--out": "data"},
        added={},
    ),
    dict(
        name="regression",
        program=("train_ard.py", False),
        keep={"--teacher-ckpt", "--history-layers", "--precision"},
        counts={
            "--global-batch-size": ("count", lambda p: BATCH),
            "--max-steps": ("count", lambda p: STEPS),
            # the grid of 40 samples it draws at the last step would be most of the stage's time
            "--sample-every": ("interval", lambda p: 0),
        },
        paths={"--traj": "data", "--run-dir": "data"},
        added={},
    ),
    dict(
        name="gan",
        program=("train_ard.py", True),
        keep={
            "--gan",
            "--teacher-ckpt",
            "--history-layers",
            "--gan-scale",
            "--gan-max-weight",
            "--disc-lr",
            "--image-size",
            "--precision",
        },
        counts={
            "--global-batch-size": ("count", lambda p: BATCH),
            "--max-steps": ("count", lambda p: STEPS),
            # the first step with lambda = 0 (the regression loss only), the last with the student's
            # adversarial loss: the recipe's 3,000 would leave the rehearsal inside its warm-up
            "--gan-warmup": ("count", lambda p: STEPS - 1),
        },
        paths={
            "--init-ckpt": "checkpoint",
            "--traj": "data",
            "--data": "data",
            "--run-dir": "data",
        },
        # the default interval, 5,000, falls due at the last step (see the regression stage)
        added={"--sample-every": ("interval", lambda p: 0)},
    ),
    dict(
        name="sample",
        program=("sample_ddp.py", False),
        keep=set(),
        counts={},
        paths={"--ckpt": "checkpoint", "--out": "data"},
        added={
            "--num-samples": ("count", lambda p: p.samples),
            "--per-proc-batch-size": ("count", lambda p: p.samples),
            "--chunk-size": ("count", lambda p: p.samples),
        },
    ),
    dict(
        name="evaluator",
        program=("evaluator", False),
        keep={"--inception-weights"},
        counts={},
        paths={},
        added={
            "--json": ("output", lambda p: "evaluator.json"),
            "--skip-weights-checksum": ("random weights", lambda p: None),
        },
    ),
]
# Commands of the recipe that no later stage reads, said in the output.
NOT_REHEARSED = {
    ("sample.py", False): "the teacher's own image grid (250 DDPM steps): no later stage reads it"
}
HISTORY_FLAG = "--history-layers"


class Plan:
    """The rehearsal's counts and folders."""

    def __init__(self, out, depth, trajectories, samples):
        self.out, self.depth = os.path.abspath(out), depth
        self.trajectories, self.samples = trajectories, samples
        self.work = os.path.join(self.out, "work")


def map_path(kind, value, plan):
    """A path of the page's command in the rehearsal: absolute paths (/data/...) move under OUT,
    relative ones resolve in OUT/work as they are; a checkpoint's step is the rehearsal's."""
    if kind == "checkpoint":
        value = re.sub(r"\d{7}\.pt$", f"{STEPS:07d}.pt", value)
    return os.path.join(plan.out, value.lstrip("/")) if os.path.isabs(value) else value


def rehearsed_command(stage, processes, positionals, flags, plan):
    """(argv after the program, changes) of one stage; `processes` is the page's torchrun process
    count (None for a plain python command)."""
    where = f"{RECIPE_PAGE}, the {stage['name']} command"
    argv, changes = list(positionals), []
    if processes is not None:
        changes.append(
            dict(
                kind="process count",
                flag="torchrun --nproc_per_node",
                recipe=processes,
                rehearsal=1,
            )
        )
    for flag, values in flags:
        shown = " ".join(values) or None
        if flag in stage["counts"]:
            kind, value = stage["counts"][flag]
            new = [str(value(plan))]
        elif flag in stage["paths"]:
            new, kind = [map_path(stage["paths"][flag], v, plan) for v in values], "path"
        elif flag == HISTORY_FLAG and values and int(values[0]) > plan.depth:
            new, kind = [str(plan.depth)], "depth"
        elif flag in stage["keep"]:
            new, kind = values, None
        else:
            raise UserError(
                f"{where} has the flag {flag}, which the rehearsal does not know: say in "
                f"benchmarks/imagenet_rehearsal.py whether it is a setting, a count or a path"
            )
        argv += [flag, *new]
        if new != values:
            changes.append(dict(kind=kind, flag=flag, recipe=shown, rehearsal=" ".join(new)))
    shown_flags = {flag for flag, _ in flags}
    for flag, (kind, value) in stage["added"].items():
        if flag in shown_flags:
            raise UserError(f"{where} now sets {flag}, which the rehearsal adds itself")
        new = value(plan)
        argv += [flag] if new is None else [flag, str(new)]
        changes.append(
            dict(kind=f"added: {kind}", flag=flag, recipe=None, rehearsal=new and str(new))
        )
    return argv, changes


def plan_stages(commands, plan):
    """[(stage, program, rehearsed argv, changes, the page's argv)] of the recipe's commands in the
    rehearsal's order, and the commands not rehearsed; any command or flag the rehearsal does not
    know is an error."""
    found, skipped = {}, []
    for words in commands:
        launcher, name, args = program(words)
        # program() has checked that a torchrun launch is `torchrun --nproc_per_node=N script`
        processes = words[1].partition("=")[2] if launcher == "torchrun" else None
        positionals, flags = split_flags(args)
        key = (name, any(flag == "--gan" for flag, _ in flags))
        if key in NOT_REHEARSED:
            skipped.append(dict(command=shlex.join(words), why=NOT_REHEARSED[key]))
            continue
        stage = next((s for s in STAGES if s["program"] == key), None)
        if stage is None:
            raise UserError(
                f"{RECIPE_PAGE}'s recipe runs {shlex.join(words)}, which the rehearsal does not "
                "know"
            )
        if stage["name"] in found:
            raise UserError(f"{RECIPE_PAGE}'s recipe shows two {stage['name']} commands")
        found[stage["name"]] = (
            stage,
            name,
            *rehearsed_command(stage, processes, positionals, flags, plan),
            args,
        )
    missing = [s["name"] for s in STAGES if s["name"] not in found]
    if missing:
        raise UserError(f"{RECIPE_PAGE}'s recipe has no {', '.join(missing)} command")
    return [found[s["name"]] for s in STAGES], skipped


def flag_value(argv, flag):
    return argv[argv.index(flag) + 1]


#################################################################################
#                                 The inputs                                    #
#################################################################################


def hf_snapshot(hf_home):
    """The folder of HF_REPO's snapshot in a Hugging Face cache under hf_home, as the hub client
    lays it out (refs/main names the snapshot), so that `--vae ema` loads it offline."""
    repo = os.path.join(hf_home, "hub", "models--" + HF_REPO.replace("/", "--"))
    revision = "0" * 40  # no real commit: the cache only needs refs/main to name the folder
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(revision)
    return os.path.join(repo, "snapshots", revision)


def make_inputs(hf_home, depth, teacher, images, reference, inception):
    """The recipe's inputs with random weights (run in OUT/work, as a subprocess of the rehearsal):
    `teacher` an official-format bare DiT-XL/2 state dict of `depth` blocks, the SD-VAE in the
    Hugging Face cache, an ImageFolder, ADM's reference batch of its images, Inception weights."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    from ard.checkpoints import save_checkpoint
    from benchmarks.gpu_check import random_inception_weights
    from evaluator import make_reference
    from models import DiT, model_config, randomise_weights

    config = dict(model_config("DiT-XL/2"), depth=depth)
    dit = randomise_weights(DiT(input_size=IMAGE_SIZE // 8, num_classes=1000, **config))
    os.makedirs(os.path.dirname(teacher), exist_ok=True)
    save_checkpoint(teacher, dit.state_dict())  # bare, official names: as DiT's download
    del dit
    torch.manual_seed(0)
    AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(hf_snapshot(hf_home))
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        folder = os.path.join(images, f"n{c:08d}")
        os.makedirs(folder)
        for i in range(IMAGES_PER_CLASS):
            pixels = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{i}.{('png', 'jpg')[i % 2]}"))
    make_reference.main(
        make_reference.parse_args(
            ["--data", images, "--image-size", str(IMAGE_SIZE), "--out", reference]
            + ["--num", str(CLASSES * IMAGES_PER_CLASS)]
        )
    )
    os.makedirs(os.path.dirname(inception), exist_ok=True)
    os.replace(random_inception_weights(os.path.dirname(inception)), inception)


#################################################################################
#                              Running and measuring                            #
#################################################################################


def bootstrap(depth):
    """`python -c` code that runs the script in argv[1] with DiT-XL cut to `depth` blocks: the
    scripts read a bare state dict's config off its depth and width (ard.checkpoints.
    infer_dit_config), and build models from the registries, which hold each config's depth."""
    return (
        "import runpy, sys; import ard_models, models; "
        f"models.MODEL_CONFIGS['XL']['depth'] = {depth}; "
        "models.DiT_models.update(models.registry(models.DiT)); "
        "ard_models.ARD_models.update(models.registry(ard_models.ARD)); "
        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )


def files(folder, skip):
    out = {}
    for root, _, names in os.walk(folder):
        if skip and root.startswith(skip):
            continue
        for name in names:
            path = os.path.join(root, name)
            if os.path.isfile(path):
                st = os.stat(path)
                out[path] = (st.st_size, st.st_mtime_ns)
    return out


def folder_bytes(folder):
    return sum(size for size, _ in files(folder, None).values())


def run_stage(name, cmd, plan, env, number, total):
    """Runs one stage to its end; its wall and CPU seconds, its peak RSS (the largest of the
    process and the descendants it waited for) and the bytes of the files it created or changed
    under OUT. A failing stage ends the rehearsal."""
    logs = os.path.join(plan.out, "logs")
    log = os.path.join(logs, f"{name}.log")
    print(f"[{number}/{total}] {name}: {shlex.join(cmd)}  (log: {log})", flush=True)
    before = files(plan.out, logs)
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=plan.work, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    after = files(plan.out, logs)
    written = sum(size for path, (size, t) in after.items() if before.get(path) != (size, t))
    figures = dict(
        stage=name,
        command=shlex.join(cmd),
        exit_code=code,
        wall_s=round(wall, 1),
        cpu_s=round(usage.ru_utime + usage.ru_stime, 1),
        peak_rss_bytes=usage.ru_maxrss * 1024,  # Linux reports KiB
        bytes_written=written,
        log=log,
    )
    print(
        f"    {name}: exit {code}, {wall:.1f} s wall, {figures['cpu_s']} s CPU, peak RSS "
        f"{gib(figures['peak_rss_bytes'])}, {written:,} bytes written",
        flush=True,
    )
    return figures


def tail(path, lines=30):
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def gib(n):
    return f"{n / 2**30:.2f} GiB"


#################################################################################
#                     The full recipe, extrapolated                             #
#################################################################################


def recipe_settings(stages):
    """The page's commands as their scripts resolve them (defaults included): the counts the
    extrapolation scales to."""
    import sample_ddp
    import train_ard
    import train_teacher_traj

    parsers = dict(
        trajectories=train_teacher_traj.parse_args,
        regression=train_ard.parse_args,
        gan=train_ard.parse_args,
        sample=sample_ddp.parse_args,
    )
    return {
        stage["name"]: parsers[stage["name"]](shown)
        for stage, *_, shown in stages
        if stage["name"] in parsers
    }


def checkpoints_written(args):
    """How many checkpoints a training command writes (every --ckpt-every steps and at the last)
    and how many it keeps."""
    written = -(-args.max_steps // args.ckpt_every) if args.ckpt_every else 1
    return written, min(written, args.keep_last) if args.keep_last else written


def block_bytes(path):
    """The bytes a training checkpoint holds per DiT block: block 0's weights and EMA, its two
    AdamW moments (fp32, as the weights), and a GAN checkpoint's discriminator head on it with its
    two moments."""
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)

    def part(state, prefix):
        return sum(v.nbytes for k, v in (state or {}).items() if k.startswith(prefix))

    block = part(ckpt["model"], "blocks.0.")
    return (
        block + part(ckpt["ema"], "blocks.0.") + 2 * block + 3 * part(ckpt.get("disc"), "heads.0.")
    )


def extrapolate(recipe, products, plan):
    """The full recipe's disk (measured bytes per trajectory, checkpoint and sample, times the
    recipe's counts; a cut DiT's checkpoints with the missing blocks' bytes added) and GPU-hours
    (the H200 throughputs of docs/imagenet.md)."""
    missing = FULL_DEPTH - plan.depth
    per_trajectory = products["store_bytes"] / plan.trajectories
    per_image = products["samples_bytes"] / plan.samples
    out = dict(
        trajectories=dict(
            count=recipe["trajectories"].num_trajectories,
            bytes_each=per_trajectory,
            disk_bytes=per_trajectory * recipe["trajectories"].num_trajectories,
            gpu_hours=recipe["trajectories"].num_trajectories / H200["trajectories_per_s"] / 3600,
        ),
        sample=dict(
            count=recipe["sample"].num_samples,
            bytes_each=per_image,
            disk_bytes=per_image * recipe["sample"].num_samples,
            gpu_hours=recipe["sample"].num_samples * H200["ms_per_image"] / 1000 / 3600,
        ),
    )
    for name in ("regression", "gan"):
        args = recipe[name]
        written, kept = checkpoints_written(args)
        each = products[f"{name}_checkpoint_bytes"]
        if missing:
            each += missing * block_bytes(products[f"{name}_checkpoint"])
        out[name] = dict(
            steps=args.max_steps,
            checkpoints_written=written,
            checkpoints_kept=kept,
            bytes_each=each,
            disk_bytes=each * kept,
            gpu_hours=(
                args.max_steps * args.global_batch_size / H200["training_trajectories_per_s"] / 3600
                if name == "regression"
                else None
            ),
        )
    return out


def extrapolation_lines(extrapolation, depth):
    e = extrapolation
    lines = [
        "The full recipe, extrapolated (disk: measured bytes times the recipe's counts; "
        f"GPU-hours: {H200_SOURCE}, as quoted in docs/imagenet.md and docs/performance.md):",
        f"  trajectories  {e['trajectories']['count']:,} x {e['trajectories']['bytes_each']:,.0f} "
        f"bytes = {e['trajectories']['disk_bytes'] / 1e9:,.1f} GB; "
        f"{e['trajectories']['gpu_hours']:.1f} H200-hours at {H200['trajectories_per_s']} "
        "trajectories/s (DDIM 25, bf16, batch 256)",
    ]
    for name in ("regression", "gan"):
        r = e[name]
        hours = (
            f"{r['gpu_hours']:.1f} H200-hours at {H200['training_trajectories_per_s']} "
            "trajectories/s (8 per GPU, eager)"
            if r["gpu_hours"] is not None
            else "GPU time not measured (no GAN stage throughput was measured on a GPU)"
        )
        lines.append(
            f"  {name:<12}  {r['steps']:,} steps, checkpoints of {r['bytes_each'] / 1e9:.2f} GB: "
            f"{r['checkpoints_written']} written, {r['checkpoints_kept']} kept = "
            f"{r['disk_bytes'] / 1e9:,.1f} GB; {hours}"
        )
    s = e["sample"]
    lines.append(
        f"  sample        {s['count']:,} x {s['bytes_each']:,.0f} bytes = "
        f"{s['disk_bytes'] / 1e9:.1f} GB (as much again for the chunks); "
        f"{s['gpu_hours'] * 60:.1f} H200-minutes at {H200['ms_per_image']} ms per image (4 steps)"
    )
    if depth < FULL_DEPTH:
        lines.append(
            f"  (checkpoints: the measured {depth}-block one plus {FULL_DEPTH - depth} times its "
            "bytes per block: weights, EMA, 2 AdamW moments, a GAN head and its moments)"
        )
    return lines


#################################################################################
#                                  Report                                       #
#################################################################################


def change_line(change):
    recipe = change["recipe"] if change["recipe"] is not None else "(not shown)"
    new = change["rehearsal"] if change["rehearsal"] is not None else "(set)"
    return f"{change['stage']}: {change['flag']} {recipe} -> {new} [{change['kind']}]"


def markdown(report):
    lines = [
        f"# ImageNet recipe rehearsal ({report['machine']})",
        "",
        *[f"- {note}" for note in report["notes"]],
        "",
        "| stage | wall s | CPU s | peak RSS GiB | bytes written |",
        "|---|---|---|---|---|",
        *[
            f"| {s['stage']} | {s['wall_s']} | {s['cpu_s']} | {s['peak_rss_bytes'] / 2**30:.2f} "
            f"| {s['bytes_written']:,} |"
            for s in report["stages"]
        ],
        "",
        "Flags changed from the page's commands:",
        "",
        *[f"- {change_line(c)}" for c in report["changes"]],
    ]
    if "extrapolation_lines" in report:
        lines += ["", *report["extrapolation_lines"]]
    return "\n".join(lines) + "\n"


def write_report(plan, report):
    from ard.fileio import write_json

    write_json(os.path.join(plan.out, "rehearsal.json"), report)
    with open(os.path.join(plan.out, "rehearsal.md"), "w") as f:
        f.write(markdown(report))


#################################################################################
#                                   Main                                        #
#################################################################################


def notes(plan, recipe, skipped):
    out = [
        f"DiT-XL/2 width (hidden 1152, 16 heads, patch 2, 256 tokens a step), {plan.depth} of "
        f"{FULL_DEPTH} blocks; the SD-VAE's configuration; random weights",
        "the evaluator's Inception weights are random: it runs with --skip-weights-checksum and "
        "its figures mean nothing",
    ]
    if plan.depth == DEFAULT_DEPTH:
        out.append(
            f"{DEFAULT_DEPTH} blocks, the default: on a 24 GB machine the GAN stage, which also "
            "holds the frozen teacher, the discriminator heads and their optimiser, ran out of "
            "memory in its first step at 20 blocks (--depth 28 runs all of them)"
        )
    if plan.depth < FULL_DEPTH:
        out.append(
            f"the DiT is cut to its first {plan.depth} blocks (blocks.0..{plan.depth - 1}, "
            "official names): the scripts read a bare checkpoint's config off its depth, so each "
            f"runs through a bootstrap that sets DiT-XL's depth to {plan.depth}"
        )
    out.append(
        f"the GAN stage's warm-up is cut to {STEPS - 1} of its {STEPS} steps (the recipe's "
        f"{recipe['gan'].gan_warmup:,}): the student's first step has the regression loss only "
        "(lambda = 0), the second the adversarial loss too, so the stage's peak memory is that of "
        "a full step"
    )
    out += [f"not rehearsed: {s['command']} ({s['why']})" for s in skipped]
    return out


def environment(plan):
    hf_home = os.path.join(plan.out, "hf")
    return dict(
        os.environ,
        HF_HOME=hf_home,
        HF_HUB_CACHE=os.path.join(hf_home, "hub"),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=ROOT,
        PYTHONUNBUFFERED="1",
    )


def stage_command(name, argv, plan):
    if name == "evaluator":
        return [sys.executable, "-m", "evaluator", *argv]
    script = os.path.join(ROOT, name)
    if plan.depth == FULL_DEPTH:
        return [sys.executable, script, *argv]
    return [sys.executable, "-c", bootstrap(plan.depth), script, *argv]


def main(args):
    import platform

    import torch

    from ard.checkpoints import PRETRAINED, PRETRAINED_DIR
    from evaluator.inception import WEIGHTS_NAME

    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise UserError(f"--out {args.out} is not an empty folder: give a new folder")
    plan = Plan(args.out, args.depth, args.trajectories, args.samples)
    stages, skipped = plan_stages(recipe_commands(), plan)
    recipe = recipe_settings(stages)
    by_name = {stage["name"]: (argv, changes) for stage, _, argv, changes, _ in stages}
    teacher = flag_value(by_name["trajectories"][0], "--ckpt")
    if (
        PRETRAINED.get(teacher, {}).get("family") != "dit"
        or PRETRAINED[teacher]["image_size"] != 256
    ):
        raise UserError(f"the recipe's teacher {teacher} is not the official DiT-XL/2 at 256")
    evaluator_argv = by_name["evaluator"][0]
    inception = flag_value(evaluator_argv, "--inception-weights")
    if os.path.basename(inception) != WEIGHTS_NAME:
        raise UserError(f"the recipe's Inception weights {inception} are not {WEIGHTS_NAME}")

    changes = [dict(c, stage=name) for name, (_, cs) in by_name.items() for c in cs]
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"PyTorch {torch.__version__}"
    )
    report = dict(
        machine=machine,
        depth=plan.depth,
        trajectories=plan.trajectories,
        samples=plan.samples,
        notes=notes(plan, recipe, skipped),
        changes=changes,
        stages=[],
    )
    print(f"Rehearsing {RECIPE_PAGE}'s recipe in {plan.out} ({machine})")
    for note in report["notes"]:
        print(f"  {note}")
    print("Flags changed from the page's commands:")
    for change in changes:
        print(f"  {change_line(change)}")

    os.makedirs(plan.work, exist_ok=True)
    os.makedirs(os.path.join(plan.out, "logs"))
    env = environment(plan)
    inputs = dict(
        hf_home=env["HF_HOME"],
        depth=plan.depth,
        teacher=os.path.join(plan.work, PRETRAINED_DIR, teacher),
        images=os.path.join(plan.work, flag_value(by_name["gan"][0], "--data")),
        reference=os.path.join(plan.work, evaluator_argv[0]),
        inception=os.path.join(plan.work, inception),
    )
    code = (
        "import json, sys; from benchmarks.imagenet_rehearsal import make_inputs; "
        "make_inputs(**json.loads(sys.argv[1]))"
    )
    commands = [("inputs", [sys.executable, "-c", code, json.dumps(inputs)])]
    commands += [(s["name"], stage_command(name, argv, plan)) for s, name, argv, _, _ in stages]
    for number, (name, cmd) in enumerate(commands, start=1):
        figures = run_stage(name, cmd, plan, env, number, len(commands))
        report["stages"].append(figures)
        write_report(plan, report)
        if figures["exit_code"] != 0:
            print(
                f"stage {name} failed with exit code {figures['exit_code']}; the end of "
                f"{figures['log']}:\n{tail(figures['log'])}",
                file=sys.stderr,
            )
            sys.exit(1)

    def work(path):
        return os.path.join(plan.work, path)

    checkpoint = f"{STEPS:07d}.pt"
    products = dict(
        store=work(flag_value(by_name["trajectories"][0], "--out")),
        regression_checkpoint=work(
            os.path.join(
                flag_value(by_name["regression"][0], "--run-dir"), "checkpoints", checkpoint
            )
        ),
        gan_checkpoint=work(
            os.path.join(flag_value(by_name["gan"][0], "--run-dir"), "checkpoints", checkpoint)
        ),
        samples=work(flag_value(by_name["sample"][0], "--out")),
        evaluator_json=work(flag_value(evaluator_argv, "--json")),
    )
    products.update(
        store_bytes=folder_bytes(products["store"]),
        regression_checkpoint_bytes=os.path.getsize(products["regression_checkpoint"]),
        gan_checkpoint_bytes=os.path.getsize(products["gan_checkpoint"]),
        samples_bytes=os.path.getsize(products["samples"]),
    )
    extrapolation = extrapolate(recipe, products, plan)
    report.update(
        products=products,
        extrapolation=extrapolation,
        extrapolation_lines=extrapolation_lines(extrapolation, plan.depth),
    )
    write_report(plan, report)
    print("\n".join(report["extrapolation_lines"]))
    print(f"Wrote {os.path.join(plan.out, 'rehearsal.json')} and rehearsal.md")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="a new folder for everything it writes")
    parser.add_argument(
        "--depth",
        type=positive_int,
        default=DEFAULT_DEPTH,
        help=f"keep the first D of DiT-XL/2's {FULL_DEPTH} blocks (default {DEFAULT_DEPTH}: at 20 "
        "the GAN stage was killed for memory on a 24 GB machine, 18.1 GB resident)",
    )
    parser.add_argument(
        "--trajectories", type=positive_int, default=2, help="trajectories to write"
    )
    parser.add_argument(
        "--samples",
        type=positive_int,
        default=4,
        help="images to sample and evaluate (at least 4: precision and recall use 3 neighbours)",
    )
    args = parser.parse_args(argv)
    if args.depth > FULL_DEPTH:
        parser.error(f"--depth must be at most {FULL_DEPTH}")
    if args.samples < 4:
        parser.error("--samples must be at least 4: precision and recall use 3 neighbours")
    return args


if __name__ == "__main__":
    cli.run(main, parse_args)
