"""Files that are never seen half-written: atomic writes (a temporary file in the same folder,
renamed into place), JSON and .npz through them, file hashes, and resumable outputs that refuse to
mix runs made with other settings."""

import errno
import hashlib
import json
import os
import re
import shutil
import socket

import numpy as np

from ard import dist_util
from ard.cli import UserError

TEMPORARY = re.compile(r"\.tmp-(?P<pid>\d+)@(?P<host>[^/]+)$")


def temporary_name(path):
    """PATH.tmp-PID@HOST: where a file or folder is written before it is renamed into place. The
    process and host in the name let remove_stale_temporaries tell the leftovers of a dead process
    from work in progress."""
    return f"{path}.tmp-{os.getpid()}@{socket.gethostname()}"


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder):
    """Removes the temporary files and folders in `folder` left by dead processes of this
    host; returns their names."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        match = TEMPORARY.search(name)
        if match and match["host"] == socket.gethostname() and not _alive(int(match["pid"])):
            path = os.path.join(folder, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            removed.append(name)
    return removed


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def no_space_error(path, error):
    """The UserError for a write that ran out of disk space (or quota): nothing
    half-written is left in place."""
    return UserError(
        f"no space left to write {path} ({os.strerror(error.errno)}): it was not written "
        "and the files written before it are intact; free space on that filesystem, or "
        "write elsewhere, and run again"
    )


def atomic_write(path, write, mode="wb"):
    """Calls write(f) on a temporary file beside `path`, syncs it and renames it over
    `path`. A failure, a full disk among them (a UserError then), leaves `path` as it was
    and no temporary file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in NO_SPACE:
            raise no_space_error(path, e) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_free_space(path, need_bytes, what):
    """Refuses, before a long write, when the filesystem that will hold `path` has less free space
    than the `need_bytes` the job estimates it will write."""
    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    free = shutil.disk_usage(folder).free
    if need_bytes > free:
        raise UserError(
            f"{what} needs about {need_bytes / 2**30:.2f} GiB more and the filesystem of {folder} "
            f"has {free / 2**30:.2f} GiB free: free space there, or write elsewhere"
        )


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


class WriterLock:
    """One writer at a time for an output folder: rank 0 creates LOCK (host and pid) atomically,
    and removes it on exit. A lock left by a dead process of this host is taken over; a live
    writer's, or one from another host, stops this run with the lock's path, to remove by hand
    if its process is gone."""

    def __init__(self, folder, what):
        self.path, self.what, self.held = os.path.join(folder, "LOCK"), what, False

    def __enter__(self):
        error = None
        if dist_util.is_main():
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            error = self._acquire()
        error = dist_util.broadcast_object(error)
        if error:
            raise UserError(error)
        return self

    def _acquire(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    with open(self.path) as f:
                        owner = json.load(f)
                except (OSError, ValueError):
                    owner = {}
                pid = owner.get("pid")
                if (
                    owner.get("host") == socket.gethostname()
                    and isinstance(pid, int)
                    and not _alive(pid)
                ):
                    os.remove(self.path)  # left by a dead process of this host
                    continue
                return (
                    f"another process (pid {owner.get('pid')} on {owner.get('host')}) "
                    f"is writing {self.what}; wait for it to finish, or remove "
                    f"{self.path} if that process is gone"
                )
            with os.fdopen(fd, "w") as f:
                json.dump({"host": socket.gethostname(), "pid": os.getpid()}, f)
            self.held = True
            return None
        return f"could not take the lock {self.path} of {self.what}"

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            dist_util.barrier()  # every rank has finished writing
        if self.held and os.path.exists(self.path):
            os.remove(self.path)


def start_or_resume(path, settings, what, before_writing=None):
    """For a resumable output described by the JSON file at `path`: stop if it was started with
    other settings, then run the check `before_writing` (rank 0; it raises UserError to refuse),
    else record the settings (rank 0). Every rank calls it and returns when the file is in place."""
    check_same_settings(path, settings, what)
    error = None
    if before_writing is not None and dist_util.is_main():
        try:
            before_writing()
        except UserError as e:
            error = str(e)
    error = dist_util.broadcast_object(error)
    if error:
        raise UserError(error)
    dist_util.barrier()
    if dist_util.is_main() and not os.path.isfile(path):
        write_json(path, settings)
    dist_util.barrier()


def check_same_settings(path, settings, what):
    """If the JSON file at `path` exists, it must hold `settings`; else stop
    naming every difference."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        existing = json.load(f)
    diffs = [
        f"{k}: {existing.get(k)!r} there, {v!r} now"
        for k, v in settings.items()
        if existing.get(k) != v
    ]
    diffs += [f"{k}: {existing[k]!r} there, absent now" for k in existing if k not in settings]
    if diffs:
        raise UserError(
            f"{what} holds results made with other settings ({'; '.join(diffs)}); "
            f"use a new output path, or remove it to start over"
        )
