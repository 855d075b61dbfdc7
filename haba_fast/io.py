"""Atomic file writes: a temp file in the same folder, fsync, then rename. Nothing is left half-written."""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator, Union

import torch

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is renamed over ``path``, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` that never leaves a partial file at ``path``."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_bytes(data: bytes, path: PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(text: str, path: PathLike) -> None:
    atomic_write_bytes(text.encode("utf-8"), path)


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
        detail = _unpickling_detail(exc)
        if weights_only and "GLOBAL" in detail:
            raise ValueError(
                f"{what} {path} was refused: it holds Python objects other than tensors and plain values, and "
                f"reading those could run code from the file ({detail}). If you made this file yourself, re-save "
                "its tensors alone (e.g. a state dict)"
            ) from exc
        raise ValueError(f"{what} {path} is corrupt or not a torch file (UnpicklingError: {detail})") from exc
    except Exception as exc:
        raise ValueError(f"{what} {path} is corrupt or not a torch file ({type(exc).__name__}: {exc})") from exc


def _unpickling_detail(exc: BaseException) -> str:
    """The useful line of torch's weights-only error: the object it would not build, or the bad opcode."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for key in ("GLOBAL", "Unsupported", "WeightsUnpickler error"):
        for line in lines:
            if key in line:
                # torch goes on to say how to allow-list the object: not advice for a file from someone else.
                return line.split(" Please use", 1)[0].rstrip(".")
    return lines[-1] if lines else type(exc).__name__
