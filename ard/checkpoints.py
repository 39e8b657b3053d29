"""Checkpoints and the models they hold: I/O, the config schema, and building a model from a config.

Our checkpoints hold plain types only (state dicts, numbers, strings, lists and dicts), are written
atomically and load with torch.load(weights_only=True), so a checkpoint from the internet cannot run
code. Each holds a `config` that says what model it is (teacher_config / student_config below), so
every script rebuilds the model from the file alone. Official DiT checkpoints (bare state dicts)
load too; their config is read off the weights.
"""

import os

import torch

from ard.cli import MissingFileError, UserError
from ard.fileio import atomic_write
from models import MODEL_CONFIGS, DiT_models

# Official checkpoints, bare state dicts in DiT's module names, looked up under
# pretrained_models/ first, then downloaded. SiT and REPA train SiT-XL/2, which is DiT-XL/2's
# architecture, as flow-matching models.
PRETRAINED = {
    "DiT-XL-2-256x256.pt": dict(
        family="dit",
        image_size=256,
        url="https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt",
    ),
    "DiT-XL-2-512x512.pt": dict(
        family="dit",
        image_size=512,
        url="https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt",
    ),
    # SiT's download.py
    "SiT-XL-2-256x256.pt": dict(
        family="sit",
        image_size=256,
        url="https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/"
        "SiT-XL-2-256.pt?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=0",
    ),
    # REPA's 'last.pt', 4M iterations
    "REPA-SiT-XL-2-256x256.pt": dict(
        family="repa",
        image_size=256,
        url="https://www.dl.dropboxusercontent.com/scl/fi/cxedbs4da5ugjq5wg3zrg/"
        "last.pt?rlkey=8otgrdkno0nd89po3dpwngwcc&st=apcc645o&dl=0",
    ),
}
PRETRAINED_DIR = "pretrained_models"
# What each family's network predicts and how its time input reads (diffusion/flow.py): DiT
# predicts noise (and a variance) at integer timesteps 0..999; SiT (ICPlan) a velocity with
# t = 0 the noise; REPA a velocity with t = 1 the noise. SiT and REPA feed t in [0, 1] to the
# timestep embedder as it is.
FAMILIES = {
    "dit": dict(prediction="eps", noise_at=None, time_scale=None),
    "sit": dict(prediction="velocity", noise_at=0.0, time_scale=1.0),
    "repa": dict(prediction="velocity", noise_at=1.0, time_scale=1.0),
}
# REPA's alignment MLPs on an intermediate block: training only, not part of the sampler
REPA_PROJECTORS = "projectors."
KINDS = {"dit": "a DiT teacher", "ard": "an ARD student"}


#################################################################################
#                                  File I/O                                     #
#################################################################################


def non_finite_tensors(state):
    """The names of the floating-point tensors holding a NaN or an infinity,
    anywhere in a nested state."""
    if isinstance(state, torch.Tensor):
        return [""] if state.is_floating_point() and not torch.isfinite(state).all() else []
    items = (
        state.items()
        if isinstance(state, dict)
        else enumerate(state)
        if isinstance(state, (list, tuple))
        else []
    )
    return [f"{k}.{name}".rstrip(".") for k, v in items for name in non_finite_tensors(v)]


def save_checkpoint(path, state):
    """Writes `state` to a temporary file in the same folder, then renames it over `path`. A state
    holding a non-finite weight is never written: it raises instead."""
    bad = non_finite_tensors({k: state[k] for k in ("model", "ema", "disc") if k in state})
    if bad:
        raise FloatingPointError(
            f"not writing {path}: {len(bad)} tensors hold NaN or inf (e.g. {bad[0]})"
        )
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path):
    """torch.load with weights_only=True on the CPU, with a clear error for a
    missing or unsafe file."""
    if not os.path.isfile(path):
        raise MissingFileError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (
        Exception
    ) as e:  # pickle.UnpicklingError and friends: the message names the offending global
        raise UserError(f"{path} is not a checkpoint that loads with weights_only=True: {e}") from e


def check_finite(state_dict, path):
    """Refuses weights holding NaN or inf: a run that diverged must not feed the next stage."""
    bad = non_finite_tensors(state_dict)
    if bad:
        raise UserError(
            f"{path} holds non-finite weights ({len(bad)} tensors with NaN or inf, e.g. {bad[0]}): "
            f"use an earlier checkpoint of that run"
        )


def find_checkpoint(name_or_path):
    """A local path as given; else a bare official name (no folder) under pretrained_models/,
    downloaded if absent and checked to be the official model it names before it is kept."""
    if os.path.isfile(name_or_path):
        return name_or_path
    if name_or_path not in PRETRAINED:
        hint = (
            f"; official names, without a folder: {', '.join(PRETRAINED)}"
            if os.path.basename(name_or_path) in PRETRAINED
            else ""
        )
        raise MissingFileError(f"checkpoint {name_or_path} does not exist{hint}")
    local, url = os.path.join(PRETRAINED_DIR, name_or_path), PRETRAINED[name_or_path]["url"]
    if not os.path.isfile(local):
        os.makedirs(PRETRAINED_DIR, exist_ok=True)
        tmp = f"{local}.download"
        try:
            torch.hub.download_url_to_file(url, tmp)
        except Exception as e:
            raise MissingFileError(
                f"{name_or_path} is not in {PRETRAINED_DIR}/ and could not be downloaded ({e}); "
                f"download {url} into {PRETRAINED_DIR}/{name_or_path} by hand"
            ) from e
        verify_official(tmp, name_or_path)
        os.replace(tmp, local)
    return local


def verify_official(path, name):
    """The official checkpoints come without checksums: a download is accepted if it loads
    with weights_only=True, has the official XL/2 config of its family at its image size, and
    holds only finite weights."""
    official = PRETRAINED[name]
    state_dict = load_checkpoint(path)
    config = infer_dit_config(
        {k: v for k, v in state_dict.items() if not k.startswith(REPA_PROJECTORS)}
    )
    expected = dict(
        model="DiT-XL/2",
        input_size=official["image_size"] // 8,
        in_channels=4,
        num_classes=1000,
        learn_sigma=official["family"] != "repa",
    )
    if config != expected or (official["family"] == "repa") != any(
        k.startswith(REPA_PROJECTORS) for k in state_dict
    ):
        raise UserError(
            f"the download {path} is not the official {name} (it has {config}); "
            "remove it and try again"
        )
    check_finite(state_dict, path)


def bare_family(state_dict, path):
    """Which official family a bare state dict belongs to: REPA's hold its projector weights; SiT's
    and DiT's have the same names and shapes, so a SiT checkpoint is known by its official file name
    (or imported, see below)."""
    if any(k.startswith(REPA_PROJECTORS) for k in state_dict):
        return "repa"
    name = os.path.basename(path)
    return PRETRAINED[name]["family"] if name in PRETRAINED else "dit"


#################################################################################
#                                The config schema                              #
#################################################################################


def teacher_config(
    model,
    input_size,
    in_channels,
    num_classes,
    learn_sigma,
    space,
    vae,
    image_size,
    data,
    prediction="eps",
    noise_at=None,
    time_scale=None,
):
    """What a teacher checkpoint says about its model: the DiT_models key and its constructor
    arguments, the space it works in ('pixel' or 'latent', with the VAE), the image size and the
    data it learnt, and what it predicts: 'eps' (DiT) or 'velocity' (a flow, with its time
    convention: the end of t in [0, 1] that is noise, and the factor its time embedding is fed t
    with; see diffusion/flow.py)."""
    return dict(
        kind="dit",
        model=model,
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
        space=space,
        vae=vae,
        image_size=image_size,
        data=data,
        prediction=prediction,
        noise_at=noise_at,
        time_scale=time_scale,
    )


def student_config(teacher, timesteps, history_layers, boundaries, target, teacher_sha256, gan):
    """What a student checkpoint says: its teacher's shapes and space, the input
    timestep of each step, N, the solver steps it was distilled between, the target, the
    teacher's hash, and the stage."""
    return dict(
        kind="ard",
        model=teacher["model"],
        input_size=teacher["input_size"],
        in_channels=teacher["in_channels"],
        num_classes=teacher["num_classes"],
        timesteps=list(timesteps),
        history_layers=history_layers,
        boundaries=list(boundaries),
        target=target,
        space=teacher["space"],
        vae=teacher.get("vae"),
        image_size=teacher.get("image_size"),
        data=teacher.get("data"),
        teacher_sha256=teacher_sha256,
        gan=gan,
        teacher_prediction=teacher.get("prediction", "eps"),
    )


def infer_dit_config(state_dict):
    """The DiT_models key and constructor arguments of a bare DiT state dict,
    read off its shapes."""
    proj = state_dict["x_embedder.proj.weight"]  # (D, C, p, p)
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    size = next(
        (s for s, c in MODEL_CONFIGS.items() if c["depth"] == depth and c["hidden_size"] == hidden),
        None,
    )
    if size is None:
        raise UserError(f"no DiT config has depth {depth} and width {hidden}")
    num_patches = state_dict["pos_embed"].shape[1]
    out_channels = state_dict["final_layer.linear.weight"].shape[0] // (patch * patch)
    rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
    return dict(
        model=f"DiT-{size}/{patch}",
        input_size=int(round(num_patches**0.5)) * patch,
        in_channels=in_channels,
        num_classes=rows - 1,  # the null class row; DiT always trains with class dropout
        learn_sigma=out_channels == 2 * in_channels,
    )


def bare_weights_and_config(state_dict, family):
    """(state_dict, config) of an official bare state dict of a family in FAMILIES: models of SD-VAE
    latents (4 channels, 8x downsampling). REPA's projector weights are dropped, and said so."""
    projectors = [k for k in state_dict if k.startswith(REPA_PROJECTORS)]
    if projectors:
        print(
            f"dropping REPA's {len(projectors)} projector tensors ({REPA_PROJECTORS}*): they align "
            "features in training and take no part in sampling"
        )
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(REPA_PROJECTORS)}
    inferred = infer_dit_config(state_dict)
    if inferred["in_channels"] != 4:
        raise UserError(
            f"a bare state dict with {inferred['in_channels']} input channels is not an "
            "official DiT, SiT or REPA checkpoint, whose space is unknown: save it in "
            "train.py's format, with its config"
        )
    return state_dict, teacher_config(
        **inferred,
        space="latent",
        vae="ema",
        image_size=inferred["input_size"] * 8,
        data=None,
        **FAMILIES[family],
    )


def weights_and_config(ckpt, path=""):
    """(state_dict, config) of a loaded checkpoint: ours (EMA weights) or an official bare DiT, SiT
    or REPA state dict (see bare_family; `path` is the file it came from)."""
    if isinstance(ckpt, dict) and "config" in ckpt and "ema" in ckpt:
        return ckpt["ema"], ckpt["config"]
    if isinstance(ckpt, dict) and "x_embedder.proj.weight" in ckpt:
        return bare_weights_and_config(ckpt, bare_family(ckpt, path))
    raise UserError(
        "not a checkpoint of this repository nor an official DiT, SiT or REPA state dict"
    )


def peek_config(name_or_path):
    """The config of a checkpoint without reading its weights (--dry-run): the file is opened with
    its tensors memory-mapped, and only their shapes are read; an official name not yet downloaded
    gives the official model's config without downloading it."""
    name = name_or_path
    local = os.path.join(PRETRAINED_DIR, name)
    if not os.path.isfile(name) and name in PRETRAINED and not os.path.isfile(local):
        official = PRETRAINED[name]
        size = official["image_size"]
        return teacher_config(
            "DiT-XL/2",
            size // 8,
            4,
            1000,
            official["family"] != "repa",
            "latent",
            "ema",
            size,
            None,
            **FAMILIES[official["family"]],
        )
    path = find_checkpoint(name)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"{path} is not a checkpoint that loads with weights_only=True: {e}") from e
    return weights_and_config(ckpt, path)[1]


#################################################################################
#                           Models from their configs                           #
#################################################################################


def build_model(config, **kwargs):
    """A freshly initialised model of a config (teacher or student); kwargs go to the constructor
    (e.g. class_dropout_prob). Build it under `with torch.device("meta"):` to count FLOPs."""
    shapes = dict(
        input_size=config["input_size"],
        in_channels=config["in_channels"],
        num_classes=config["num_classes"],
    )
    if config["kind"] == "dit":
        return DiT_models[config["model"]](**shapes, learn_sigma=config["learn_sigma"], **kwargs)
    if config["kind"] == "ard":
        from ard_models import ARD_models

        return ARD_models[config["model"]](
            timesteps=config["timesteps"],
            history_layers=config["history_layers"],
            **shapes,
            **kwargs,
        )
    raise UserError(f"unknown model kind {config['kind']!r}")


def load_model(name_or_path, device="cpu", kind=None):
    """The model of a checkpoint (its EMA weights for ours), loaded strictly, in eval mode, and its
    config. kind='dit' or 'ard' refuses a checkpoint of the other kind."""
    path = find_checkpoint(name_or_path)
    state_dict, config = weights_and_config(load_checkpoint(path), path)
    if kind is not None and config["kind"] != kind:
        raise UserError(
            f"{name_or_path} holds {KINDS.get(config['kind'], config['kind'])}, not {KINDS[kind]}"
        )
    check_finite(state_dict, path)
    model = build_model(config)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise UserError(
            f"{path}: the weights do not match the model its config describes "
            f"({str(e).splitlines()[0]})"
        ) from e
    return model.to(device).eval(), config


def import_official(src, family, dst):
    """Writes a bare official state dict of `family` (under any file name) as a checkpoint of
    this repository, with its config, so every script reads its prediction type and time
    convention from the file."""
    state_dict, config = bare_weights_and_config(load_checkpoint(src), family)
    check_finite(state_dict, src)
    model = build_model(config)
    model.load_state_dict(state_dict, strict=True)  # refuse before writing anything
    save_checkpoint(dst, {"ema": state_dict, "config": config, "source": os.path.basename(src)})
    return config
