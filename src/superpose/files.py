"""File-system helpers every writer shares: nothing is half-written, nothing existing is silently overwritten.

A folder is built under a temporary sibling name and renamed into place only when complete; a small file is
replaced in one ``os.replace``. A reader (or a process killed mid-write) sees the old content or the new, never part.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
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
    _plain_modes(tmp)
    if final.exists():
        if replace:
            os.replace(final, old)
        else:
            final.rmdir()  # empty: a non-empty target is refused before any work
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def _plain_modes(folder: Path) -> None:
    """Give every file and folder under ``folder`` at least the mode a plain ``open``/``mkdir`` would have.

    Libraries that write through a tempfile (safetensors does) leave their files 0600, unreadable to the rest of a
    shared cluster. ``folder`` was made by ``mkdir``, so its own mode is 0777 less the umask: files get its read and
    write bits, folders all of them; nothing is narrowed (an executable launcher stays executable).
    """
    allowed = stat.S_IMODE(Path(folder).stat().st_mode) & 0o777
    for root, dirs, files in os.walk(folder):
        for name, wanted in [(d, allowed) for d in dirs] + [(f, allowed & 0o666) for f in files]:
            path = os.path.join(root, name)
            mode = os.lstat(path).st_mode
            if not stat.S_ISLNK(mode) and stat.S_IMODE(mode) & wanted != wanted:
                os.chmod(path, stat.S_IMODE(mode) | wanted)


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
    """An exclusive lock on a folder for as long as one process writes it (``fcntl.flock``).

    The lock is held on the folder itself (an open descriptor of the directory), which a stray ``rm`` of a file in it
    cannot take away from a live holder, and on ``.lock`` inside it, for file systems that cannot lock a directory
    (NFS). The kernel releases both when the process exits in any way, so a crash leaves no stale lock behind; a
    second writer is refused in one line instead of interleaving its files with the first one's. A folder the lock
    created is removed again when the work inside fails before writing anything, so a refused start leaves no trace.
    """

    def __init__(self, folder: Path, what: str) -> None:
        self.path = Path(folder) / ".lock"
        self.what = what
        self._folder: int | None = None
        self._file = None
        self._created = False

    def __enter__(self) -> "FolderLock":
        self._created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._folder = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            free = _flock(self._folder, directory=True)
            if free:  # only then: a refused writer leaves no new .lock behind
                self._file = open(self.path, "a+")
                free = _flock(self._file, directory=False)
        except BaseException:
            self._release()
            raise
        if not free:
            self._release()
            raise SuperposeError(f"{self.what} {self.path.parent} is in use by another process; wait for it to "
                                 f"finish or choose another name")
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is not None and self._created and self._only_lock_left():
            self.path.unlink()  # still locked: no other writer can have come in
            self._release()
            self.path.parent.rmdir()
            return
        self._release()  # closing releases the lock

    def _release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._folder is not None:
            os.close(self._folder)
            self._folder = None

    def _only_lock_left(self) -> bool:
        folder = self.path.parent
        return folder.is_dir() and [p.name for p in folder.iterdir()] == [self.path.name]


def _flock(target: Any, directory: bool) -> bool:
    """Take an exclusive lock without waiting: False when another process holds it. A directory that its file
    system cannot lock (NFS emulates flock with write locks, and a directory is never open for writing) counts as
    taken: ``.lock`` then carries the lock alone."""
    import fcntl

    try:
        fcntl.flock(target, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        if not directory or e.errno not in (errno.EBADF, errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP):
            raise
    return True


class ChecksumLog:
    """SHA-256 of a work folder's files, appended as each file is complete (``checksums.sha256``, in the format of
    ``sha256sum``, so ``sha256sum -c`` checks it by hand).

    A process continuing the work trusts only a file whose content matches its latest entry and makes the rest
    again. Append-only, so a thousand parallel parts cost a line each, not a rewrite of a record each; a line cut by
    a kill, or damaged, is no entry, and the file it covered is made again, so the log needs no checksum of its own.
    """

    NAME = "checksums.sha256"

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / self.NAME
        self.sums: dict[str, str] = {}
        if self.path.is_file():
            for line in self.path.read_bytes().decode("utf-8", "replace").split("\n"):
                if entry := _SUM_LINE.fullmatch(line):
                    self.sums[entry[2]] = entry[1]

    def verified(self, name: str) -> bool:
        """Whether ``name`` (relative to the folder) exists and matches its entry."""
        path = self.folder / name
        return name in self.sums and path.is_file() and file_sha256(path) == self.sums[name]

    def record(self, name: str, sha256: str | None = None) -> None:
        """Enter a complete file (its checksum computed here unless given, e.g. by the process that wrote it)."""
        sha256 = sha256 or file_sha256(self.folder / name)
        append_line(self.path, f"{sha256}  {name}")
        self.sums[name] = sha256


def append_line(path: Path, line: str) -> None:
    """Append ``line`` to a log of one entry a line, which a kill may have left cut mid-line: that line is ended
    first (its reader skips it as no entry), so the new one is whole."""
    with open(path, "a+b") as log:
        size = log.seek(0, os.SEEK_END)
        log.seek(max(size - 1, 0))
        cut = size > 0 and log.read(1) != b"\n"
        log.write((b"\n" if cut else b"") + f"{line}\n".encode())


_SUM_LINE = re.compile(r"([0-9a-f]{64})  ([^\n]+)")
