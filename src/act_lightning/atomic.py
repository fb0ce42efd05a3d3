"""Atomic file writes: a crash or a full disk mid-write never leaves a truncated file behind; a kill
mid-write leaves a temporary file, which `remove_stale_temporaries` clears at the next start."""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

# `.<name>.<8 characters of tempfile's alphabet>.tmp`: the temporary files of `atomic_write` (mkstemp)
TEMPORARY = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp")


def temporary_name(path: str | Path) -> Path:
    """A new name in `path`'s folder for a file that is to become `path` later (a checkpoint written now
    and renamed into place later): named as `atomic_write`'s temporaries, so that one a kill leaves
    behind is removed by `remove_stale_temporaries`."""
    path = Path(path)
    return path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"


def intended_name(path: str | Path) -> Path:
    """The file a temporary name stands for (`.last.ckpt.ab12cd34.tmp`: `last.ckpt`), for messages; any
    other path is itself."""
    path = Path(path)
    match = TEMPORARY.fullmatch(path.name)
    return path.parent / match.group(1) if match else path


def default_file_mode() -> int:
    """The mode `open()` would give a new file: 0o666 less the process umask (mkstemp uses 0o600)."""
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """Yields a binary file in `path`'s folder; on success it is flushed, fsynced, given the user's
    normal file mode (collaborators can read checkpoints as they read other files) and renamed over
    `path`, on failure removed. The temporary file is locked (flock) until it is renamed, so that
    `remove_stale_temporaries` never takes a live write for the remains of a killed one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            yield f
            f.flush()
            os.fchmod(f.fileno(), default_file_mode())
            os.fsync(f.fileno())
            os.replace(tmp, path)  # while still open and locked; closing releases the lock
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Removes the temporary files of `atomic_write` in `folder` that no live process is writing (a
    kill during a save leaves one, as large as the file it was to become); returns those removed.
    Other files, and temporaries whose writer still holds their lock, are left alone. (A writer holds
    its lock from just after creating the file; call this where no other process starts writes into
    `folder` meanwhile, as a run's own checkpoint folder at its start.)"""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        if not TEMPORARY.fullmatch(path.name) or not path.is_file() or path.is_symlink():
            continue
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:  # gone meanwhile, or not ours to touch
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live write
            os.close(fd)
            continue
        try:
            path.unlink()
            removed.append(path)
        except OSError:  # gone meanwhile, or a folder we may not write: left for the user
            pass
        finally:
            os.close(fd)
    return removed
