"""A run folder belongs to one run: an exclusive lock while it trains, and checks that ``--resume`` continues
the same run (recipe and teacher) before anything is loaded or written.

* :class:`RunFolderLock` -- ``OUT/.lock``, held with ``fcntl.flock`` for the whole run by the main process. A
  second process on the same folder is refused with the holder's PID; the kernel releases the lock when its
  holder dies, ``kill -9`` included, so a killed run never blocks its own ``--resume``.
* :func:`recipe_differences` -- the recipe keys a resume would change, against the run's ``recipe.json``.
  Only how long a run lasts and how it checkpoints, logs, evaluates and exports may change
  (:data:`RESUMABLE_KEYS`).
* :func:`teacher_differences` -- the components whose weights differ from the run's ``teacher.json``
  (:func:`fastgen.pipelines.loading.pipeline_fingerprint`), so a resume with another teacher (or the same
  path holding other weights) is refused.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from .recipes import flatten

LOCK_FILE = ".lock"
RECIPE_FILE = "recipe.json"
TEACHER_FILE = "teacher.json"
RESUMES_FILE = "resumes.jsonl"  # each --resume: when, from which checkpoint, which recipe keys changed
# What a resumed run may change: its length, how it checkpoints, logs and evaluates, and what it exports.
# Everything else (method, options, optimizers, data, batch size, seed, student and critic) is the run.
# The teacher is compared by its weights (teacher.json), not by the name it was given.
RESUMABLE_KEYS = frozenset({"train.steps", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
                            "train.eval_every", "train.eval_images", "train.trackers", "train.progress",
                            "train.export_lora", "data.num_workers", "out", "name", "teacher"})


def launch_rank() -> int:
    """This process's rank as its launcher set it (torchrun, ``accelerate launch``, DeepSpeed, MPI), read before
    accelerate's process state exists: creating that state here, without the trainer's settings, would fix
    it wrongly for the whole process (e.g. not distributed under ``ACCELERATE_USE_CPU``)."""
    from accelerate.utils import get_int_from_env

    return get_int_from_env(["RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"], 0)


class RunFolderLock:
    """Hold ``folder/.lock`` exclusively for a ``with`` block (POSIX ``flock``; no lock where ``fcntl`` is missing).

    Args:
        folder: the run folder (created if needed; removed again if the block fails and it holds only the lock).
        active: take the lock (the main process); other processes of a data-parallel run pass ``False``.
    Raises:
        RuntimeError: another process holds the lock; the message names its PID, host and start time.
    """

    def __init__(self, folder: str | Path, active: bool = True):
        self.folder, self.active = Path(folder), active
        self.file = None
        self.created = False

    def __enter__(self) -> "RunFolderLock":
        if not self.active:
            return self
        try:
            import fcntl
        except ImportError:  # not POSIX: run without the lock
            return self
        self.created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_FILE
        while True:
            f = open(path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip()
                f.close()
                raise RuntimeError(f"Run folder {self.folder} is in use by {_describe(holder)}; wait for it to end "
                                   "(or stop it), or choose another --out.") from None
            # a failed run may have removed the file between our open and flock: lock the file that is there now
            if path.exists() and os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
            f.close()
        f.seek(0)
        self.previous = (f.read(), os.stat(path))  # restored if the run fails: a refused run changes nothing
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}))
        f.flush()
        self.file = f
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.file is None:
            return
        lock = self.folder / LOCK_FILE
        if exc_type is not None and self.created and [p.name for p in self.folder.iterdir()] == [LOCK_FILE]:
            lock.unlink(missing_ok=True)  # the run failed before writing anything: leave no folder behind
            try:
                self.folder.rmdir()
            except OSError:
                pass
        elif exc_type is not None and not self.created:  # the lock file as the last holder left it
            text, st = self.previous
            self.file.seek(0)
            self.file.truncate()
            self.file.write(text)
            self.file.flush()
            os.utime(lock, ns=(st.st_atime_ns, st.st_mtime_ns))
        self.file.close()  # releases the flock
        self.file = None


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        return f"process {info['pid']} on {info['host']} (since {info['started']}: {info['command']})"
    except (ValueError, KeyError, TypeError):
        return "another process (its PID is not recorded yet)"


def read_json(path: Path) -> dict | None:
    """A JSON file of the run folder, or ``None`` when it is missing."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the run folder is damaged.") from None


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (a kill leaves the old file or the new)."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def recipe_differences(saved: dict, now: dict) -> list[str]:
    """``"key: <run's value> in the run, <value> now"`` for each key outside :data:`RESUMABLE_KEYS` that differs."""
    a, b = flatten(saved), flatten(now)
    missing = "(not set)"
    keys = sorted(set(a) | set(b), key=lambda k: (k.count("."), k))  # top-level keys (method, seed) first
    return [f"{k}: {a.get(k, missing)!r} in the run, {b.get(k, missing)!r} now"
            for k in keys if k not in RESUMABLE_KEYS and a.get(k, missing) != b.get(k, missing)]


def teacher_differences(saved: dict, now: dict) -> list[str]:
    """The pipeline components whose fingerprints differ (or that only one of the two teachers has)."""
    a, b = saved.get("components", {}), now.get("components", {})
    return sorted(name for name in set(a) | set(b) if a.get(name) != b.get(name))


__all__ = ["RunFolderLock", "launch_rank", "recipe_differences", "teacher_differences", "read_json", "write_json",
           "RESUMABLE_KEYS", "LOCK_FILE", "RECIPE_FILE", "TEACHER_FILE", "RESUMES_FILE"]
