"""Files written whole or not at all, and a full disk said as such, whoever was writing.

What a later run or a reader trusts (checkpoints, class images, the weights, run.json, samples) is
written under a hidden temporary name beside its place and renamed into it once complete: a rename
within a folder is atomic, so a process killed mid-write leaves at most a hidden `.tmp` file or
folder, which nothing reads and the next write of the same thing replaces. A write that fails
removes its temporary file or folder, and a full disk is raised as one `OSError(ENOSPC, ..., file)`
naming what was not written (safetensors, torch and PIL each say it in their own way, some with no
errno or file name); the CLI prints it as `error: No space left on device: <file>`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

_FULL = (errno.ENOSPC, errno.EDQUOT)
# safetensors (Rust) raises its own error type; the I/O error is only in its message.
_FULL_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def temporary(path: Path) -> Path:
    """The hidden name `path` is written under before it is complete."""
    return path.with_name(f".{path.name}.tmp")


@contextlib.contextmanager
def written(path: Path) -> Iterator[Path]:
    """Yield the temporary name to write `path` under; it becomes `path` when the block completes.
    On any error the temporary file is removed and the error named after `path` (see `cleaned_up`)."""
    path = Path(path)
    tmp = temporary(path)
    with cleaned_up(tmp, path):
        yield tmp
        os.replace(tmp, path)


@contextlib.contextmanager
def cleaned_up(tmp: Path, path: Path) -> Iterator[None]:
    """On an error in the block, remove `tmp` (a file or a folder) and re-raise; a full disk, or an
    OSError that names no file, is re-raised as an OSError naming `path`, the thing not written."""
    try:
        yield
    except BaseException as err:
        remove(Path(tmp))
        named = _naming(err, Path(path))
        if named is None:
            raise
        raise named from err


def remove(path: Path) -> None:
    """Remove a file or a folder tree, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def disk_full(err: BaseException) -> int | None:
    """ENOSPC (or EDQUOT) when `err`, or an error it was raised from or while handling, is a full disk."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL:
            return current.errno
        message = str(current)
        if any(words in message for words in _FULL_WORDS):
            return errno.EDQUOT if "122" in message or "quota" in message else errno.ENOSPC
        current = current.__cause__ or current.__context__
    return None


def _naming(err: BaseException, path: Path) -> OSError | None:
    """`err` as an OSError naming `path`, when it is a full disk or an OSError without a file name."""
    full = disk_full(err)
    if full is not None:
        return OSError(full, os.strerror(full), str(path))
    if isinstance(err, OSError) and err.errno and not err.filename:
        return OSError(err.errno, err.strerror or os.strerror(err.errno), str(path))
    return None
