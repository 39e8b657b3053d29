"""Files that are never seen half-written: atomic writes (a temporary file in the same folder,
renamed into place), JSON and .npz through them, file hashes, and resumable outputs that refuse to
mix runs made with other settings."""

import atexit
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import time

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


def remove_stale_temporaries(folder, all_but_mine=False):
    """Removes the temporary files and folders in `folder` left by dead processes of this host, or,
    with all_but_mine (the caller holds the folder's WriterLock, so no other process writes there),
    every temporary but this process's; returns their names."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    me = (socket.gethostname(), os.getpid())
    for name in os.listdir(folder):
        match = TEMPORARY.search(name)
        if not match:
            continue
        owner = (match["host"], int(match["pid"]))
        dead_here = owner[0] == me[0] and not _alive(owner[1])
        if dead_here or (all_but_mine and owner != me):
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


# A writer's lock is a lease: its holder touches LOCK every LOCK_HEARTBEAT_SECONDS, and a lock whose
# heartbeat has not moved for LOCK_STALE_HEARTBEATS of them is a dead job's, whatever host it ran on
# (a requeued job often starts on another node). The heartbeat is read as "has the file's mtime
# changed", on this host's clock only, so clocks that disagree between hosts do not matter.
LOCK_HEARTBEAT_SECONDS = float(os.environ.get("ARD_LOCK_HEARTBEAT_SECONDS", 30))
LOCK_STALE_HEARTBEATS = 4


class WriterLock:
    """One writer at a time for an output folder (a store, a sample file's chunks, a training run):
    rank 0 creates folder/LOCK (host and pid) atomically, keeps it alive with a heartbeat thread,
    and removes it on exit (or when the process ends). A lock left by a dead process of this host is
    taken over at once; one whose heartbeat stops (a job killed on another node) after
    LOCK_STALE_HEARTBEATS heartbeats of waiting; a live writer's stops this job with one sentence.
    Whoever takes a folder over removes the temporaries its dead writer left there."""

    def __init__(self, folder, what):
        self.folder, self.path, self.what, self.held = (
            folder,
            os.path.join(folder, "LOCK"),
            what,
            False,
        )
        self._beating = None

    def __enter__(self):
        error = None
        if dist_util.is_main():
            try:
                os.makedirs(self.folder, exist_ok=True)
                error = self._acquire()
            except OSError as e:
                error = f"could not take the lock {self.path} of {self.what}: {e}"
        error = dist_util.broadcast_object(error)
        if error:
            raise UserError(error)
        return self

    def _owner(self):
        try:
            with open(self.path) as f:
                return json.load(f), os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError):
            return {}, None

    def _acquire(self):
        waited, seen, seen_at, alive = 0.0, None, time.monotonic(), False
        stale_after = LOCK_STALE_HEARTBEATS * LOCK_HEARTBEAT_SECONDS
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner, mtime = self._owner()
                if owner is None:
                    continue  # released meanwhile
                pid, host = owner.get("pid"), owner.get("host")
                if host == socket.gethostname() and isinstance(pid, int):
                    if _alive(pid):
                        return self._refusal(owner, "")
                    self._take_over(f"left by pid {pid}, which is gone")
                    continue
                now = time.monotonic()
                if mtime != seen:
                    alive, seen, seen_at = seen is not None, mtime, now
                if now - seen_at >= stale_after:
                    self._take_over(f"of {host}, whose heartbeat stopped {now - seen_at:.0f} s ago")
                    continue
                if alive and waited >= stale_after:
                    return self._refusal(owner, f" (its heartbeat is alive after {waited:.0f} s)")
                time.sleep(LOCK_HEARTBEAT_SECONDS / 2)
                waited += LOCK_HEARTBEAT_SECONDS / 2
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"host": socket.gethostname(), "pid": os.getpid()}, f)
            self.held = True
            self.removed = remove_stale_temporaries(self.folder, all_but_mine=True)
            self._start_heartbeat()
            atexit.register(self.release)
            return None

    def _refusal(self, owner, detail):
        return (
            f"another process (pid {owner.get('pid')} on {owner.get('host')}) is writing "
            f"{self.what}{detail}; wait for it to finish, or remove {self.path} if that process "
            f"is gone"
        )

    def _take_over(self, why):
        print(f"taking over {self.path} {why}", flush=True)
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass

    def _start_heartbeat(self):
        stop = threading.Event()

        def beat():
            while not stop.wait(LOCK_HEARTBEAT_SECONDS):
                try:
                    os.utime(self.path)
                except OSError:
                    pass  # a shared filesystem's hiccup: the next beat tries again

        threading.Thread(target=beat, name="lock-heartbeat", daemon=True).start()
        self._beating = stop

    def release(self):
        """Stops the heartbeat and removes LOCK if this process holds it."""
        if self._beating is not None:
            self._beating.set()
            self._beating = None
        if self.held:
            self.held = False
            owner, _ = self._owner()
            if (
                owner
                and owner.get("pid") == os.getpid()
                and owner.get("host") == socket.gethostname()
            ):
                os.remove(self.path)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            dist_util.barrier()  # every rank has finished writing
        self.release()


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
