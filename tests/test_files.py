"""files.py: a folder lock a stray `rm` cannot take from a live holder, and written files readable as a plain write's."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from superpose.errors import SuperposeError
from superpose.files import FolderLock, atomic_dir, write_atomic

HOLDER = """
import sys
from superpose.files import FolderLock
with FolderLock(sys.argv[1], "run folder"):
    print("locked", flush=True)
    sys.stdin.read()  # held until the test closes our stdin
"""


@contextmanager
def holder(folder: Path) -> Iterator[subprocess.Popen]:
    """Another process holding the folder's lock (as a live run does) until the block ends."""
    job = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True)
    try:
        assert job.stdout.readline() == "locked\n"
        yield job
    finally:
        job.stdin.close()
        job.wait(timeout=60)


def test_a_deleted_lock_file_does_not_let_a_second_writer_in(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    with holder(folder):
        (folder / ".lock").unlink()  # a stray rm while the holder is alive
        with pytest.raises(SuperposeError, match=rf"^run folder {folder} is in use by another process; wait for it"):
            with FolderLock(folder, "run folder"):
                pass
        assert not (folder / ".lock").exists()  # the refused writer left nothing behind
    with FolderLock(folder, "run folder"):  # the holder is gone: the lock is free again
        assert (folder / ".lock").is_file()


def test_the_lock_is_refused_while_held_and_free_after_any_exit(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    with holder(folder) as job:
        with pytest.raises(SuperposeError, match="is in use by another process"):
            FolderLock(folder, "run folder").__enter__()
        job.kill()
    with FolderLock(folder, "run folder"):
        pass


def test_a_refused_start_in_a_new_folder_leaves_no_trace(tmp_path: Path) -> None:
    folder = tmp_path / "new"
    with pytest.raises(ValueError):
        with FolderLock(folder, "run folder"):
            raise ValueError
    assert list(tmp_path.iterdir()) == []


@pytest.fixture()
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_files_written_into_a_folder_get_the_mode_of_a_plain_write(tmp_path: Path, umask_022: None) -> None:
    """safetensors writes through a tempfile (0600); the committed folder's files are 0644 under umask 022, as
    everything superpose writes itself; an executable stays executable."""
    with atomic_dir(tmp_path / "export") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "run.sh").write_text("#!/bin/sh\n")
        (tmp / "sub" / "run.sh").chmod(0o755)
        write_atomic(tmp / "config.json", "{}\n")
    modes = {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in tmp_path.rglob("*")}
    assert modes == {"export": "0o755", "export/model.safetensors": "0o644", "export/config.json": "0o644",
                     "export/sub": "0o755", "export/sub/run.sh": "0o755"}


def test_a_private_umask_keeps_files_private(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        with atomic_dir(tmp_path / "export") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
    finally:
        os.umask(old)
    assert (tmp_path / "export" / "model.safetensors").stat().st_mode & 0o777 == 0o600
