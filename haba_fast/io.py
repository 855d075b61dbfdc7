"""Atomic file writes: a temp file in the same folder, fsync, rename, fsync the folder. Nothing is left half-written.

A process killed in the middle of a write leaves at most a ``.<name>.<random>.tmp`` file beside the target;
``remove_temp_files`` (run by ``haba-fast distill`` and ``haba-fast buffer`` when they start) deletes them.
``check_writable`` is the write probe those commands run before the work starts (read-only folder, full disk).

``$HABA_FAST_IO_TEST_DELAY`` (seconds; tests only) sleeps inside every atomic write, between writing the temp
file and renaming it, so that a test can kill a process in the middle of a checkpoint write.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator, List, Union

import torch

PathLike = Union[str, os.PathLike]

TEMP_SUFFIX = ".tmp"


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX: the entry lives in the folder's own data)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def _test_delay() -> None:
    delay = os.environ.get("HABA_FAST_IO_TEST_DELAY")
    if delay:
        time.sleep(float(delay))


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is renamed over ``path``, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; give the file the permissions a plain open() would (umask applied).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        _test_delay()
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` that never leaves a partial file at ``path``."""
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as exc:
            # torch's writer reports a failed write (full disk, quota) as a RuntimeError without its errno.
            _raise_write_error(tmp.parent, exc)
            raise


def _raise_write_error(directory: Path, exc: BaseException) -> None:
    """Raise the OSError (real errno) that writing into ``directory`` gives now, if any; else return."""
    probe = directory / f".haba_fast_probe.{os.getpid()}{TEMP_SUFFIX}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * (256 << 10))
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise OSError(err.errno, f"{err.strerror} (while writing: {exc})") from exc
    finally:
        probe.unlink(missing_ok=True)


def atomic_write_bytes(data: bytes, path: PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(text: str, path: PathLike) -> None:
    atomic_write_bytes(text.encode("utf-8"), path)


def remove_temp_files(directory: PathLike, *, recursive: bool = True) -> List[Path]:
    """Delete the temp files (``.<name>.<random>.tmp``) a killed writer left in ``directory``; returns them.

    Call it only when no other process writes into ``directory`` (a run owns its output folder).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    pattern = f".*{TEMP_SUFFIX}"
    found = sorted(directory.rglob(pattern) if recursive else directory.glob(pattern))
    removed = []
    for p in found:
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def check_writable(directory: PathLike, *, what: str = "output folder", reserve_bytes: int = 1 << 20) -> Path:
    """Create ``directory`` and prove a file of ``reserve_bytes`` can be written, synced and removed there.

    Raises:
        ValueError: naming the folder and the reason (read-only, permission denied, no space left, ...).
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / ".haba_fast_write_probe") as tmp:
            with open(tmp, "wb") as f:
                f.write(b"\0" * int(reserve_bytes))
        (directory / ".haba_fast_write_probe").unlink(missing_ok=True)
    except OSError as exc:
        raise ValueError(
            f"cannot write to the {what} {directory}: {exc.strerror or exc} "
            "(choose a writable folder with free space)"
        ) from exc
    return directory


def torch_load(path: PathLike, *, what: str = "file", weights_only: bool = True, mmap: bool = False) -> Any:
    """``torch.load`` on CPU with clear errors for a missing, corrupt or unsafe file.

    The files we read (reference checkpoints, expert buffers, synthetic sets) come from other people, and a
    pickle can run any code while it is read. ``weights_only=True`` (the default, and what every reader of such
    files uses) lets through only tensors and plain values (dict, list, tuple, str, int, float, bool, None);
    anything else is refused before it is built, and our own formats store nothing else.

    Args:
        path: the file.
        what: how the error messages name it ("expert buffer", "reference styles file", ...).
        weights_only: keep True for any file that may come from someone else.
        mmap: map the tensors' storage instead of reading it (zip-format files only; older files are read).
    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is truncated or not a torch file, or it holds objects other than tensors and plain
            values (the message names the file and the refused object).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory, expected a file")
    # Legacy (pre-zip) files cannot be memory-mapped; they are small enough to read.
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except pickle.UnpicklingError as exc:
        detail = unpickling_detail(exc)
        if weights_only and "GLOBAL" in detail:
            raise ValueError(
                f"{what} {path} was refused: it holds Python objects other than tensors and plain values, and "
                f"reading those could run code from the file ({detail}). If you made this file yourself, re-save "
                "its tensors alone (e.g. a state dict)"
            ) from exc
        raise ValueError(f"{what} {path} is corrupt or not a torch file (UnpicklingError: {detail})") from exc
    except Exception as exc:
        raise ValueError(f"{what} {path} is corrupt or not a torch file ({type(exc).__name__}: {exc})") from exc


def unpickling_detail(exc: BaseException) -> str:
    """The useful line of torch's weights-only error: the object it would not build, or the bad opcode."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for key in ("GLOBAL", "Unsupported", "WeightsUnpickler error"):
        for line in lines:
            if key in line:
                # torch goes on to say how to allow-list the object: not advice for a file from someone else.
                return line.split(" Please use", 1)[0].rstrip(".")
    return lines[-1] if lines else type(exc).__name__
