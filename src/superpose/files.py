"""File-system helpers every writer shares: nothing is half-written, nothing existing is silently overwritten.

A folder is built under a temporary sibling name and renamed into place only when complete; a small file is
replaced in one ``os.replace``. A reader (or a process killed mid-write) sees the old content or the new, never part.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import SuperposeError


def first_line(error: BaseException, limit: int = 200) -> str:
    """First line of an exception, capped, because library errors can be pages long."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_nonempty(path: Path) -> bool:
    """True for a file, or a folder with anything in it: a target that writing would overwrite."""
    path = Path(path)
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def require_empty(path: Path, what: str) -> None:
    """Refuse, in one line, to write ``what`` into ``path`` when it already holds something."""
    if is_nonempty(path):
        raise SuperposeError(f"{what} {path} exists and is not empty")


def write_atomic(path: Path, text: str) -> None:
    """Replace a small file so a reader sees the old or the new content, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextmanager
def atomic_dir(final: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``final``; on success it is renamed to ``final``, on any error removed.

    ``replace=False`` allows only an empty ``final`` (it is removed first); ``replace=True`` sets an existing
    ``final`` aside as ``.old-NAME`` until the new one is in place, so one complete copy exists at every moment
    (see :func:`restore_set_aside`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        old = final.parent / f".old-{final.name}"
        if final.exists():
            if replace:
                os.replace(final, old)
            else:
                final.rmdir()  # empty: a non-empty target is refused before any work
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def restore_set_aside(folder: Path) -> None:
    """After a crash inside :func:`atomic_dir`: drop half-written temporaries, put back a set-aside copy whose
    replacement never landed."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for tmp in folder.glob(".tmp-*"):
        if tmp.is_dir():
            shutil.rmtree(tmp)
    for old in folder.glob(".old-*"):
        final = folder / old.name.removeprefix(".old-")
        if final.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, final)
