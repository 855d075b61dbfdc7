"""Expert trajectories: training them (``haba-fast buffer``) and reading them back (``load_buffer``).

An expert is a network trained on the real training set with the reference settings (SGD lr 0.01,
no momentum, no weight decay, batch 256, DSA, 50 epochs); its *trajectory* is the list of its flat
parameter vectors at init and after every epoch: ``num_epochs + 1`` snapshots of ``P`` floats.

Two on-disk formats:

* ``"reference"``: the MTT/HaBa layout ``<buffer_path>/<DATASET>[_NO_ZCA]/<model>/replay_buffer_<n>.pt``,
  each file a list of ``save_interval`` trajectories, a trajectory a list of snapshots, a snapshot the
  list of parameter tensors in ``net.parameters()`` order. Unlike the reference, the last file also
  holds a remainder of fewer than ``save_interval`` experts (the reference drops it).
* ``"haba"`` (ours): ``experts.json`` (model, dataset, P, epochs, dtype, parameter shapes, config, the
  list of finished trajectories) and one raw file ``expert_<i>.bin`` per trajectory holding a
  row-major ``[num_epochs + 1, P]`` array (float32, or bfloat16 bits to halve the size). Files are
  memory-mapped, so reading snapshot ``(traj, epoch)`` touches only that row.

Snapshots are copies. The reference takes them with ``p.detach().cpu()``, which on a CPU returns the
live parameter itself, so every snapshot of a CPU-trained expert equals its final weights and
distillation divides by a zero distance; here every snapshot is a copy (``p.detach().to('cpu', copy=True)``; see
``tests/test_experts.py::test_snapshots_are_copies``).

Every file is written atomically (``haba_fast.io``) as its expert finishes, so a killed run loses at
most the expert in progress; rerunning with ``resume=True`` continues from the last finished expert (and
removes the temp files the killed run left). The output folder is probed for writing before any training; a
failed write (disk full) is a ``ValueError`` that leaves every finished expert intact.
Progress lives in ``experts.json`` (haba format) or ``progress.json`` plus one ``pending_expert_<i>.pt``
per finished expert not yet grouped into a replay buffer file (reference format).
Expert ``i`` uses its own generator seeded from ``(cfg.seed, i)``, so a resumed run writes the same
trajectories as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np
import torch
from torch import Tensor, nn

from haba_fast import dist
from haba_fast.devices import resolve_device
from haba_fast.io import (
    atomic_path,
    atomic_torch_save,
    atomic_write_text,
    check_writable,
    remove_temp_files,
    torch_load,
)
from haba_fast.training import DEFAULT_DSA_STRATEGY, EpochStats, train_network

PathLike = Union[str, os.PathLike]

FORMATS = ("haba", "reference")
HEADER_NAME = "experts.json"
PROGRESS_NAME = "progress.json"  # reference format: what this run has written so far
FORMAT_TAG = "haba_fast-experts"
FORMAT_VERSION = 1
_REPLAY_RE = re.compile(r"^replay_buffer_(\d+)\.pt$")

_STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class ExpertConfig:
    """Expert training settings; defaults are the reference ``buffer.py`` ones.

    Attributes:
        model: network name for ``haba_fast.models.get_network`` (reference ``--model``).
        num_experts: trajectories to train (``--num_experts``).
        epochs: training epochs per expert; snapshots = epochs + 1 (``--train_epochs``).
        lr: SGD learning rate (``--lr_teacher``).
        momentum, weight_decay: SGD settings (``--mom``, ``--l2``; reference 0 and 0).
        batch_size: training batch (``--batch_train``).
        dsa, dsa_strategy: DSA augmentation of training batches (``--dsa``, ``--dsa_strategy``).
        decay: lr ×0.1 (new SGD) after epoch ``epochs // 2 + 1``, as the reference ``--decay`` (off by default).
        batch_standardize: HaBa's per-batch standardization (train and test).
        save_interval: experts per ``replay_buffer_<n>.pt`` file in the reference format; in ours (one file per
            expert) the size of the groups of consecutive experts that ``--max_files`` counts as its files
            (``experts.json`` records it; :meth:`MemmapExpertBuffer.file_groups`).
        seed: base seed; expert ``i`` uses a generator seeded from ``(seed, i)``.
        test_every: test accuracy every this many epochs (0: only after the last epoch).
        device: training device (None: CUDA when available, else CPU).
    """

    model: str = "ConvNet"
    num_experts: int = 100
    epochs: int = 50
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 256
    dsa: bool = True
    dsa_strategy: str = DEFAULT_DSA_STRATEGY
    decay: bool = False
    batch_standardize: bool = False
    save_interval: int = 10
    seed: int = 0
    test_every: int = 1
    device: str | None = None

    def validate(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.epochs < 1:
            raise ValueError(f"epochs (--train_epochs) must be >= 1, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr (--lr_teacher) must be a positive number, got {self.lr}")
        # SGD's own check names no flag, comes after the output folder exists, and lets NaN through (NaN experts).
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum (--mom) must be a number in [0, 1), got {self.momentum}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay (--l2) must be a number >= 0, got {self.weight_decay}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size (--batch_train) must be >= 1, got {self.batch_size}")
        if self.save_interval < 1:
            raise ValueError(f"save_interval must be >= 1, got {self.save_interval}")
        if self.test_every < 0:
            raise ValueError(f"test_every must be >= 0, got {self.test_every}")

    def training_signature(self) -> dict[str, Any]:
        """The settings that must agree for a resumed run to continue an existing buffer."""
        d = asdict(self)
        for k in ("num_experts", "device", "test_every", "save_interval"):
            d.pop(k)
        return d


# ----------------------------------------------------------------------------------------------------------------
# Paths


def reference_dataset_name(name: str) -> str:
    """The reference's spelling of a dataset name (``"cifar10"`` -> ``"CIFAR10"``), as ``haba_fast.data`` has it.

    Reference spellings (``"CIFAR10"``, ``"FashionMNIST"``) and unknown names pass through unchanged.
    """
    from haba_fast.data import REFERENCE_NAMES

    key = name.strip().lower().replace("-", "").replace("_", "")
    for ours, ref in REFERENCE_NAMES.items():
        if key in (ours.replace("-", ""), ref.lower()):
            return ref
    return name


def expert_dir(buffer_path: PathLike, dataset: str, model: str, zca: bool = False) -> Path:
    """``<buffer_path>/<DATASET>[_NO_ZCA]/<model>`` exactly as the reference builds it.

    ``_NO_ZCA`` is appended only for CIFAR10/CIFAR100 without ZCA, as in the reference.
    """
    name = reference_dataset_name(dataset)
    if name in ("CIFAR10", "CIFAR100") and not zca:
        name += "_NO_ZCA"
    return Path(buffer_path) / name / model


# ----------------------------------------------------------------------------------------------------------------
# Reading


class ExpertBuffer:
    """A set of expert trajectories: ``num_trajectories`` × ``(num_epochs + 1)`` snapshots of ``num_params`` floats.

    Use :func:`load_buffer` to open one. Snapshots come back as float32 ``[P]`` CPU tensors (new memory).
    """

    path: Path
    num_trajectories: int
    num_epochs: int
    num_params: int
    param_shapes: list[tuple[int, ...]] | None = None
    model: str | None = None
    dataset: str | None = None
    format: str = ""

    def _read(self, traj: int, epoch: int) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __len__(self) -> int:
        return self.num_trajectories

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(path={str(self.path)!r}, trajectories={self.num_trajectories}, "
            f"epochs={self.num_epochs}, params={self.num_params})"
        )

    def _check_index(self, traj: int, epoch: int) -> None:
        if not 0 <= traj < self.num_trajectories:
            raise ValueError(f"trajectory {traj} out of range: {self.path} holds {self.num_trajectories}")
        if not 0 <= epoch <= self.num_epochs:
            raise ValueError(f"epoch {epoch} out of range: {self.path} has snapshots for epochs 0..{self.num_epochs}")

    def snapshot(self, traj: int, epoch: int) -> Tensor:
        """Flat parameters of trajectory ``traj`` after ``epoch`` epochs (0 = init): float32 ``[P]``."""
        traj, epoch = int(traj), int(epoch)
        self._check_index(traj, epoch)
        w = self._read(traj, epoch)
        if not bool(torch.isfinite(w).all()):  # a diverged expert would make every matching loss NaN
            raise ValueError(f"expert buffer {self.path}: trajectory {traj} snapshot {epoch} contains NaN or Inf (a "
                             "diverged or damaged expert; retrain it or remove it from the buffer)")
        return w

    def trajectory(self, traj: int) -> Tensor:
        """All snapshots of one trajectory: float32 ``[num_epochs + 1, P]``."""
        return torch.stack([self.snapshot(traj, e) for e in range(self.num_epochs + 1)])

    def file_groups(self) -> list[list[int]]:
        """The trajectories of every buffer file, in file order: what ``--max_files`` / ``--max_experts`` count.

        One group holds everything unless a subclass knows its files.
        """
        return [list(range(self.num_trajectories))]

    def check_max_start(self, max_start_epoch: int, expert_epochs: int) -> None:
        """Raise a clear ValueError when trajectories are too short for these matching settings."""
        if max_start_epoch < 1:
            raise ValueError(f"max_start_epoch must be >= 1, got {max_start_epoch}")
        if expert_epochs < 1:
            raise ValueError(f"expert_epochs must be >= 1, got {expert_epochs}")
        need = max_start_epoch - 1 + expert_epochs
        if need > self.num_epochs:
            raise ValueError(
                f"expert buffer {self.path} is too short: its trajectories have {self.num_epochs} epochs, but "
                f"max_start_epoch={max_start_epoch} and expert_epochs={expert_epochs} need {need}; train experts "
                f"with --train_epochs >= {need} or lower --max_start_epoch/--expert_epochs"
            )

    def sample_pair(
        self, generator: torch.Generator | None, max_start_epoch: int, expert_epochs: int
    ) -> tuple[Tensor, Tensor, dict[str, int]]:
        """Draw a matching target as the reference does.

        A trajectory uniformly, a start epoch ``s`` uniform in ``[0, max_start_epoch)``; returns
        ``(w_start [P], w_target [P], {"trajectory", "start_epoch", "target_epoch"})`` with
        ``w_target`` the snapshot at ``s + expert_epochs``.
        """
        self.check_max_start(max_start_epoch, expert_epochs)
        traj = int(torch.randint(self.num_trajectories, (1,), generator=generator).item())
        start = int(torch.randint(max_start_epoch, (1,), generator=generator).item())
        target = start + expert_epochs
        meta = {"trajectory": traj, "start_epoch": start, "target_epoch": target}
        return self.snapshot(traj, start), self.snapshot(traj, target), meta

    def check_model(self, net: nn.Module) -> None:
        """Raise ValueError when ``net``'s parameter count/shapes do not match this buffer's."""
        shapes = [tuple(p.shape) for p in net.parameters()]
        p = sum(math.prod(s) for s in shapes)
        if p != self.num_params:
            raise ValueError(
                f"expert buffer {self.path} has {self.num_params} parameters per snapshot but the model has {p}: "
                "it was trained for another model/dataset (check --model, --dataset, channels and image size)"
            )
        if self.param_shapes is not None and [tuple(s) for s in self.param_shapes] != shapes:
            raise ValueError(
                f"expert buffer {self.path}: parameter shapes {self.param_shapes} differ from the model's {shapes}"
            )


class MemmapExpertBuffer(ExpertBuffer):
    """Our format: ``experts.json`` + one memory-mapped ``[num_epochs + 1, P]`` raw file per trajectory."""

    format = "haba"

    def __init__(self, header_path: PathLike):
        self.path = Path(header_path)
        header = _read_header(self.path)
        self.header = header
        try:
            self.num_params = int(header["num_params"])
            self.num_epochs = int(header["num_epochs"])
            self.storage_dtype = _STORAGE_DTYPES[header["dtype"]]
            files = [t["file"] for t in header["trajectories"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"expert buffer header {self.path} is missing or has a bad field: {exc}") from exc
        if self.num_params < 1 or self.num_epochs < 1:
            raise ValueError(f"expert buffer header {self.path}: num_params ({self.num_params}) and num_epochs "
                             f"({self.num_epochs}) must be >= 1")
        if len(set(map(str, files))) != len(files):
            raise ValueError(f"expert buffer header {self.path} lists a trajectory file twice: the header is corrupt")
        for f in files:
            # The header names files beside it; anything else (a path, '..') would read outside the buffer.
            if not isinstance(f, str) or not f or Path(f).name != f or f in (".", ".."):
                raise ValueError(f"expert buffer header {self.path}: trajectory file {f!r} is not a plain file name "
                                 "in the buffer's directory")
        try:
            shapes = header.get("param_shapes")
            self.param_shapes = [tuple(int(d) for d in s) for s in shapes] if shapes else None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"expert buffer header {self.path}: bad param_shapes {shapes!r} ({exc})") from exc
        if self.param_shapes is not None and sum(math.prod(s) for s in self.param_shapes) != self.num_params:
            raise ValueError(f"expert buffer header {self.path}: param_shapes hold "
                             f"{sum(math.prod(s) for s in self.param_shapes)} parameters, num_params says "
                             f"{self.num_params}")
        self.model = header.get("model")
        self.dataset = header.get("dataset")
        if not files:
            raise ValueError(f"expert buffer {self.path} holds no finished trajectory yet (run `haba-fast buffer`)")
        self._np_dtype = np.float32 if self.storage_dtype == torch.float32 else np.int16
        self._files = [self.path.parent / f for f in files]
        itemsize = np.dtype(self._np_dtype).itemsize
        expected = (self.num_epochs + 1) * self.num_params * itemsize
        for f in self._files:
            if not f.exists():
                raise FileNotFoundError(f"expert trajectory {f} listed in {self.path} is missing")
            size = f.stat().st_size
            if size != expected:
                raise ValueError(
                    f"expert trajectory {f} is truncated or corrupt: {size} bytes, expected {expected} "
                    f"({self.num_epochs + 1} snapshots × {self.num_params} {header['dtype']}); retrain it "
                    "(delete it and its entry, then rerun `haba-fast buffer`)"
                )
        self.num_trajectories = len(self._files)
        self._maps: dict[int, np.memmap] = {}

    def file_groups(self) -> list[list[int]]:
        """Trajectories in runs of the buffer's ``save_interval`` (default 10): the ``replay_buffer_<n>.pt`` files
        the reference format would hold, so ``--max_files`` means the same for both formats."""
        config = self.header.get("config") or {}
        size = max(1, int(config.get("save_interval", 10)))
        return [list(range(i, min(i + size, self.num_trajectories))) for i in range(0, self.num_trajectories, size)]

    def _map(self, traj: int) -> np.memmap:
        m = self._maps.get(traj)
        if m is None:
            m = np.memmap(
                self._files[traj], dtype=self._np_dtype, mode="r", shape=(self.num_epochs + 1, self.num_params)
            )
            self._maps[traj] = m
        return m

    def _read(self, traj: int, epoch: int) -> Tensor:
        row = torch.from_numpy(np.array(self._map(traj)[epoch]))  # copies just this row out of the map
        if self.storage_dtype == torch.bfloat16:
            row = row.view(torch.bfloat16)
        return row.float()


class ReferenceExpertBuffer(ExpertBuffer):
    """The reference layout: ``replay_buffer_<n>.pt`` files (n = 0, 1, ... as the reference reads them)."""

    format = "reference"

    def __init__(self, files: Sequence[PathLike]):
        self._files = [Path(f) for f in files]
        self.path = self._files[0].parent if len(self._files) > 1 else self._files[0]
        self._index: list[tuple[int, int]] = []  # global trajectory -> (file, position)
        self._cache: dict[int, list] = {}
        shapes = None
        num_epochs = None
        for fi, f in enumerate(self._files):
            trajs = self._load(fi)
            for ti, traj in enumerate(trajs):
                if not isinstance(traj, (list, tuple)) or len(traj) < 2:
                    raise ValueError(f"expert buffer {f}: trajectory {ti} is not a list of >= 2 snapshots")
                for si, snap in enumerate(traj):
                    if not isinstance(snap, (list, tuple)) or not all(isinstance(p, Tensor) for p in snap):
                        raise ValueError(f"expert buffer {f}: trajectory {ti} snapshot {si} is not a list of tensors")
                    if not all(p.is_floating_point() for p in snap):
                        raise ValueError(f"expert buffer {f}: trajectory {ti} snapshot {si} holds non-floating "
                                         f"tensors ({sorted({str(p.dtype) for p in snap})}); expected network weights")
                    snap_shapes = [tuple(p.shape) for p in snap]
                    if shapes is None:
                        shapes = snap_shapes
                    elif snap_shapes != shapes:
                        raise ValueError(
                            f"expert buffer {f}: trajectory {ti} snapshot {si} has parameter shapes that differ "
                            "from the first snapshot's (a mix of models?)"
                        )
                if num_epochs is None:
                    num_epochs = len(traj) - 1
                elif len(traj) - 1 != num_epochs:
                    raise ValueError(
                        f"expert buffer {f}: trajectory {ti} has {len(traj) - 1} epochs, others {num_epochs}"
                    )
                self._index.append((fi, ti))
        if not self._index:
            raise ValueError(f"expert buffer {self.path} holds no trajectories")
        self.param_shapes = shapes
        self.num_params = sum(math.prod(s) for s in shapes)
        self.num_epochs = num_epochs
        self.num_trajectories = len(self._index)

    def file_groups(self) -> list[list[int]]:
        """The trajectories of every ``replay_buffer_<n>.pt`` file, in file order."""
        groups: list[list[int]] = [[] for _ in self._files]
        for traj, (fi, _) in enumerate(self._index):
            groups[fi].append(traj)
        return [g for g in groups if g]

    def _load(self, fi: int) -> list:
        if fi in self._cache:
            return self._cache[fi]
        f = self._files[fi]
        # weights_only (torch_load's default): a replay buffer is someone else's pickle. mmap: a replay buffer of
        # CIFAR experts is ~0.6 GB; only the snapshots read are paged in.
        obj = torch_load(f, what="expert buffer", mmap=True)
        if not isinstance(obj, (list, tuple)):
            raise ValueError(  # noqa: TRY004 - bad file content, not a bad argument
                f"expert buffer {f} is not a reference replay buffer (a list of trajectories), got {type(obj).__name__}"
            )
        self._cache = {fi: obj}
        return obj

    def _read(self, traj: int, epoch: int) -> Tensor:
        fi, ti = self._index[traj]
        snap = self._load(fi)[ti][epoch]
        return torch.cat([p.detach().reshape(-1).float() for p in snap])


class TrajectorySampler:
    """Which expert trajectory each distillation iteration matches, as the reference's distill scripts pick it.

    * ``load_all=True`` (``--load_all``): any trajectory of the buffer, uniformly, with replacement.
    * ``load_all=False`` (the reference's default): the buffer files in a random order, of which only the first
      ``max_files`` are ever used; a file's first ``max_experts`` trajectories in a random order, one per
      iteration; then the next file; after the last one, the same files in a new random order.

    Randomness comes from ``generator`` only, drawn lazily (constructing a sampler draws nothing).

    Args:
        buffer: an :class:`ExpertBuffer` (or anything with ``num_trajectories``; ``file_groups()`` when it has files).
        load_all, max_files, max_experts: the reference's flags (``max_*`` need ``load_all=False``; None: all).
        generator: CPU ``torch.Generator``.
    """

    def __init__(
        self,
        buffer,
        *,
        load_all: bool = False,
        max_files: int | None = None,
        max_experts: int | None = None,
        generator: torch.Generator | None = None,
    ):
        for name, v in (("max_files", max_files), ("max_experts", max_experts)):
            if v is not None and (isinstance(v, bool) or int(v) < 1):
                raise ValueError(f"{name} must be an int >= 1 or None, got {v!r}")
        if load_all and (max_files is not None or max_experts is not None):
            raise ValueError("max_files/max_experts choose experts file by file, which load_all does not do")
        groups = buffer.file_groups() if callable(getattr(buffer, "file_groups", None)) else None
        self.groups = groups if groups else [list(range(int(buffer.num_trajectories)))]
        if not any(self.groups):
            raise ValueError("the expert buffer holds no trajectories")
        self.num_trajectories = sum(len(g) for g in self.groups)
        self.load_all = bool(load_all)
        self.max_files = max_files
        self.max_experts = max_experts
        self.generator = generator
        self._files: list[int] = []  # the files in use, in the current random order
        self._file_pos = 0
        self._order: list[int] = []  # the current file's trajectories, in the order they are used
        self._pos = 0

    def _perm(self, n: int) -> list[int]:
        return torch.randperm(n, generator=self.generator).tolist()

    def _open(self, f: int) -> None:
        trajs = self.groups[f][: self.max_experts]
        self._order = [trajs[i] for i in self._perm(len(trajs))]
        self._pos = 0

    def pool(self) -> list[int]:
        """Every trajectory that can ever be drawn (sorted); draws the file choice if not made yet."""
        if self.load_all:
            return sorted(t for g in self.groups for t in g)
        if not self._files:
            self._start()
        return sorted(t for f in self._files for t in self.groups[f][: self.max_experts])

    def _start(self) -> None:
        self._files = self._perm(len(self.groups))[: self.max_files]
        self._file_pos = 0
        self._open(self._files[0])

    def next(self) -> int:
        """The trajectory index of the next iteration."""
        if self.load_all:
            return int(torch.randint(self.num_trajectories, (1,), generator=self.generator))
        if not self._files:
            self._start()
        traj = self._order[self._pos]
        self._pos += 1
        if self._pos == len(self._order):
            self._file_pos += 1
            if self._file_pos == len(self._files):
                self._file_pos = 0
                self._files = [self._files[i] for i in self._perm(len(self._files))]
            if self.max_files == 1:  # the reference keeps the loaded list and reshuffles it (same draws here)
                self._order = [self._order[i] for i in self._perm(len(self._order))]
                self._pos = 0
            else:
                self._open(self._files[self._file_pos])
        return traj

    def state_dict(self) -> dict[str, Any]:
        """Where the walk is (the generator's state is the caller's)."""
        return {
            "files": list(self._files),
            "file_pos": self._file_pos,
            "order": list(self._order),
            "pos": self._pos,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._files = [int(f) for f in state["files"]]
        self._file_pos = int(state["file_pos"])
        self._order = [int(t) for t in state["order"]]
        self._pos = int(state["pos"])
        if any(not 0 <= f < len(self.groups) for f in self._files) or any(
            not 0 <= t < self.num_trajectories for t in self._order
        ):
            raise ValueError("the trajectory sampler state does not fit this expert buffer (another buffer?)")


def _read_header(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"expert buffer header {path} not found")
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"expert buffer header {path} is corrupt (not JSON: {exc})") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT_TAG:
        raise ValueError(f"{path} is not a haba_fast expert buffer header (format tag {FORMAT_TAG!r} missing)")
    version = header.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"expert buffer header {path}: version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"expert buffer {path} has format version {version}; upgrade haba_fast")
    if not isinstance(header.get("config", {}), dict):
        raise ValueError(f"expert buffer header {path}: config must be an object, got {header['config']!r}")
    return header


def _replay_files(directory: Path) -> list[Path]:
    """``replay_buffer_0.pt``, ``replay_buffer_1.pt``, ... consecutive from 0, as the reference loads them."""
    numbers = sorted(int(m.group(1)) for m in (_REPLAY_RE.match(p.name) for p in directory.iterdir()) if m)
    files = []
    for expected, n in enumerate(numbers):
        if n != expected:
            break  # the reference stops at the first gap
        files.append(directory / f"replay_buffer_{n}.pt")
    return files


def load_experts(path: PathLike, num_experts: int) -> ExpertBuffer:
    """:func:`load_buffer` for a caller that trained ``num_experts`` experts into ``path`` and reports that count.

    Raises:
        ValueError: the folder holds another number of experts (a run that asked for more left them there, and
            every expert of a buffer is sampled), naming both counts.
    """
    buffer = load_buffer(path)
    if int(buffer.num_trajectories) != int(num_experts):
        raise ValueError(
            f"{path} holds {buffer.num_trajectories} experts, this run asks for {num_experts}: every expert there "
            f"would be sampled. Ask for {buffer.num_trajectories} or use another folder"
        )
    return buffer


def load_buffer(path: PathLike) -> ExpertBuffer:
    """Open an expert buffer in either format.

    Args:
        path: a directory holding our ``experts.json`` or the reference's ``replay_buffer_<n>.pt`` files;
            our ``experts.json`` itself; or a single reference ``replay_buffer_<n>.pt``.
    Returns:
        An :class:`ExpertBuffer`.
    Raises:
        FileNotFoundError: nothing readable at ``path``.
        ValueError: a corrupt, truncated or inconsistent buffer (the message names the file).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"expert buffer not found: {path} (train experts with `haba-fast buffer --buffer_path ...`; the "
            "directory is <buffer_path>/<DATASET>[_NO_ZCA]/<model>)"
        )
    if path.is_dir():
        if (path / HEADER_NAME).exists():
            return MemmapExpertBuffer(path / HEADER_NAME)
        files = _replay_files(path)
        if files:
            return ReferenceExpertBuffer(files)
        raise FileNotFoundError(
            f"no expert buffer in {path}: expected {HEADER_NAME} (haba format) or replay_buffer_0.pt, ... "
            "(reference format); train experts with `haba-fast buffer`"
        )
    if path.suffix == ".json":
        return MemmapExpertBuffer(path)
    return ReferenceExpertBuffer([path])


# ----------------------------------------------------------------------------------------------------------------
# Writing


def snapshot_params(net: nn.Module) -> list[Tensor]:
    """Copies of ``net``'s parameters on the CPU, in ``parameters()`` order.

    ``.clone()`` matters: on a CPU ``p.detach().cpu()`` is ``p`` itself, and later SGD steps would
    rewrite the "snapshot" (the reference's aliasing bug).
    """
    return [p.detach().to("cpu", copy=True) for p in net.parameters()]


def _flat(snap: Sequence[Tensor]) -> Tensor:
    return torch.cat([p.reshape(-1).float() for p in snap])


def _haba_name(index: int) -> str:
    return f"expert_{index:05d}.bin"


def _pending_name(index: int) -> str:
    return f"pending_expert_{index:05d}.pt"


class _HabaWriter:
    def __init__(self, out_dir: Path, header: dict[str, Any]):
        self.out_dir = out_dir
        self.header = header

    @property
    def completed(self) -> int:
        return len(self.header["trajectories"])

    def add(self, index: int, snaps: list[list[Tensor]], info: dict[str, Any]) -> None:
        self.stage(index, snaps)
        self.commit(index, info, snaps)

    def stage(self, index: int, snaps: list[list[Tensor]]) -> None:
        """Write expert ``index``'s own file (by the process that trained it)."""
        flat = torch.stack([_flat(s) for s in snaps])  # [E+1, P] float32
        if self.header["dtype"] == "bfloat16":
            array = flat.to(torch.bfloat16).view(torch.int16).numpy()
        else:
            array = flat.numpy()
        with atomic_path(self.out_dir / _haba_name(index)) as tmp:
            np.ascontiguousarray(array).tofile(tmp)

    def commit(self, index: int, info: dict[str, Any], snaps: list[list[Tensor]] | None = None) -> None:
        """Record a staged expert as finished (rank 0, in index order)."""
        name = _haba_name(index)
        header = dict(self.header, trajectories=[*self.header["trajectories"], {"file": name, **info}])
        # The header lists a trajectory only after its file is complete: a crash in between leaves an
        # unlisted .bin that the next run overwrites. In memory too: a failed header write changes nothing.
        atomic_write_text(json.dumps(header, indent=1), self.out_dir / HEADER_NAME)
        self.header = header

    def finish(self) -> None:
        pass


class _ReferenceWriter:
    """Groups finished experts into ``replay_buffer_<n>.pt`` files of ``save_interval`` trajectories.

    Until its group is complete, each finished expert waits in its own ``pending_expert_<i>.pt`` (one write per
    expert). ``progress.json`` is rewritten after every step and is always consistent with the files: a crash at
    any point loses at most the expert in training.
    """

    def __init__(self, out_dir: Path, progress: dict[str, Any], save_interval: int):
        self.out_dir = out_dir
        self.progress = progress
        self.save_interval = save_interval
        self.pending: list = []
        for name in progress["pending"]:
            path = out_dir / name
            try:
                traj = torch_load(path, what="finished expert")
            except (FileNotFoundError, ValueError) as exc:  # any unreadable file means the same thing here
                raise ValueError(
                    f"expert progress {out_dir / PROGRESS_NAME} lists the finished expert {path}, which is missing, "
                    f"corrupt or unsafe ({exc}); delete {PROGRESS_NAME} to start over"
                ) from exc
            self.pending.append(traj)
        flushing = progress.get("flushing")
        if flushing and (out_dir / flushing).exists():
            self._flushed(flushing)  # the last run wrote this file but died before recording it

    @property
    def completed(self) -> int:
        return self.progress["completed"]

    @property
    def index_offset(self) -> int:
        """Seed index of this run's expert 0: the trajectories found beside it when it started (appending)."""
        return int(self.progress.get("index_offset", 0))

    def _save_progress(self) -> None:
        atomic_write_text(json.dumps(self.progress, indent=1), self.out_dir / PROGRESS_NAME)

    def _flush(self) -> None:
        n = 0
        while (self.out_dir / f"replay_buffer_{n}.pt").exists():
            n += 1  # the reference's naming: the first free number (so runs append)
        name = f"replay_buffer_{n}.pt"
        # Record the file about to be written, so that a crash between writing it and the progress update does
        # not make the next run write the same experts again (see __init__).
        self.progress["flushing"] = name
        self._save_progress()
        atomic_torch_save(self.pending, self.out_dir / name)
        self._flushed(name)

    def _flushed(self, name: str) -> None:
        self.progress["files"].append(name)
        old = self.progress["pending"]
        self.progress["pending"] = []
        self.progress["flushing"] = None
        self.pending = []
        self._save_progress()
        for f in old:
            (self.out_dir / f).unlink(missing_ok=True)

    def add(self, index: int, snaps: list[list[Tensor]], info: dict[str, Any]) -> None:
        self.stage(index, snaps)
        self.commit(index, info, snaps)

    def stage(self, index: int, snaps: list[list[Tensor]]) -> None:
        """Write expert ``index``'s pending file (by the process that trained it)."""
        atomic_torch_save(snaps, self.out_dir / _pending_name(index))

    def commit(self, index: int, info: dict[str, Any], snaps: list[list[Tensor]] | None = None) -> None:
        """Record a staged expert as finished (rank 0, in index order); reads its pending file when another process
        trained it, and writes a ``replay_buffer_<n>.pt`` when ``save_interval`` experts wait."""
        name = _pending_name(index)
        if snaps is None:
            snaps = torch_load(self.out_dir / name, what="finished expert")
        self.pending.append(snaps)
        self.progress["pending"].append(name)
        self.progress["completed"] += 1
        self.progress["experts"].append(info)
        self._save_progress()
        if len(self.pending) >= self.save_interval:
            self._flush()

    def finish(self) -> None:
        if self.pending:  # the reference drops a remainder < save_interval; we keep it
            self._flush()


def _signature_mismatch(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _zca_input(dataset) -> dict[str, Any]:
    """``{"zca_input": "normalized"}`` when the dataset was mean/std-normalized before its ZCA (MNIST and
    Fashion-MNIST, as the reference; since 2026-12-03), else nothing: the header of every other buffer is unchanged."""
    from haba_fast.data import zca_of_normalized

    return {"zca_input": "normalized"} if zca_of_normalized(dataset) else {}


def _content_mismatch(stored: dict[str, Any], content: dict[str, Any]) -> list[str]:
    """The training data differ from the ones the stored experts were trained on (folders written before the
    content was recorded have none to compare)."""
    stored_content = stored.get("train_content")
    if stored_content is None or stored_content == content:
        return []
    return [f"training images or labels: {stored_content.get('num_train')} images of other content -> "
            f"{content.get('num_train')} of this dataset (another subset, split, data path or ZCA fit)"]


def _open_writer(out_dir: Path, fmt: str, cfg: ExpertConfig, meta: dict[str, Any], storage: str, resume: bool,
                 content: dict[str, Any]):
    """Open (create, or check and continue) the buffer's progress record; ``content``: the training data's
    :func:`haba_fast.checkpoint.train_content`, recorded and compared on resume like ``meta``."""
    signature = cfg.training_signature()
    if fmt == "haba":
        header_path = out_dir / HEADER_NAME
        if header_path.exists():
            if not resume:
                raise ValueError(
                    f"{header_path} already exists; pass resume=True (CLI: drop --no-resume) to continue it, or "
                    "choose another output directory"
                )
            header = _read_header(header_path)
            mismatch = _signature_mismatch(header.get("config_signature", {}), signature)
            mismatch += [f"{k}: {header.get(k)!r} -> {v!r}" for k, v in meta.items() if header.get(k) != v]
            if header.get("dtype") != storage:
                mismatch.append(f"dtype: {header.get('dtype')!r} -> {storage!r}")
            mismatch += _content_mismatch(header, content)
            if mismatch:
                raise ValueError(
                    f"cannot resume {header_path}: it was trained with other settings ({'; '.join(mismatch)}); "
                    "use another output directory"
                )
            stored = (header.get("config") or {}).get("save_interval", 10)
            if stored != cfg.save_interval:  # the header keeps its own: another value would be ignored
                raise ValueError(
                    f"cannot resume {header_path} with save_interval {cfg.save_interval}: its experts are grouped in "
                    f"runs of {stored} (what --max_files counts as files), recorded when it was created; pass "
                    f"--save_interval {stored} or use another output directory"
                )
            for t in header["trajectories"]:
                if not (out_dir / t["file"]).exists():
                    raise ValueError(f"cannot resume {header_path}: listed trajectory {t['file']} is missing")
        else:
            header = {
                "format": FORMAT_TAG,
                "version": FORMAT_VERSION,
                **meta,
                "dtype": storage,
                "config": asdict(cfg),
                "config_signature": signature,
                "train_content": content,
                "trajectories": [],
            }
        return _HabaWriter(out_dir, header)
    progress_path = out_dir / PROGRESS_NAME
    progress = None
    if resume and progress_path.exists():
        try:
            progress = json.loads(progress_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(
                f"expert progress file {progress_path} is corrupt ({exc}); delete it to start over"
            ) from exc
        mismatch = _signature_mismatch(progress.get("config_signature", {}), signature)
        mismatch += [f"{k}: {progress.get(k)!r} -> {v!r}" for k, v in meta.items() if progress.get(k) != v]
        mismatch += _content_mismatch(progress, content)
        if mismatch:
            raise ValueError(
                f"cannot resume {progress_path}: it was written with other settings ({'; '.join(mismatch)}); "
                "use another directory (or delete it: its replay_buffer files stay and new experts are appended, "
                "as the reference's buffer.py appends)"
            )
    if progress is None:
        # Files no progress record covers (a run of the reference's buffer.py, or ours after its progress file
        # was deleted): the reference appends new experts beside them on every run. Ours are seeded from
        # (seed, index), so the new ones take the indices after the trajectories found: none repeats one of ours.
        earlier = _replay_files(out_dir) if out_dir.is_dir() else []
        offset = ReferenceExpertBuffer(earlier).num_trajectories if earlier else 0
        progress = {
            "format": "reference-progress",
            "index_offset": offset,
            **meta,
            "config": asdict(cfg),
            "config_signature": signature,
            "train_content": content,
            "completed": 0,
            "pending": [],
            "flushing": None,
            "files": [],
            "experts": [],
        }
    return _ReferenceWriter(out_dir, progress, cfg.save_interval)


def expert_generator(seed: int, index: int) -> torch.Generator:
    """The generator of expert ``index``: independent of how many experts ran before (resume-safe)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index)) % (2**63 - 1))


def train_experts(
    dataset,
    cfg: ExpertConfig,
    out_dir: PathLike,
    *,
    fmt: str = "haba",
    dtype: torch.dtype = torch.float32,
    resume: bool = True,
    progress: bool = True,
    callback: Callable[[int, int, EpochStats], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Train ``cfg.num_experts`` experts on ``dataset`` and write their trajectories to ``out_dir``.

    Args:
        dataset: a ``haba_fast.data.Dataset`` (train images ``[N, C, H, W]`` float32, labels ``[N]`` int64;
            test split used for the per-epoch test accuracy).
        cfg: :class:`ExpertConfig`.
        out_dir: the directory written (for the reference layout pass ``expert_dir(buffer_path, ...)``).
        fmt: ``"haba"`` (memory-mapped, see module doc) or ``"reference"`` (``replay_buffer_<n>.pt``).
        dtype: storage dtype of the haba format: ``torch.float32`` or ``torch.bfloat16`` (the reference
            format always stores float32 tensors).
        resume: continue a run found in ``out_dir`` from its last finished expert (settings must agree;
            ``num_experts`` may grow).
        progress: tqdm bars (experts, and epochs with loss / test accuracy).
        callback: ``callback(expert_index, epoch, stats)`` after every epoch (logging; raising stops the run
            and leaves every finished expert on disk).
        log: where a note goes when the folder already holds ``num_experts`` experts (nothing is trained).

    Returns:
        ``out_dir`` as a Path (open it with :func:`load_buffer`).
    """
    from haba_fast.models import get_network

    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"buffer storage dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    if fmt == "reference" and dtype != torch.float32:
        raise ValueError("the reference buffer format stores float32; use fmt='haba' for bfloat16 storage")
    cfg.validate()
    if getattr(dataset, "test_images", None) is not None:  # the experts' test accuracy: before the folder is made
        from haba_fast.data import check_test_images

        check_test_images(dataset)
    out_dir = Path(out_dir)
    # Rank 0 alone probes the folder (read-only or full: a clear error before any training) and removes what a
    # killed run was writing (its expert is retrained). Another rank's probe would be one of those temp files, so
    # the ranks do not probe side by side; every rank learns the outcome, and none writes before the removal.
    def prepare_folder() -> None:
        check_writable(out_dir, what="expert output folder")
        remove_temp_files(out_dir, recursive=False)

    dist.run_on_main(prepare_folder)
    device = resolve_device(cfg.device or None)
    storage = "bfloat16" if dtype == torch.bfloat16 else "float32"

    channels, num_classes = int(dataset.channels), int(dataset.num_classes)
    im_size = tuple(int(s) for s in dataset.im_size)
    probe = get_network(cfg.model, channels, num_classes, im_size, generator=torch.Generator().manual_seed(0))
    shapes = [list(p.shape) for p in probe.parameters()]
    meta = {
        "model": cfg.model,
        "dataset": getattr(dataset, "name", None),
        "zca": getattr(dataset, "zca", None) is not None,
        **_zca_input(dataset),
        "channels": channels,
        "num_classes": num_classes,
        "im_size": list(im_size),
        "num_params": sum(math.prod(s) for s in shapes),
        "num_epochs": cfg.epochs,
        "param_shapes": shapes,
    }
    del probe
    from haba_fast.checkpoint import train_content

    content = train_content(dataset)
    # Rank 0 opens (creates or checks) the progress file; every rank learns where to start, or rank 0's error.
    writer = None

    def open_writer() -> tuple[int, int]:
        nonlocal writer
        writer = _open_writer(out_dir, fmt, cfg, meta, storage, resume, content)
        return writer.completed, getattr(writer, "index_offset", 0)

    start, offset = (int(v) for v in dist.run_on_main(open_writer, (ValueError, FileNotFoundError)))
    if offset and start < cfg.num_experts and log is not None:
        log(f"appending to {out_dir}: {offset} experts found there; the new ones are seeded from index {offset} on")
    if start >= cfg.num_experts and log is not None:
        log(f"nothing to train: {out_dir} already holds {offset + start} experts ("
            + (f"this run's {cfg.num_experts} appended after the {offset} found)" if offset else
               f"num_experts {cfg.num_experts} is the total here, where the reference's buffer.py adds that many on "
               "every run: raise it to add more)"))
    if writer is None:  # another rank: it only stages its experts' own files
        writer = _StagingWriter(out_dir, fmt, storage)

    train = (dataset.train_images, dataset.train_labels)
    test = (dataset.test_images, dataset.test_labels) if getattr(dataset, "test_images", None) is not None else None
    outer = None
    if progress and start < cfg.num_experts and dist.is_main():
        from tqdm.auto import tqdm

        outer = tqdm(total=cfg.num_experts, initial=start, desc="experts", dynamic_ncols=True)
    k, rank = dist.world_size(), dist.rank()
    try:
        # Rounds of K consecutive experts: expert i is trained by rank i mod K (one per rank per round), staged in
        # its own file by that rank, and recorded by rank 0 in index order, as one process records them.
        for first in range(start, cfg.num_experts, k):
            i = first + (rank - first) % k
            mine = None
            if i < cfg.num_experts:
                info, snaps = _train_one(i, offset + i, cfg, train, test, channels, num_classes, im_size, device,
                                         progress and dist.is_main(), callback)
                try:
                    writer.stage(i, snaps)
                except OSError as exc:
                    raise _write_error(i, out_dir, writer, exc) from exc
                mine = (i, info, snaps if dist.is_main() else None)
            finished = dist.gather_objects(None if mine is None else (mine[0], mine[1]))
            if finished is None:
                continue
            for j, info in sorted(f for f in finished if f is not None):
                try:
                    writer.commit(j, info, mine[2] if mine is not None and j == mine[0] else None)
                except OSError as exc:
                    raise _write_error(j, out_dir, writer, exc) from exc
                if outer is not None:
                    outer.set_postfix(
                        {"loss": f"{info['train_loss']:.4f}"}
                        | ({"test_acc": f"{info['test_accuracy']:.3f}"} if info["test_accuracy"] is not None else {})
                    )
                    outer.update(1)
        if dist.is_main():
            try:
                writer.finish()
            except OSError as exc:
                raise ValueError(
                    f"could not write the last replay buffer file in {out_dir}: {exc.strerror or exc}; the finished "
                    "experts are intact: free space and rerun to continue"
                ) from exc
    finally:
        if outer is not None:
            outer.close()
    dist.barrier()  # every file is complete when any rank returns
    return out_dir


def _write_error(index: int, out_dir: Path, writer, exc: OSError) -> ValueError:
    return ValueError(
        f"could not write expert {index} in {out_dir}: {exc.strerror or exc}; the {writer.completed} "
        "finished expert(s) are intact: free space and rerun to continue"
    )


class _StagingWriter:
    """A rank other than 0: writes its experts' own files only (rank 0 records them)."""

    def __init__(self, out_dir: Path, fmt: str, storage: str):
        self.out_dir = out_dir
        self.fmt = fmt
        self.header = {"dtype": storage}
        self.completed = 0

    def stage(self, index: int, snaps: list[list[Tensor]]) -> None:
        if self.fmt == "haba":
            _HabaWriter.stage(self, index, snaps)
        else:
            atomic_torch_save(snaps, self.out_dir / _pending_name(index))


def _train_one(index, seed_index, cfg, train, test, channels, num_classes, im_size, device, progress, callback):
    """Train expert ``index`` of this run from the generator of ``seed_index`` (``index`` plus the experts an
    appended folder held): ``(info, snapshots)``."""
    from haba_fast.models import get_network

    g = expert_generator(cfg.seed, seed_index)
    net = get_network(cfg.model, channels, num_classes, im_size, generator=g, device=device)
    snaps = [snapshot_params(net)]

    def on_epoch(ep: int, net_: nn.Module, stats: EpochStats) -> None:
        snaps.append(snapshot_params(net_))
        if callback is not None:
            callback(index, ep, stats)

    history = train_network(
        net,
        train,
        epochs=cfg.epochs,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        dsa=cfg.dsa,
        dsa_strategy=cfg.dsa_strategy,
        lr_schedule="half" if cfg.decay else None,
        batch_standardize=cfg.batch_standardize,
        generator=g,
        device=device,
        test_data=test,
        test_every=cfg.test_every,
        callback=on_epoch,
        progress=progress,
        desc=f"expert {index}",
    )
    last = history.epochs[-1]
    info = {"train_loss": last.loss, "train_accuracy": last.accuracy, "test_accuracy": last.test_accuracy}
    return info, snaps


__all__ = [
    "FORMATS",
    "ExpertBuffer",
    "ExpertConfig",
    "MemmapExpertBuffer",
    "ReferenceExpertBuffer",
    "TrajectorySampler",
    "expert_dir",
    "expert_generator",
    "load_buffer",
    "load_experts",
    "reference_dataset_name",
    "snapshot_params",
    "train_experts",
]
