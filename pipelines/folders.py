"""Output folders written whole or not at all, and output paths checked before any work is done.

* :func:`check_output_dir` -- a one-line ``ValueError`` when a path cannot become a writable folder (an
  existing file, a path under a file, a read-only or virtual file system); creates nothing.
* :func:`check_replaceable` -- whether :func:`writing_folder` may write (or replace) a folder, checked early.
* :func:`writing_folder` -- write a folder into a hidden temporary sibling and rename it into place when
  the block succeeds, as checkpoints are written. A kill before the rename leaves the previous folder
  as it was (the temporary one is removed by the next write); an existing folder is replaced only if it
  holds what would be written there (its ``marker`` file), never an unrelated folder.

Replacing an existing folder takes two renames (the old folder aside, the new one into place): POSIX
has no portable atomic exchange of two directories. A kill in the microseconds between them leaves
the new folder complete under its temporary name and the old one under ``.old-<name>-<pid>``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def check_output_dir(path: str | Path, what: str = "--out") -> Path:
    """``path`` as a Path if it is, or can become, a writable folder; else a one-line ``ValueError``.

    Nothing is created: writability is proven with a temporary folder that is removed at once.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{what} {path} is an existing file, not a folder; choose a folder path.")
    ancestor = p
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{what} {path}: {ancestor} is a file, so no folder can be made below it.")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fastgen-write-test-", dir=ancestor))
    except OSError as err:
        raise ValueError(f"{what} {path} cannot be written: {err.strerror} in {ancestor}.") from None
    return p


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove_leftovers(final: Path) -> None:
    """Remove temporary folders of ``final`` left by killed writers (their process is gone)."""
    for prefix in (f".tmp-{final.name}-", f".old-{final.name}-"):
        for leftover in final.parent.glob(prefix + "*"):
            pid = leftover.name[len(prefix):]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(leftover, ignore_errors=True)


def _replace(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``, replacing an existing ``final`` (two renames; see the module docstring)."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_replaceable(final: str | Path, marker: str | None = None, what: str = "Output folder") -> Path:
    """``final`` as a Path if :func:`writing_folder` may write it: absent, empty, or holding ``marker``; else a
    one-line ``ValueError`` (callers check this before any long work)."""
    final = Path(final)
    if final.exists():
        if not final.is_dir():
            raise ValueError(f"{what} {final} is an existing file, not a folder.")
        if marker is not None and any(final.iterdir()) and not (final / marker).exists():
            raise ValueError(f"{what} {final} already exists and holds no {marker}: it is not a folder fastgen "
                             "wrote, so it is left alone; choose another path.")
    return final


@contextlib.contextmanager
def writing_folder(final: str | Path, marker: str | None = None, what: str = "Output folder"):
    """Yield a temporary folder to write ``final``'s contents into; it becomes ``final`` when the block ends.

    Args:
        final: the folder to write (or replace).
        marker: a file that an existing ``final`` must hold to be replaced (e.g. ``model_index.json``):
            an existing non-empty folder without it is refused with a ``ValueError``, untouched.
        what: the word used in that error.
    Raises:
        ValueError: ``final`` is a file, or a non-empty folder without ``marker``.
    """
    final = check_replaceable(final, marker, what)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(final)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace(tmp, final)


def installed_output(out: str | Path | None, installed: Path, replace_installed: bool, default: Path) -> Path:
    """The folder a ``zoo train`` / ``classifier`` command writes: ``out``, else ``default`` (a folder of the
    user's, e.g. ``./zoo/NAME``); the installed folder only with ``replace_installed`` (never by default)."""
    if out is not None and replace_installed:
        raise ValueError("Give --out or --replace-installed, not both.")
    return check_output_dir(installed if replace_installed else out if out is not None else default)


def keep_other_files(old: Path, new: Path) -> None:
    """Copy into ``new`` what ``old`` holds and ``new`` does not (before ``new`` replaces ``old``: a retrained
    folder keeps its notes and grids until they are rewritten)."""
    if not old.is_dir():
        return
    for item in old.iterdir():
        if not (new / item.name).exists() and not item.name.startswith((".tmp-", ".old-")):
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, new / item.name)


__all__ = ["check_output_dir", "check_replaceable", "writing_folder", "installed_output", "keep_other_files"]
