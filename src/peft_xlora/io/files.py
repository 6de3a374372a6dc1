"""Atomic writes of folders: build beside the target, check, then swap into place in one step.

The swap is an atomic exchange of the two folders (Linux `renameat2(..., RENAME_EXCHANGE)`, through ctypes): the
target path names the complete old folder until the exchange and the complete new one after it, so a process killed
at any instant (`kill -9`, power aside) leaves one or the other there, never nothing. We chose this over making the
target a symlink swapped with `rename` (also atomic) because a checkpoint must stay a plain folder: Hub uploads,
`shutil.copytree`, `Trainer`'s checkpoint rotation and users' scripts would all see a link. Where the exchange is
unavailable (not Linux, or a file system without it), the fallback renames the old folder to a backup first and the
new one into place second: a kill between the two leaves the target missing, but the previous checkpoint complete in
``<target>.xlora-old-*`` beside it (`replace_dir` says so), and nothing is deleted before the new folder is in place.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import stat
import sys
import uuid
from collections.abc import Callable, Iterable

from .._version import __version__

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
#: Errors that mean "this system or file system cannot exchange": the fallback applies.
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def staging_dir(target: str) -> str:
    """A new empty folder beside `target` (same file system, so the final swap is atomic).

    It is made with `os.mkdir`, so it has the permissions the user's umask gives a new folder (a target that exists
    has its own copied over by `replace_dir`).
    """
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    path = os.path.join(parent, f".{os.path.basename(target)}.xlora-tmp-{uuid.uuid4().hex[:12]}")
    os.mkdir(path)
    return path


def fsync_tree(path: str) -> None:
    """Flushes every regular file under `path` to disk: the swap must not reach the disk before the data it points to.

    Links and special files (named pipes, sockets, devices: the user's, carried over by `link_others`) are never
    opened: opening a named pipe blocks until someone writes to it, and they hold no data of ours to flush.
    """
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            if not stat.S_ISREG(os.lstat(full).st_mode):
                continue
            fd = os.open(full, os.O_RDONLY | os.O_NONBLOCK)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def exchange(a: str, b: str) -> bool:
    """Swaps the folders `a` and `b` atomically; False (nothing done) where the system cannot.

    Raises:
        OSError: The exchange was possible but failed (e.g. a folder vanished).
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)  # glibc 2.28+; musl 1.2.2+
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), a, None, b)


def replace_dir(new: str, target: str, swap: Callable[[str, str], bool] | None = None) -> None:
    """Puts folder `new` at `target` atomically; the old `target` is deleted once the new one is in place.

    With an exchange (see the module docstring) `target` always holds the old or the new folder. Without one, a kill
    between the two renames leaves the old folder complete in ``<target>.xlora-old-*``. A working directory at or
    inside `target` follows the swap to the same path in the new folder, so the process never sits in the deleted
    old one.

    Args:
        new: The complete new folder, beside `target`.
        target: The folder to create or replace.
        swap: The atomic exchange; `exchange` when None (tests pass one that cannot).
    """
    swap = swap or exchange
    if not os.path.lexists(target):
        os.rename(new, target)
        return
    shutil.copymode(target, new)
    cwd = _working_directory_under(target)
    if swap(new, target):
        _return_to(cwd, target)
        shutil.rmtree(new, ignore_errors=True)  # `new` now names the old folder
        return
    backup = f"{target}.xlora-old-{uuid.uuid4().hex[:8]}"
    os.rename(target, backup)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(backup, target)
        raise
    _return_to(cwd, target)
    shutil.rmtree(backup, ignore_errors=True)


def _working_directory_under(target: str) -> str | None:
    """The process's working directory if it is `target` or inside it (the swap moves it away), else None."""
    try:
        cwd = os.getcwd()
    except OSError:  # already gone: nothing to keep
        return None
    inside = os.path.commonpath([cwd, os.path.realpath(target)]) == os.path.realpath(target)
    return cwd if inside else None


def _return_to(cwd: str | None, target: str) -> None:
    """After a swap, moves the working directory from the old folder (about to be deleted) to the same path in the new.

    Without this, `save_pretrained(".")` would leave the process in a deleted folder: `os.getcwd()` fails and every
    relative path after it (Trainer's next write) breaks. Where the new folder lacks that path, `target` itself.
    """
    if cwd is None:
        return
    try:
        os.chdir(cwd)
    except OSError:
        os.chdir(target)


def link_others(target: str, new: str, skip: Iterable[str] = ()) -> bool:
    """Hard-links every entry of folder `target` that `new` lacks into `new` (folders recreated, files linked).

    This is how a swap keeps the user's other files (a tokenizer, logs, earlier Trainer checkpoints): they appear in
    the new folder without being copied or moved, so the target holds them at every instant.

    Args:
        target: The existing folder.
        new: The staging folder.
        skip: Names not to carry over (files the new contents supersede).

    Returns:
        False if the file system refused a hard link (another device, no hard links); `new` is then as before.
    """
    skip = set(skip) | set(os.listdir(new))
    carried = []
    try:
        for name in sorted(set(os.listdir(target)) - skip):
            source, dest = os.path.join(target, name), os.path.join(new, name)
            carried.append(dest)
            if os.path.isdir(source) and not os.path.islink(source):
                shutil.copytree(source, dest, symlinks=True, copy_function=os.link)
            elif os.path.islink(source):
                os.symlink(os.readlink(source), dest)
            else:
                os.link(source, dest)
    except (OSError, shutil.Error):
        for dest in carried:
            if os.path.isdir(dest) and not os.path.islink(dest):
                shutil.rmtree(dest, ignore_errors=True)
            elif os.path.lexists(dest):
                os.remove(dest)
        return False
    return True


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


#: Written into every export: a folder holding it (and nothing else of the user's) may be replaced by a new export.
EXPORT_MARK = ".peft-xlora-export.json"


def _refuse_to_displace(target: str, produced: Iterable[str] = ()) -> None:
    """Raises unless `target` is missing, an empty folder, or a previous export of ours with no other files."""
    if os.path.lexists(target) and not os.path.isdir(target):
        raise FileExistsError(f"{target} is a file, which this export would displace; give a folder path instead.")
    if not os.path.isdir(target) or not os.listdir(target):
        return
    present = set(os.listdir(target))
    if EXPORT_MARK not in present:
        raise FileExistsError(
            f"{target} is a folder that peft-xlora did not export to (it holds {sorted(present)[:5]}, no "
            f"{EXPORT_MARK}); an export never replaces it. Export into a new or empty folder."
        )
    foreign = sorted(present - set(produced) - {EXPORT_MARK})
    if produced and foreign:
        raise FileExistsError(
            f"{target} already holds {foreign}, which this export would delete; export into a new or empty "
            "folder (or one that holds only a previous export)."
        )


def write_folder(directory: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Writes an export folder atomically: `write(tmp)` fills a staging folder, which then replaces `directory`.

    Nothing the user has is displaced: `directory` must be missing, an empty folder, or a previous export (marked by
    `EXPORT_MARK`, which every export holds) with no other files in it; anything else is refused before any write.

    Args:
        directory: The folder to create or replace.
        write: Fills the staging folder it is given.

    Raises:
        FileExistsError: `directory` is a file, a folder that is not a previous export, or an export to which other
            files were added (replacing it would delete them). Nothing is changed then.
    """
    target = os.path.realpath(os.fspath(directory))
    _refuse_to_displace(target)
    tmp = staging_dir(target)
    try:
        write(tmp)
        with open(os.path.join(tmp, EXPORT_MARK), "w", encoding="utf-8") as f:
            json.dump({"written_by": "peft-xlora", "version": __version__}, f)
        _refuse_to_displace(target, produced=os.listdir(tmp))
        fsync_tree(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
