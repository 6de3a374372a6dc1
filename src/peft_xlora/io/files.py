"""Atomic writes of folders: build beside the target, check, then rename into place."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable


def staging_dir(target: str) -> str:
    """A new empty folder beside `target` (same file system, so the final rename is atomic)."""
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.xlora-tmp-", dir=parent)


def fsync_tree(path: str) -> None:
    """Flushes every file of `path` to disk: a rename must not reach the disk before the data it points to."""
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            fd = os.open(full, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def replace_dir(new: str, target: str) -> None:
    """Renames folder `new` to `target`; an existing `target` is moved to a backup first and deleted after."""
    if not os.path.exists(target):
        os.rename(new, target)
        return
    backup = f"{target}.xlora-old-{uuid.uuid4().hex[:8]}"
    os.rename(target, backup)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def replace_files(new: str, target: str, order: Iterable[str] = (), remove: Iterable[str] = ()) -> None:
    """Moves the files of `new` into the folder `target` one by one, each replacing its old version atomically.

    Args:
        new: The folder holding the new files; removed afterwards.
        target: The folder to update; files of it that `new` does not hold are kept.
        order: Names to move first, in this order (the rest follow in name order).
        remove: Names to delete from `target` afterwards (older files the new set supersedes).
    """
    order = list(order)
    for name in sorted(os.listdir(new), key=lambda n: (order.index(n) if n in order else len(order), n)):
        os.replace(os.path.join(new, name), os.path.join(target, name))
    for name in remove:
        if os.path.exists(os.path.join(target, name)):
            os.remove(os.path.join(target, name))
    shutil.rmtree(new, ignore_errors=True)


def write_folder(directory: str | os.PathLike, write: Callable[[str], None], allowed: Iterable[str] = ()) -> None:
    """Writes a folder atomically: `write(tmp)` fills a staging folder, which then replaces `directory`.

    Args:
        directory: The folder to create or replace.
        write: Fills the staging folder it is given.
        allowed: Names an existing `directory` may hold besides what `write` produces (a previous export).

    Raises:
        FileExistsError: `directory` holds other files, which replacing it would delete.
    """
    target = os.path.abspath(os.fspath(directory))
    tmp = staging_dir(target)
    try:
        write(tmp)
        if os.path.isdir(target):
            foreign = sorted(set(os.listdir(target)) - set(os.listdir(tmp)) - set(allowed))
            if foreign:
                raise FileExistsError(
                    f"{target} already holds {foreign}, which this export would delete; export into a new or empty "
                    "folder (or one that holds only a previous export of the same model)."
                )
        fsync_tree(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
