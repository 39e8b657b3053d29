"""Files that are never seen half-written: atomic writes (a temporary file in the same folder, renamed
into place), JSON and .npz through them, file hashes, and resumable outputs that refuse to mix runs made
with other settings."""

import hashlib
import json
import os

import numpy as np

import dist_util


def atomic_write(path, write, mode="wb"):
    """Calls write(f) on a temporary file beside `path`, syncs it and renames it over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    def write(f):
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")

    atomic_write(path, write, mode="w")


def save_npz(path, **arrays):
    """np.savez, atomically (the name is used as given: no '.npz' is appended)."""
    atomic_write(path, lambda f: np.savez(f, **arrays))


def file_sha256(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def start_or_resume(path, settings, what):
    """For a resumable output described by the JSON file at `path`: stop if it was started with other settings,
    else record them (rank 0). Every rank calls it and returns when the file is in place."""
    check_same_settings(path, settings, what)
    dist_util.barrier()
    if dist_util.is_main() and not os.path.isfile(path):
        write_json(path, settings)
    dist_util.barrier()


def check_same_settings(path, settings, what):
    """If the JSON file at `path` exists, it must hold `settings`; else stop naming every difference."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        existing = json.load(f)
    diffs = [f"{k}: {existing.get(k)!r} there, {v!r} now" for k, v in settings.items() if existing.get(k) != v]
    diffs += [f"{k}: {existing[k]!r} there, absent now" for k in existing if k not in settings]
    if diffs:
        raise ValueError(f"{what} holds results made with other settings ({'; '.join(diffs)}); "
                         f"use a new output path, or remove it to start over")
