"""Checkpoints and the models they hold: I/O, the config schema, and building a model from a config.

Our checkpoints hold plain types only (state dicts, numbers, strings, lists and dicts), are written
atomically and load with torch.load(weights_only=True), so a checkpoint from the internet cannot run
code. Each holds a `config` that says what model it is (teacher_config / student_config below), so
every script rebuilds the model from the file alone. Official DiT checkpoints (bare state dicts) load
too; their config is read off the weights.
"""

import os

import torch

from cli import MissingFileError, UserError
from fileio import atomic_write
from models import DiT_models, MODEL_CONFIGS

# Official DiT checkpoints (facebookresearch/DiT): looked up locally first, then downloaded.
PRETRAINED_DIT = {"DiT-XL-2-256x256.pt": 256, "DiT-XL-2-512x512.pt": 512}
PRETRAINED_URL = "https://dl.fbaipublicfiles.com/DiT/models/{}"
PRETRAINED_DIR = "pretrained_models"
KINDS = {"dit": "a DiT teacher", "ard": "an ARD student"}


#################################################################################
#                                  File I/O                                     #
#################################################################################

def non_finite_tensors(state):
    """The names of the floating-point tensors holding a NaN or an infinity, anywhere in a nested state."""
    if isinstance(state, torch.Tensor):
        return [""] if state.is_floating_point() and not torch.isfinite(state).all() else []
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else []
    return [f"{k}.{name}".rstrip(".") for k, v in items for name in non_finite_tensors(v)]


def save_checkpoint(path, state):
    """Writes `state` to a temporary file in the same folder, then renames it over `path`. A state holding a
    non-finite weight is never written: it raises instead."""
    bad = non_finite_tensors({k: state[k] for k in ("model", "ema", "disc") if k in state})
    if bad:
        raise FloatingPointError(f"not writing {path}: {len(bad)} tensors hold NaN or inf (e.g. {bad[0]})")
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path):
    """torch.load with weights_only=True on the CPU, with a clear error for a missing or unsafe file."""
    if not os.path.isfile(path):
        raise MissingFileError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError and friends: the message names the offending global
        raise UserError(f"{path} is not a checkpoint that loads with weights_only=True: {e}") from e


def check_finite(state_dict, path):
    """Refuses weights holding NaN or inf: a run that diverged must not feed the next stage."""
    bad = non_finite_tensors(state_dict)
    if bad:
        raise UserError(f"{path} holds non-finite weights ({len(bad)} tensors with NaN or inf, e.g. {bad[0]}): "
                        f"use an earlier checkpoint of that run")


def find_checkpoint(name_or_path):
    """A local path as given; else a bare official DiT name (no folder) under pretrained_models/, downloaded if
    absent and checked to be an official DiT-XL/2 before it is kept."""
    if os.path.isfile(name_or_path):
        return name_or_path
    if name_or_path not in PRETRAINED_DIT:
        hint = f"; official names, without a folder: {', '.join(PRETRAINED_DIT)}" if os.path.basename(name_or_path) in PRETRAINED_DIT else ""
        raise MissingFileError(f"checkpoint {name_or_path} does not exist{hint}")
    local = os.path.join(PRETRAINED_DIR, name_or_path)
    if not os.path.isfile(local):
        os.makedirs(PRETRAINED_DIR, exist_ok=True)
        tmp = f"{local}.download"
        try:
            torch.hub.download_url_to_file(PRETRAINED_URL.format(name_or_path), tmp)
        except Exception as e:
            raise MissingFileError(
                f"{name_or_path} is not in {PRETRAINED_DIR}/ and could not be downloaded ({e}); "
                f"download {PRETRAINED_URL.format(name_or_path)} into {PRETRAINED_DIR}/ by hand"
            ) from e
        verify_official_dit(tmp, PRETRAINED_DIT[name_or_path])
        os.replace(tmp, local)
    return local


def verify_official_dit(path, image_size):
    """DiT publishes no checksums: a download is accepted if it loads with weights_only=True, has official
    DiT-XL/2's config at that image size, and holds only finite weights."""
    state_dict = load_checkpoint(path)
    config = infer_dit_config(state_dict)
    expected = dict(model="DiT-XL/2", input_size=image_size // 8, in_channels=4, num_classes=1000, learn_sigma=True)
    if config != expected:
        raise UserError(f"the download {path} is not the official DiT checkpoint (it has {config}); remove it and try again")
    check_finite(state_dict, path)


#################################################################################
#                                The config schema                              #
#################################################################################

def teacher_config(model, input_size, in_channels, num_classes, learn_sigma, space, vae, image_size, data):
    """What a teacher checkpoint says about its model: the DiT_models key and its constructor arguments,
    the space it works in ('pixel' or 'latent', with the VAE), the image size and the data it learnt."""
    return dict(kind="dit", model=model, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                learn_sigma=learn_sigma, space=space, vae=vae, image_size=image_size, data=data)


def student_config(teacher, timesteps, history_layers, boundaries, target, teacher_sha256, gan):
    """What a student checkpoint says: its teacher's shapes and space, the input timestep of each step,
    N, the solver steps it was distilled between, the target, the teacher's hash, and the stage."""
    return dict(kind="ard", model=teacher["model"], input_size=teacher["input_size"], in_channels=teacher["in_channels"],
                num_classes=teacher["num_classes"], timesteps=list(timesteps), history_layers=history_layers,
                boundaries=list(boundaries), target=target, space=teacher["space"], vae=teacher.get("vae"),
                image_size=teacher.get("image_size"), data=teacher.get("data"), teacher_sha256=teacher_sha256, gan=gan)


def infer_dit_config(state_dict):
    """The DiT_models key and constructor arguments of a bare DiT state dict, read off its shapes."""
    proj = state_dict["x_embedder.proj.weight"]  # (D, C, p, p)
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    size = next((s for s, c in MODEL_CONFIGS.items() if c["depth"] == depth and c["hidden_size"] == hidden), None)
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


def weights_and_config(ckpt):
    """(state_dict, config) of a loaded checkpoint: ours (EMA weights) or an official bare DiT state dict."""
    if isinstance(ckpt, dict) and "config" in ckpt and "ema" in ckpt:
        return ckpt["ema"], ckpt["config"]
    if isinstance(ckpt, dict) and "x_embedder.proj.weight" in ckpt:
        # A bare state dict is official DiT's format: models of SD-VAE latents (4 channels, 8x downsampling).
        inferred = infer_dit_config(ckpt)
        if inferred["in_channels"] != 4:
            raise UserError(f"a bare DiT state dict with {inferred['in_channels']} input channels is not an official DiT "
                            f"checkpoint, whose space is unknown: save it in train.py's format, with its config")
        return ckpt, teacher_config(**inferred, space="latent", vae="ema", image_size=inferred["input_size"] * 8, data=None)
    raise UserError("not a checkpoint of this repository nor an official DiT state dict")


#################################################################################
#                           Models from their configs                           #
#################################################################################

def build_model(config, **kwargs):
    """A freshly initialised model of a config (teacher or student); kwargs go to the constructor
    (e.g. class_dropout_prob). Build it under `with torch.device("meta"):` to count FLOPs."""
    shapes = dict(input_size=config["input_size"], in_channels=config["in_channels"], num_classes=config["num_classes"])
    if config["kind"] == "dit":
        return DiT_models[config["model"]](**shapes, learn_sigma=config["learn_sigma"], **kwargs)
    if config["kind"] == "ard":
        from ard_models import ARD_models

        return ARD_models[config["model"]](timesteps=config["timesteps"], history_layers=config["history_layers"],
                                           **shapes, **kwargs)
    raise UserError(f"unknown model kind {config['kind']!r}")


def load_model(name_or_path, device="cpu", kind=None):
    """The model of a checkpoint (its EMA weights for ours), loaded strictly, in eval mode, and its config.
    kind='dit' or 'ard' refuses a checkpoint of the other kind."""
    path = find_checkpoint(name_or_path)
    state_dict, config = weights_and_config(load_checkpoint(path))
    if kind is not None and config["kind"] != kind:
        raise UserError(f"{name_or_path} holds {KINDS.get(config['kind'], config['kind'])}, not {KINDS[kind]}")
    check_finite(state_dict, path)
    model = build_model(config)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise UserError(f"{path}: the weights do not match the model its config describes ({str(e).splitlines()[0]})") from e
    return model.to(device).eval(), config
