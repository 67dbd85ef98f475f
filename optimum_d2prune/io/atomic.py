"""Output folders: which ones may be written or replaced, and replacing one in a single atomic step.

The rule (`check_output_dir`): a save goes into a new folder, an empty one, or (with `overwrite`) a folder that holds
an earlier output of this tool (a parseable `d2prune_config.json` record). Never into the folder of the model being
pruned or a folder that contains it, the current working directory or one of its ancestors, `/` or the home
folder. A symbolic link is written through: its target is the folder that is replaced.

`atomic_directory` writes into a temporary folder next to the target (`.NAME.tmp-XXXXXXXXXXXX`, holding a marker file
from its first moment) and swaps it in; a save killed at any step leaves the old or the new folder, and the
leftovers it may leave beside it are removed by the next save to the same folder, only when this tool made them:
a folder of that name holding the marker of a process that is gone, or (the earlier output moved aside by the
swap, before its removal wrote the marker) holding a record of this tool, or nothing.
This module imports neither torch nor transformers (the CLI checks output folders before anything loads).
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Union

from ..errors import OutputPathError

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

RECORD_NAME = "d2prune_config.json"  # == configuration.CONFIG_NAME (not imported: it would import torch)
RECORD_KEYS = ("format_version", "config", "sparsity")  # what a record written by this tool always holds
#: the record of a structured shrink (`structured.export.RECORD_NAME`) and the keys it always holds
SHRINK_RECORD_NAME, SHRINK_RECORD_KEYS = "structured_shrink.json", ("report", "versions")
#: written first into every temporary folder of a save: `{"pid": ..., "host": ...}` of the writing process
PARTIAL_MARKER = ".d2prune-partial"
_LEFTOVER = r"\.{name}\.(?:tmp|old)-[0-9a-f]{{12}}"


# ------------------------------------------------------------------------------------------ which folders
def is_tool_output(folder: PathLike) -> bool:
    """Whether `folder` holds a record written by this tool: `d2prune_config.json` (a JSON object with the keys
    `format_version`, `config` and `sparsity`) or a structured shrink's `structured_shrink.json`."""
    for name, keys in ((RECORD_NAME, RECORD_KEYS), (SHRINK_RECORD_NAME, SHRINK_RECORD_KEYS)):
        try:
            record = json.loads((Path(folder) / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if isinstance(record, dict) and all(k in record for k in keys):
            return True
    return False


def _contains(folder: Path, path: Path) -> bool:
    """`path` is `folder` or lies inside it (both resolved)."""
    return path == folder or folder in path.parents


def check_output_dir(path: PathLike, overwrite: bool = False, protected: Iterable[PathLike] = ()) -> Path:
    """Refuse an output folder a save must not write or replace; return the folder a save writes (the target of a
    symbolic link, resolved).

    Allowed: a path that does not exist, an empty folder, or with `overwrite=True` a folder holding an earlier output
    of this tool. Refused, whatever `overwrite` says: a file, `/`, the home folder, the current working directory or
    one of its ancestors, and a folder that is or contains one of the `protected` paths (the model's own folder or
    file). Raises `OutputPathError` saying why and what to do.
    """
    given = Path(path).expanduser()
    target = given.resolve()  # through symbolic links: the folder that would really be replaced
    shown = str(given) if given.resolve() == given.absolute() else f"{given} (-> {target})"
    if target.exists() and not target.is_dir():
        raise OutputPathError(f"Output folder {shown} exists and is not a folder: choose another output folder.")
    for name, special in (("the root folder", Path("/").resolve()), ("your home folder", Path.home().resolve())):
        if target == special:
            raise OutputPathError(f"Output folder {shown} is {name}: a save replaces the whole folder. Choose a "
                                  "new subfolder for the checkpoint, e.g. ./my-model-pruned.")
    cwd = Path.cwd().resolve()
    if _contains(target, cwd):
        raise OutputPathError(
            f"Output folder {shown} is the current working directory or one of its parents: a save replaces the "
            "whole folder. Choose a new subfolder for the checkpoint, e.g. ./my-model-pruned.")
    for item in protected:
        source = Path(item).expanduser()
        if not source.exists():
            continue
        source = source.resolve()
        if _contains(target, source):
            what = "is" if source == target else "contains"
            raise OutputPathError(f"Output folder {shown} {what} the model being pruned ({source}): a save replaces "
                                  "the whole folder. Choose another output folder.")
    if not target.is_dir() or not any(target.iterdir()):
        return target
    if not overwrite:
        raise OutputPathError(
            f"Output folder {shown} exists and is not empty: choose another output folder, or pass "
            "`overwrite=True` (`--overwrite`) to replace an earlier output of optimum-d2prune.")
    if not is_tool_output(target):
        raise OutputPathError(
            f"Output folder {shown} holds files that optimum-d2prune did not write (no readable {RECORD_NAME}): "
            "`overwrite` only replaces an earlier output of this tool. Choose another output folder, or empty this "
            "one yourself if its content may go.")
    return target


# -------------------------------------------------------------------------------------------- leftovers
def check_writable(path: PathLike, what: str) -> None:
    """Refuse `path` (named `what` in the message) when its nearest existing ancestor is a file or cannot be written
    in: a real probe with a temporary folder, since permission bits say nothing for root or read-only mounts."""
    parent = Path(path).expanduser()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"{what} {path}: {parent} is a file, not a folder.")
    try:
        tempfile.TemporaryDirectory(dir=parent, prefix=".d2prune-write-probe-").cleanup()
    except OSError as err:
        raise OutputPathError(f"{what} {path}: cannot write in {parent} ({err.strerror or err}); "
                              "choose a writable folder.") from None


def _write_marker(folder: Path) -> None:
    (folder / PARTIAL_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}),
                                         encoding="utf-8")


def _writer_alive(marker: Path) -> bool:
    """Whether the process named by a marker may still be writing (another host's: assumed so)."""
    try:
        owner = json.loads(marker.read_text(encoding="utf-8"))
        pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return False  # killed while writing the marker itself
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    return True


def _remove(folder: Path) -> None:
    """Delete a folder of this tool's making so that a kill at any point leaves it recognisable as a leftover: the
    marker (naming this process) is written first and deleted last."""
    try:
        _write_marker(folder)
        for entry in folder.iterdir():
            if entry.name == PARTIAL_MARKER:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        (folder / PARTIAL_MARKER).unlink()
        folder.rmdir()
    except OSError as err:  # a leftover the next save removes: never a reason to fail this one
        logger.warning("Could not remove %s (%s); the next save to this folder removes it.", folder, err)


def _is_leftover(folder: Path) -> bool:
    """A temporary folder of a save that was killed: it holds the marker of a process that is gone, or (after the
    swap: the earlier output moved aside) it is empty or holds a record of this tool."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    marker = folder / PARTIAL_MARKER
    if marker.is_file():
        return not _writer_alive(marker)
    return not any(folder.iterdir()) or is_tool_output(folder)


def clean_leftovers(save_dir: Path) -> list[Path]:
    """Remove the temporary folders that killed saves to `save_dir` left next to it (only those this tool made);
    returns what was removed."""
    pattern = re.compile(_LEFTOVER.format(name=re.escape(save_dir.name)))
    removed = []
    if not save_dir.parent.is_dir():
        return removed
    for entry in sorted(save_dir.parent.iterdir()):
        if pattern.fullmatch(entry.name) and _is_leftover(entry):
            logger.warning("Removing %s, left by an interrupted save to %s.", entry, save_dir)
            _remove(entry)
            removed.append(entry)
    return removed


def recover_interrupted_swap(save_dir: Path) -> None:
    """A save killed between the two renames of the fallback left `save_dir` missing and the old folder aside:
    put the old folder back (the interrupted save never happened)."""
    if save_dir.exists() or save_dir.is_symlink():
        return
    pattern = re.compile(rf"\.{re.escape(save_dir.name)}\.old-[0-9a-f]{{12}}")
    for old in sorted(save_dir.parent.glob(f".{save_dir.name}.old-*")):
        if pattern.fullmatch(old.name) and _is_leftover(old):
            logger.warning("Restoring %s from %s (a save to it was interrupted).", save_dir, old)
            os.rename(old, save_dir)
            return


# ------------------------------------------------------------------------------------------- the swap
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); False where the platform or
    filesystem cannot, so the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no libc symbol (musl < 1.2.5, old glibc)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(a), None, os.fspath(b))


@contextmanager
def atomic_directory(
    save_dir: PathLike, overwrite: bool = False, protected: Iterable[PathLike] = ()
) -> Iterator[Path]:
    """Yield a temporary folder next to `save_dir` (next to its target, for a symbolic link); on success it
    replaces that folder in one atomic step.

    `save_dir` is checked with `check_output_dir` before and again right before the swap. On error nothing at
    `save_dir` changes, and a process killed at any point leaves either the old folder or the new one, never a mix
    (an atomic exchange where the filesystem has one, else two renames repaired by the next save). A failed write
    (full disk, file size limit) raises an `OSError` naming `save_dir`.
    """
    protected = tuple(protected)
    given = Path(save_dir).expanduser().absolute()
    target = given.resolve()
    recover_interrupted_swap(target)
    clean_leftovers(target)
    check_output_dir(given, overwrite, protected)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir(mode=0o777)  # the umask applies, unlike mkdtemp's 0o700: the result reads like any folder
    try:
        _write_marker(tmp)
        try:
            yield tmp
        except Exception as err:
            if isinstance(err, OSError) or type(err).__name__ == "SafetensorError":  # a write failed
                raise OSError(getattr(err, "errno", None) or errno.EIO,
                              f"Could not write the checkpoint for {given} ({type(err).__name__}: {err}); "
                              f"nothing at {given} was changed. Check the free space and file size limits of "
                              f"{target.parent}.") from err
            raise
        check_output_dir(given, overwrite, protected)  # something may have appeared meanwhile
        (tmp / PARTIAL_MARKER).unlink()
        if target.exists() and exchange(tmp, target):
            return  # `tmp` now holds the old folder: removed below
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except OSError:
            if old is not None:
                os.rename(old, target)
            raise
        if old is not None:
            _remove(old)
    finally:
        if tmp.exists():
            _remove(tmp)
