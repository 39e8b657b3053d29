"""Checkpoint I/O and model loading, shared by every script.

Our checkpoints hold plain types only (state dicts, numbers, strings, lists and dicts), are written
atomically and load with torch.load(weights_only=True), so a checkpoint from the internet cannot run
code. Official DiT checkpoints (bare state dicts) load too; their config is read off the weights.
"""

import hashlib
import os

import torch

from models import DiT_models, MODEL_CONFIGS

# Official DiT checkpoints (facebookresearch/DiT): looked up locally first, then downloaded.
PRETRAINED_DIT = {"DiT-XL-2-256x256.pt": 256, "DiT-XL-2-512x512.pt": 512}
PRETRAINED_URL = "https://dl.fbaipublicfiles.com/DiT/models/{}"
PRETRAINED_DIR = "pretrained_models"


def save_checkpoint(path, state):
    """Writes `state` to a temporary file in the same folder, then renames it over `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    """torch.load with weights_only=True on the CPU, with a clear error for a missing or unsafe file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError and friends: the message names the offending global
        raise ValueError(f"{path} is not a checkpoint that loads with weights_only=True: {e}") from e


def file_sha256(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def find_checkpoint(name_or_path):
    """A local path as given; else an official DiT name under pretrained_models/, downloaded if absent."""
    if os.path.isfile(name_or_path):
        return name_or_path
    name = os.path.basename(name_or_path)
    if name not in PRETRAINED_DIT:
        raise FileNotFoundError(f"checkpoint {name_or_path} does not exist (official names: {', '.join(PRETRAINED_DIT)})")
    local = os.path.join(PRETRAINED_DIR, name)
    if not os.path.isfile(local):
        os.makedirs(PRETRAINED_DIR, exist_ok=True)
        try:
            torch.hub.download_url_to_file(PRETRAINED_URL.format(name), local)
        except Exception as e:
            raise FileNotFoundError(
                f"{name} is not in {PRETRAINED_DIR}/ and could not be downloaded ({e}); "
                f"download {PRETRAINED_URL.format(name)} into {PRETRAINED_DIR}/ by hand"
            ) from e
    return local


def infer_dit_config(state_dict):
    """The DiT_models key and constructor arguments of a bare DiT state dict, read off its shapes."""
    proj = state_dict["x_embedder.proj.weight"]  # (D, C, p, p)
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    size = next((s for s, c in MODEL_CONFIGS.items() if c["depth"] == depth and c["hidden_size"] == hidden), None)
    if size is None:
        raise ValueError(f"no DiT config has depth {depth} and width {hidden}")
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


def teacher_state_dict(ckpt):
    """(state_dict, config) of a loaded checkpoint: ours (EMA weights) or an official bare DiT state dict."""
    if isinstance(ckpt, dict) and "config" in ckpt and "ema" in ckpt:
        return ckpt["ema"], ckpt["config"]
    if isinstance(ckpt, dict) and "x_embedder.proj.weight" in ckpt:
        config = infer_dit_config(ckpt)
        # Official checkpoints are ImageNet models in SD-VAE latent space (8x downsampling).
        config.update(kind="dit", space="latent", vae="ema", image_size=config["input_size"] * 8)
        return ckpt, config
    raise ValueError("not a DiT checkpoint: expected this repository's format or an official DiT state dict")


def load_dit(name_or_path, device="cpu"):
    """Builds the teacher of a checkpoint and loads its (EMA) weights strictly; returns (model in eval mode, config)."""
    state_dict, config = teacher_state_dict(load_checkpoint(find_checkpoint(name_or_path)))
    if config.get("kind", "dit") != "dit":
        raise ValueError(f"{name_or_path} holds a {config['kind']} model, not a DiT teacher")
    model = DiT_models[config["model"]](
        input_size=config["input_size"], in_channels=config["in_channels"],
        num_classes=config["num_classes"], learn_sigma=config["learn_sigma"],
    )
    model.load_state_dict(state_dict, strict=True)
    return model.to(device).eval(), config


def load_student(path, device="cpu"):
    """Builds the ARD student of a train_ard.py checkpoint with its EMA weights; returns (model in eval mode, config)."""
    from ard_models import ARD_models

    ckpt = load_checkpoint(path)
    config = ckpt.get("config", {}) if isinstance(ckpt, dict) else {}
    if config.get("kind") != "ard":
        raise ValueError(f"{path} is not a student checkpoint of train_ard.py")
    model = ARD_models[config["model"]](
        timesteps=config["timesteps"], history_layers=config["history_layers"], input_size=config["input_size"],
        in_channels=config["in_channels"], num_classes=config["num_classes"],
    )
    model.load_state_dict(ckpt["ema"], strict=True)
    return model.to(device).eval(), config


def checkpoint_kind(name_or_path):
    """'ard' for a student checkpoint of train_ard.py, 'dit' for a teacher (ours or official)."""
    ckpt = load_checkpoint(find_checkpoint(name_or_path))
    return ckpt.get("config", {}).get("kind", "dit") if isinstance(ckpt, dict) and "config" in ckpt else "dit"
