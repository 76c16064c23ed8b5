"""Folders that eetool writes (model folders, resume state, bundles) carry a ``.eetool-folder`` marker; it
replaces or removes only those, never one that holds or lies inside an input or another output of the run.

Rules: docs/failures.md
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from eetool import __version__
from eetool.core.errors import OutputError

MARKER = ".eetool-folder"
# The marker's first line; what follows it (version, kind) is for people, not checked.
_MARKER_HEADER = "eetool-folder"


REPLACE_HINT = "eetool replaces only folders it wrote: choose a new name, or remove it yourself"
STATE_HINT = "remove or rename it yourself, or choose another -o"


def not_written_by_eetool(name: str, hint: str, why: str = "") -> OutputError:
    """The refusal of a folder that lacks eetool's marker: eetool does not replace or remove it."""
    return OutputError(f"{name} exists and was not written by eetool (it has no {MARKER}){why}", hint)


def mark_folder(folder: str | Path, kind: str) -> None:
    """Put eetool's marker into a folder eetool has just created."""
    (Path(folder) / MARKER).write_text(f"{_MARKER_HEADER}\nversion: {__version__}\nkind: {kind}\n")


def is_owned(folder: str | Path) -> bool:
    """Whether ``folder`` is a real folder (not a link) that carries eetool's marker (a regular file)."""
    path = Path(folder)
    marker = path / MARKER
    if path.is_symlink() or not path.is_dir() or marker.is_symlink() or not marker.is_file():
        return False
    try:
        with open(marker, encoding="utf-8", errors="replace") as f:
            return f.readline(64).strip() == _MARKER_HEADER
    except OSError:
        return False


def make_owned_folder(folder: str | Path, kind: str) -> Path:
    """Create ``folder`` (its parent must exist) with eetool's marker in it."""
    path = Path(folder)
    try:
        path.mkdir()
        mark_folder(path, kind)
    except OSError as e:
        raise OutputError(f"cannot create the folder {folder}: {e.strerror}",
                          "check the disk space and permissions") from None
    return path


def remove_owned_folder(folder: str | Path) -> bool:
    """Remove ``folder`` if eetool wrote it (it carries the marker); leave anything else alone.

    Returns whether it was removed."""
    if not is_owned(folder):
        return False
    shutil.rmtree(folder)
    return True


def remove_state_folder(folder: str | Path, warn: Callable[[str], None]) -> None:
    """Remove a spent resume-state folder once the outputs are written; one eetool did not mark (from an older
    eetool) is left where it is, with a warning."""
    if Path(folder).is_dir() and not remove_owned_folder(folder):
        warn(f"left {folder}: it has no eetool marker ({MARKER}), so eetool does not delete it; remove it yourself")


def check_folder_output(folder: str, *, flag: str, force: bool, inputs: Iterable[str | None] = (),
                        outputs: Iterable[str | None] = ()) -> None:
    """Refuse a folder output before any work is done.

    It is a file; it is, holds or lies inside an input or holds another output of the run; it is or holds the
    current folder or eetool's embedded demo folder; it exists without ``force``, or exists without eetool's
    marker (``force`` replaces only folders eetool wrote); or its parent is missing or unwritable."""
    from eetool.core.sources import demo_path

    path = Path(folder)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise OutputError(f"{flag} {folder} is {'a link' if path.is_symlink() else 'a file'}",
                          "give the name of a new folder")
    target = path.resolve()
    for inp in inputs:
        if inp and inp != "-" and os.path.lexists(inp):
            _refuse_overlap(folder, flag, Path(inp).resolve(), target, f"the input {inp}")
    for out in outputs:
        if out and out != "-":
            _refuse_overlap(folder, flag, Path(out).resolve(), target, f"the output {out}")
    if Path.cwd().resolve().is_relative_to(target):
        raise OutputError(f"{flag} {folder} is or holds the current folder",
                          "give the name of a new folder beside your files")
    demo = demo_path("").resolve()
    if target.is_relative_to(demo) or demo.is_relative_to(target):
        raise OutputError(f"{flag} {folder} overlaps eetool's embedded demo folder", "write to another folder")
    if path.exists():
        if not force:
            raise OutputError(f"{flag} {folder} already exists", "pass --force to replace it, or choose another name")
        if not is_owned(path):
            raise not_written_by_eetool(f"{flag} {folder}", REPLACE_HINT)
    parent = target.parent
    if not parent.is_dir():
        raise OutputError(f"folder {path.parent} of {flag} {folder} does not exist", "create it first (mkdir -p)")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"folder {path.parent} of {flag} {folder} is not writable", "choose a writable folder")


def _refuse_overlap(folder: str, flag: str, other: Path, target: Path, what: str) -> None:
    if other == target:
        raise OutputError(f"{flag} {folder} is {what}", "write to a new folder")
    if other.is_relative_to(target):
        raise OutputError(f"{flag} {folder} holds {what}", "write to a new folder that holds none of the run's files")
    if target.is_relative_to(other):
        raise OutputError(f"{flag} {folder} lies inside {what}", "write to a folder outside it")


def check_state_folder(folder: str, *, resume: bool) -> None:
    """A resume-state folder (``OUTPUT.resume``) that a fresh run would replace must be one eetool wrote."""
    path = Path(folder)
    if resume or not os.path.lexists(path):
        return
    if not is_owned(path):
        raise not_written_by_eetool(f"{folder}", STATE_HINT, "; a fresh run keeps its resume state there")


def fresh_state_folder(folder: str | Path, kind: str) -> Path:
    """Start a run's resume-state folder afresh: an earlier one eetool wrote is removed first."""
    path = Path(folder)
    if os.path.lexists(path) and not remove_owned_folder(path):
        raise not_written_by_eetool(f"{folder}", STATE_HINT)
    return make_owned_folder(path, kind)


def publish_folder(tmp: str | Path, target: str | Path, kind: str) -> None:
    """Move a finished temp folder (beside ``target``) into place, marked as eetool's.

    A folder already at ``target`` is replaced only when eetool wrote it: it is moved aside first and removed
    after, so an interrupt leaves the old folder or the new one."""
    from eetool.core.interrupts import deferred

    target = Path(target)
    mark_folder(tmp, kind)
    old: str | None = None
    try:
        with deferred():
            if os.path.lexists(target):
                if not is_owned(target):
                    raise not_written_by_eetool(f"{target}", REPLACE_HINT)
                old = tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent)
                os.replace(target, os.path.join(old, "folder"))
            os.replace(tmp, target)
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
