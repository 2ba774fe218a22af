"""Atomic file writes: a crash never leaves a half-written file under the final name.

Write to a temporary file in the same directory, flush and fsync it, rename it
over the destination (atomic on POSIX), then fsync the directory so the rename
itself survives a power loss (where the file system allows it: see :func:`fsync_directory`).
A destination that is a symbolic link is replaced by the new file; the file it pointed to is
left as it was.
"""

from __future__ import annotations

import errno
import io
import os
import re
import secrets
import stat
from typing import BinaryIO, Callable

import torch

# The temporary file of a write to ``<dir>/<name>`` is ``<dir>/.<name>.<12 hex digits>.tmp``.
# The names are made here (not by tempfile, whose random part is private) so that
# temp_name_pattern can recognise exactly them and nothing else.
_TEMP_HEX_DIGITS = 12


_NAME_MAX = 255  # bytes in one path component (Linux, macOS)


def temp_name_pattern(name_regex: str) -> re.Pattern:
    """Regex matching the temp names :func:`atomic_write` uses for destinations whose
    base name matches ``name_regex`` (used to remove the leftovers of a killed write)."""
    return re.compile(rf"^\.(?:{name_regex})\.[0-9a-f]{{{_TEMP_HEX_DIGITS}}}\.tmp$")


def create_temp_file(path: str | os.PathLike) -> tuple[int, str]:
    """Create (exclusively) the temp file for a write to ``path``; ``(fd, temp path)``. Mode 0666 less
    the umask, as any new file; a write over an existing file then takes that file's mode."""
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    # A name within the file system's 255 bytes must get a temp name that fits too: a long one is
    # cut (such names are no file this package cleans up after, so no pattern need match them).
    room = _NAME_MAX - len(f"..{'0' * _TEMP_HEX_DIGITS}.tmp")
    encoded = os.fsencode(name)
    if len(encoded) > room:
        name = os.fsdecode(encoded[:room])  # a character cut in two stays bytes (surrogate escapes)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(_TEMP_HEX_DIGITS // 2)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for {path!r} after 100 tries")


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> None:
    """Call ``write(handle)`` on a temporary file, then move it to ``path`` atomically."""

    def fill(fd: int, tmp: str) -> None:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())

    _fill_then_rename(path, fill)


def atomic_write_to_path(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """:func:`atomic_write` for a writer that takes only a file name: ``write(temp path)``."""

    def fill(fd: int, tmp: str) -> None:
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())

    _fill_then_rename(path, fill)


def _fill_then_rename(path: str | os.PathLike, fill: Callable[[int, str], None]) -> None:
    """``fill(fd, temp path)`` a new temp file beside ``path`` (it flushes and fsyncs it), rename
    it over ``path``, fsync the directory; on any error the temp file is removed."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    makedirs_durable(directory)
    fd, tmp = create_temp_file(path)
    try:
        fill(fd, tmp)
        _keep_mode(path, tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        except OSError as cleanup:
            # The write's own error (a full disk) is the one to see, not the clean-up's (a file system
            # turned read-only, EIO); the temp file left behind is named (a run's restart removes it).
            if hasattr(exc, "add_note"):  # Python 3.11 on
                exc.add_note(f"and its temp file {tmp!r} could not be removed: {cleanup}")
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
            exc.filename = path  # a write or fsync error (a full disk) names no file by itself
        raise
    fsync_directory(directory)


def _keep_mode(path: str, tmp: str) -> None:
    """Give ``tmp`` the permission bits of the file it will replace, as a write in place keeps
    them (a checkpoint made private with ``chmod 600`` stays private); a new file keeps its own."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    os.chmod(tmp, mode)


def makedirs_durable(directory: str | os.PathLike) -> None:
    """``os.makedirs(directory, exist_ok=True)``, then fsync the parent of each directory it
    created, top down, so that their entries survive a power loss with what goes in them."""
    directory = os.path.abspath(os.fspath(directory))
    missing = []
    probe = directory
    while not os.path.isdir(probe):
        missing.append(probe)
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    os.makedirs(directory, exist_ok=True)
    for created in reversed(missing):
        fsync_directory(os.path.dirname(created))


# What fsync of a directory (or opening one to sync it) fails with where the file system or the
# directory's permissions do not allow it: some network and FUSE file systems refuse fsync of a
# directory (EINVAL, ENOTSUP), and a directory that may be written but not read cannot be opened.
_DIRECTORY_SYNC_UNSUPPORTED = frozenset(getattr(errno, name) for name in ("EINVAL", "ENOTSUP", "EOPNOTSUPP",
                                                                          "EBADF", "EACCES", "EPERM", "EISDIR")
                                        if hasattr(errno, name))


def fsync_directory(directory: str | os.PathLike) -> None:
    """fsync a directory, making a rename inside it durable.

    Where it cannot be done (:data:`_DIRECTORY_SYNC_UNSUPPORTED`: the file system refuses it, or
    the directory cannot be opened for reading), nothing is synced and nothing is raised: the
    rename is made, as durable as that file system makes it, and reporting the write as failed
    would stop a run whose file is in place. Any other error (EIO) names the directory.
    """
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError as exc:
        if exc.errno in _DIRECTORY_SYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        if exc.errno in _DIRECTORY_SYNC_UNSUPPORTED:
            return
        if exc.filename is None:
            exc.filename = os.fspath(directory)
        raise
    finally:
        os.close(dir_fd)


def torch_save_to(obj, handle: BinaryIO) -> None:
    """``torch.save(obj, handle)``, serialised in memory first and written in one call.

    Written straight to a file, an interrupt (Ctrl-C) landing in one of the zip writer's writes
    surfaces as its ``RuntimeError`` ("unexpected pos"), not as the ``KeyboardInterrupt`` the
    command line reports as an interruption. The cost: one serialised copy of ``obj`` in host
    memory (megabytes for LoRA weights and their optimizer state).
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    handle.write(buffer.getbuffer())


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path`` (:func:`torch_save_to`)."""
    atomic_write(path, lambda handle: torch_save_to(obj, handle))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
