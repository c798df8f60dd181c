"""File-system helpers every writer shares: nothing is half-written, nothing existing is silently overwritten.

A folder is built under a temporary sibling name and renamed into place only when complete; a small file is
replaced in one ``os.replace``. A reader (or a process killed mid-write) sees the old content or the new, never part.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; a truncated or foreign file is a one-line error naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise SuperposeError(f"{path} is corrupt: {first_line(e)}") from None
    if not isinstance(data, dict):
        raise SuperposeError(f"{path} is corrupt: expected a JSON object, got {type(data).__name__}")
    return data


def write_atomic(path: Path, content: str | bytes) -> None:
    """Replace a small file so a reader sees the old or the new content, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_bytes(content) if isinstance(content, bytes) else tmp.write_text(content)
    os.replace(tmp, path)


def temp_sibling(final: Path, unique: bool = True) -> Path:
    """A fresh empty folder beside ``final`` to build it in; ``unique=False`` gives a name every rank of a job can
    compute (``.tmp-NAME``), replacing any leftover of a killed write."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = f"-{os.getpid()}-{secrets.token_hex(4)}" if unique else ""
    tmp = final.parent / f".tmp-{final.name}{suffix}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_dir(tmp: Path, final: Path, replace: bool = False) -> None:
    """Rename a completed ``tmp`` to ``final``.

    ``replace=False`` allows only an empty ``final`` (removed first); ``replace=True`` sets an existing ``final``
    aside as ``.old-NAME`` until the new one is in place, so one complete copy exists at every moment (see
    :func:`restore_set_aside`).
    """
    old = final.parent / f".old-{final.name}"
    if final.exists():
        if replace:
            os.replace(final, old)
        else:
            final.rmdir()  # empty: a non-empty target is refused before any work
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


@contextmanager
def atomic_dir(final: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``final`` to fill; renamed to ``final`` on success (:func:`commit_dir`), removed
    on any error."""
    final = Path(final)
    tmp = temp_sibling(final)
    try:
        yield tmp
        commit_dir(tmp, final, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_sha256(path: Path) -> str:
    """Streaming SHA-256 of a file in 8 MiB reads into one reused buffer (constant memory, any size), so a damaged,
    tampered or swapped file is detected; hashlib releases the GIL, so threads can hash several files at once."""
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(8 << 20))
    with open(path, "rb") as f:
        while size := f.readinto(buffer):
            digest.update(buffer[:size])
    return digest.hexdigest()


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


class FolderLock:
    """An exclusive lock on a folder for as long as one process writes it (``fcntl.flock`` on ``.lock``).

    The kernel releases it when the process exits in any way, so a crash leaves no stale lock behind; a second
    writer is refused in one line instead of interleaving its files with the first one's. A folder the lock created
    is removed again when the work inside fails before writing anything, so a refused start leaves no trace.
    """

    def __init__(self, folder: Path, what: str) -> None:
        self.path = Path(folder) / ".lock"
        self.what = what
        self._file = None
        self._created = False

    def __enter__(self) -> "FolderLock":
        import fcntl

        self._created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise SuperposeError(f"{self.what} {self.path.parent} is in use by another process; wait for it to "
                                 f"finish or choose another name") from None
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is not None and self._created and self._only_lock_left():
            self.path.unlink()  # still locked: no other writer can have come in
            self._file.close()
            self.path.parent.rmdir()
            return
        self._file.close()  # closing releases the lock

    def _only_lock_left(self) -> bool:
        folder = self.path.parent
        return folder.is_dir() and [p.name for p in folder.iterdir()] == [self.path.name]
