"""Atomic writes of files and folders: after a crash the destination is old, new or absent.

Every file the project writes goes through here (checkpoints, configs, eval results, downloads,
replay buffer stores), so all of them get the same guarantees and the same permissions: regular
files are created like ``open(path, "w")`` creates them, ``0o666`` masked by the umask (``0o644``
under the usual umask 022), never executable.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Temporary files of atomic_write: ".<name>.<random>.tmp" next to the destination.
TMP_SUFFIX = ".tmp"
# Requested mode of new regular files, before the umask (what open() asks for).
FILE_MODE = 0o666


def file_mode() -> int:
    """The mode a regular file gets under the current umask: ``0o666 & ~umask``."""
    umask = os.umask(0)  # The only portable way to read the umask is to set it.
    os.umask(umask)
    return FILE_MODE & ~umask


def atomic_write(path: str | Path, write: Callable[[Any], Any]) -> None:
    """Writes a file through a temporary sibling, fsync and rename: it is complete or absent.

    If the write fails or the process dies midway, ``path`` keeps its previous content; a dead
    process can leave a ``.<name>.*.tmp`` sibling. The file gets :func:`file_mode` permissions.

    Args:
        path: Destination.
        write: Callable taking a binary file object (``write``, ``writelines``, ``flush``).

    Raises:
        OSError: The folder cannot be created or written, e.g. ENOSPC when the disk is full
            (the partial temporary file is removed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, file_mode())  # mkstemp creates 0o600; make it like any other file
        with os.fdopen(fd, "wb", buffering=0) as f:
            write(_FullWriter(f))
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        disk_error = _os_error_in_chain(e)
        if disk_error is not None and disk_error is not e:
            # torch.save reports a failed write as a RuntimeError ("unexpected pos"); the
            # OSError that says why (e.g. ENOSPC) is its context.
            raise OSError(disk_error.errno, disk_error.strerror, str(tmp)) from e
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write` of a UTF-8 string."""
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def atomic_write_dir(path: str | Path, fill: Callable[[Path], Any]) -> Path:
    """Creates or replaces the folder ``path`` atomically: complete old, complete new, or absent.

    ``fill`` writes the new content into an empty temporary sibling folder
    ``.<name>.tmp-<random>``; every file in it is fsynced, then it is renamed into place (an
    existing ``path`` is moved aside first and deleted after). If ``fill`` fails, the temporary
    folder is removed and ``path`` is untouched; a killed process can leave the sibling.

    Args:
        path: The destination folder.
        fill: Callable taking the temporary folder (a ``Path``) to write into.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = path.with_name(f".{path.name}.tmp-{tag}")
    tmp.mkdir()  # normal folder permissions (0o777 & ~umask), unlike mkdtemp's 0o700
    try:
        fill(tmp)
        fsync_tree(tmp)  # The data is on disk before the rename makes it visible.
        if path.exists():
            old = path.with_name(f".{path.name}.old-{tag}")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except OSError:
                os.replace(old, path)  # Put the old folder back.
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def fsync_tree(root: Path) -> None:
    """fsyncs every file and folder under ``root``."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def fsync_dir(folder: Path) -> None:
    """fsyncs a folder, so a rename inside it survives a power loss."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _FullWriter:
    """A binary file whose ``write`` writes everything or raises (a full disk: ENOSPC).

    An unbuffered file may write fewer bytes than asked when the disk fills up and only raise
    on the next call; writers like ``torch.save`` then fail with a confusing error.
    """

    def __init__(self, f: Any) -> None:
        self._f = f

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        while view:
            view = view[self._f.write(view) :]
        return size

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        """Nothing is buffered."""


def _os_error_in_chain(e: BaseException | None) -> OSError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None
