"""Where an offloaded weight trajectory lives (``offload_weights=True`` of the adjoint engines).

At every memory budget but ``min`` the adjoint engines hold the N+1 flat weight vectors w_t, the one part of their
memory that still grows with N at budget 0 (1.22 MB per step for ConvNet-128 at 32x32, float32;
bench/results/MEMORY_BUDGET.md). Offloaded, the forward sweep writes each w_t away as it leaves it and the backward
sweep reads each back once, in reverse order; the engine holds two at a time. Where they go:

* CPU tensors: a temporary file in ``$TMPDIR`` (``tempfile.gettempdir()``), unlinked when created
  (``tempfile.TemporaryFile``), so nothing is left behind however the process ends. Its pages may sit in the
  kernel's page cache while memory is free: that is not the process's memory (RSS), and the kernel drops it under
  pressure. On a tmpfs the file is RAM (and swap), which is why that case warns.
* CUDA tensors: pinned host memory, so the device memory is flat in N. A write is a blocking device-to-host copy
  (one per step, P elements; not yet measured on a GPU), a read an asynchronous copy back on the same stream.

Exact: the bytes read back are the bytes written (a short read or write is an error, never a silent zero).
"""

from __future__ import annotations

import os
import tempfile
import warnings

import torch
from torch import Tensor

__all__ = ["OFFLOAD_WITH_MIN", "OffloadedRows", "filesystem_type"]

OFFLOAD_WITH_MIN = (
    "--offload-weights with --memory-budget min: min already holds only ~2 sqrt(N) weight vectors; choose one"
)

_warned_tmpfs: set[str] = set()


def filesystem_type(path: str, mounts: str = "/proc/mounts") -> str | None:
    """The type of the filesystem holding ``path`` (``ext4``, ``tmpfs``, ...): the longest mount point of ``mounts``
    that contains it. None if unknown (no /proc)."""
    path = os.path.realpath(path)
    best, kind = "", None
    try:
        with open(mounts) as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                inside = path == mount or path.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) > len(best):
                    best, kind = mount, parts[2]
    except OSError:
        return None
    return kind


class OffloadedRows:
    """``n_rows`` vectors of ``numel`` elements of ``dtype`` stored off ``device``: ``write(i, v)``, ``read(i)``.

    Args:
        n_rows: how many vectors (>= 1).
        numel: elements per vector P.
        dtype: their dtype (any; stored as raw bytes).
        device: where ``read`` returns them (and where ``write`` takes them from): CPU tensors go to a temporary
            file, CUDA tensors to pinned host memory.
        directory: the file's folder (CPU; default ``tempfile.gettempdir()``, i.e. ``$TMPDIR`` or /tmp).

    Raises:
        OSError: the file cannot be created (with the folder named).
    """

    def __init__(
        self, n_rows: int, numel: int, dtype: torch.dtype, device: torch.device, directory: str | None = None
    ):
        if int(n_rows) < 1 or int(numel) < 1:
            raise ValueError(f"OffloadedRows needs n_rows >= 1 and numel >= 1, got {n_rows} and {numel}")
        self.n_rows, self.numel, self.dtype = int(n_rows), int(numel), dtype
        self.device = torch.device(device)
        self.row_bytes = self.numel * torch.empty((), dtype=dtype).element_size()
        self.host: Tensor | None = None
        self.file = None
        if self.device.type == "cuda":
            self.host = torch.empty((self.n_rows, self.numel), dtype=dtype, pin_memory=True)
            self.where = "pinned host memory"
            return
        folder = directory or tempfile.gettempdir()
        try:
            self.file = tempfile.TemporaryFile(dir=folder)
        except OSError as exc:
            raise OSError(
                f"cannot create the offloaded weight trajectory's file in {folder}: {exc}; set TMPDIR to a writable "
                "folder on a disk"
            ) from exc
        self.where = f"a temporary file in {folder}"
        if folder not in _warned_tmpfs and filesystem_type(folder) == "tmpfs":
            _warned_tmpfs.add(folder)
            warnings.warn(
                f"{folder} is a tmpfs: the offloaded weight trajectory stays in RAM there; set TMPDIR to a folder on "
                "a disk",
                RuntimeWarning,
                stacklevel=3,
            )

    @property
    def nbytes(self) -> int:
        """Bytes stored off the device when every row is written."""
        return self.n_rows * self.row_bytes

    def _check_row(self, i: int) -> None:
        if not 0 <= i < self.n_rows:
            raise IndexError(f"row {i} out of range [0, {self.n_rows})")

    def write(self, i: int, v: Tensor) -> None:
        """Store ``v`` ([P] or any shape of P elements, ``dtype``) as row ``i``."""
        self._check_row(i)
        if v.numel() != self.numel or v.dtype != self.dtype:
            raise ValueError(f"row {i}: expected {self.numel} {self.dtype} elements, got {v.numel()} {v.dtype}")
        if self.host is not None:
            self.host[i].copy_(v.detach().reshape(-1))
            return
        data = memoryview(v.detach().reshape(-1).contiguous().view(torch.uint8).numpy())
        offset, done = i * self.row_bytes, 0
        try:
            while done < self.row_bytes:
                n = os.pwrite(self.file.fileno(), data[done:], offset + done)
                if n <= 0:
                    raise OSError(f"wrote {done} of {self.row_bytes} bytes")
                done += n
        except OSError as exc:
            raise OSError(
                f"writing the offloaded weight trajectory to {self.where} failed: {exc}; free space there or set "
                "TMPDIR to another folder"
            ) from exc

    def read(self, i: int) -> Tensor:
        """Row ``i`` as a new [P] tensor on ``device`` (the bytes ``write`` stored)."""
        self._check_row(i)
        if self.host is not None:
            return self.host[i].to(self.device, non_blocking=True)
        out = torch.empty(self.numel, dtype=self.dtype)
        buf = memoryview(out.view(torch.uint8).numpy())
        offset, done = i * self.row_bytes, 0
        while done < self.row_bytes:
            n = os.preadv(self.file.fileno(), [buf[done:]], offset + done)
            if n <= 0:
                raise OSError(
                    f"reading row {i} of the offloaded weight trajectory from {self.where}: got {done} of "
                    f"{self.row_bytes} bytes (the row was never written, or the file was truncated)"
                )
            done += n
        return out

    def close(self) -> None:
        """Free the storage (the file is unlinked already: closing it returns its space)."""
        if self.file is not None:
            self.file.close()
            self.file = None
        self.host = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
