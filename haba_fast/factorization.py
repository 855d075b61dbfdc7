"""The synthetic-set parameterizations: ``Pixels`` (plain images, the MTT baseline) and ``HaBa``
(bases + hallucinators), their storage accounting, and checkpoint I/O.

Layouts (see docs/ARCHITECTURE.md and DESIGN.md "Formats"):

* ``Pixels.images``  ``[K*ipc, C, H, W]``, class-major: class ``c`` owns rows ``c*ipc ... c*ipc+ipc-1``.
* ``HaBa.bases``     ``[K*bpc, c_b, H, W]``, class-major the same way (this is the tensor the
  reference saves as ``images_<it>.pt``).
* ``HaBa`` hallucinators, stacked over ``Hn`` of them: ``enc_weight [Hn, C, c_b, k, k]``,
  ``enc_bias [Hn, C]``, ``scale``/``shift [Hn, C, H-k+1, W-k+1]``, ``dec_weight [Hn, C, C, k, k]``
  (ConvTranspose2d layout ``[in, out, k, k]``), ``dec_bias [Hn, C]``. Sample ``i`` is
  ``dec_h(scale_h * enc_h(bases[b]) + shift_h)`` for the pair ``(b, h)``.

Files:

* Reference (Huage001/DatasetFactorization ``distill_fac.py``): ``images_<it>.pt`` holds the bases
  tensor and ``styles_<it>.pt`` the ``state_dict()`` of an ``nn.ModuleList`` of hallucinators (keys
  ``{i}.enc.weight``, ``{i}.enc.bias``, ``{i}.scale``, ``{i}.shift``, ``{i}.dec.weight``,
  ``{i}.dec.bias``; scale/shift carry a leading batch dim of 1). The best iteration is saved as
  ``images_best.pt`` + ``weights_best.pt``. The reference does not save its learned lr; we write and
  read an optional ``syn_lr_<it>.pt`` (0-dim tensor) beside them, which the reference ignores.
  MTT's pixel checkpoints are ``images_<it>.pt`` + ``labels_<it>.pt``.
* Our own: one ``.pt`` written atomically, a dict ``{"format": "haba_fast/1", "kind": "haba"|"pixels",
  "args": constructor args, "state_dict": ..., "meta": {...}}``. ``meta`` conventionally holds
  ``dataset`` (str), ``lr`` (learned lr, float), ``zca`` (ZCA state dict), ``mean``/``std``
  (per-channel normalization), ``iteration`` (int); any other plain values are kept as given.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor, nn

from haba_fast import io as hio
from haba_fast.init import pair, uniform_fan_in_

__all__ = [
    "FORMAT",
    "HaBa",
    "Pixels",
    "Storage",
    "budget_bpc",
    "hallucinator_floats",
    "load_synthetic",
    "reference_file_names",
]

FORMAT = "haba_fast/1"
PathLike = Union[str, os.PathLike]
_HALL_FIELDS = ("enc.weight", "enc.bias", "scale", "shift", "dec.weight", "dec.bias")
_HALL_KEY = re.compile(r"^(\d+)\.(enc\.weight|enc\.bias|scale|shift|dec\.weight|dec\.bias)$")


# --------------------------------------------------------------------------------------------
# Storage accounting
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Storage:
    """Size of a synthetic set.

    Attributes:
        floats: number of stored floats (bases + hallucinator parameters, or pixels).
        image_equivalents: ``floats / (C*H*W)`` with ``C`` the channels of the *generated* images.
        percent_of_train: ``100 * image_equivalents / train_size``, or None when no size was given.
    """

    floats: int
    image_equivalents: float
    percent_of_train: float | None = None

    def __str__(self) -> str:
        text = f"{self.floats:,} floats = {self.image_equivalents:,.1f} images"
        if self.percent_of_train is not None:
            text += f" ({self.percent_of_train:.2g}% of the training set)"
        return text


def _storage(floats: int, image_floats: int, train_size: int | None) -> Storage:
    equiv = floats / image_floats
    pct = None
    if train_size is not None:
        pct = 100.0 * equiv / _positive_int(train_size, "train_size", "storage")
    return Storage(int(floats), float(equiv), pct)


def hallucinator_floats(channels: int, base_channels: int, kernel_size: int, im_size) -> int:
    """Floats of one hallucinator: enc (C·c_b·k² + C) + scale and shift (2·C·(H-k+1)(W-k+1)) + dec (C²·k² + C)."""
    H, W = pair(im_size)
    C, cb, k = channels, base_channels, kernel_size
    return C * cb * k * k + C + 2 * C * (H - k + 1) * (W - k + 1) + C * C * k * k + C


def budget_bpc(ipc: int, n_hallucinators: int, kernel_size: int, channels: int, base_channels: int, im_size, *,
               num_classes: int) -> int:
    """Largest bases-per-class whose bases + hallucinators fit the storage of ``ipc`` images per class.

    Budget: ``num_classes * ipc * C*H*W`` floats. Cost: ``num_classes * bpc * c_b*H*W`` (bases)
    + ``n_hallucinators * hallucinator_floats(...)``. Everything stored is counted, including the
    per-pixel ``scale``/``shift`` maps, which dominate a hallucinator.

    For CIFAR-10 (C=3, 32×32, k=3, 5 hallucinators = 27,840 floats = 9.06 images) this gives
    BPC 9 at IPC 10 and BPC 49 at IPC 50, as in the paper's table; at IPC 1 the paper's BPC 1 does
    *not* fit an exact count (10 bases + 9.06 images of hallucinators > 10 images), so this function
    raises there. Single-channel bases with 1 hallucinator fit BPC 2 at IPC 1.

    Raises:
        ValueError: when even one basis per class does not fit (the message gives the sizes).
    """
    for name, v in (("ipc", ipc), ("num_classes", num_classes), ("kernel_size", kernel_size),
                    ("channels", channels), ("base_channels", base_channels)):
        if int(v) != v or v <= 0:
            raise ValueError(f"budget_bpc: {name} must be a positive int, got {v!r}")
    if int(n_hallucinators) != n_hallucinators or n_hallucinators < 0:
        raise ValueError(f"budget_bpc: n_hallucinators must be an int >= 0, got {n_hallucinators!r}")
    H, W = pair(im_size)
    if kernel_size > min(H, W):
        raise ValueError(f"budget_bpc: kernel_size {kernel_size} is larger than the image ({H}x{W})")
    budget = num_classes * ipc * channels * H * W
    hall = n_hallucinators * hallucinator_floats(channels, base_channels, kernel_size, (H, W))
    per_bpc = num_classes * base_channels * H * W
    bpc = (budget - hall) // per_bpc
    if bpc < 1:
        need = (hall + per_bpc) / (num_classes * channels * H * W)
        raise ValueError(
            f"budget_bpc: IPC {ipc} ({budget:,} floats) cannot hold even 1 basis per class: {n_hallucinators} "
            f"hallucinators take {hall:,} floats and 1 basis per class {per_bpc:,}; that needs IPC >= {need:.2f}. "
            "Use fewer hallucinators, single-channel bases (base_channels=1), or a larger IPC."
        )
    return int(bpc)


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------
def _positive_int(value, name: str, owner: str) -> int:
    """``value`` as an int >= 1: an int (or an integral float such as ``3.0``), never a bool; TypeError or
    ValueError naming ``owner: name`` otherwise (None, NaN, Inf, 0.5, ``'3'``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a positive int, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or int(value) != value or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return int(value)


def _check_indices(idx, what: str, high: int, device, n: int | None = None) -> Tensor:
    """Row indices as a 1-D int64 tensor ``[n]`` on ``device``, each in ``[0, high)``.

    An int is broadcast to ``[n]`` when ``n`` is given (a per-batch choice such as one hallucinator), and refused
    otherwise. TypeError for a float or bool tensor, ValueError for another shape or a value out of range.
    """
    if isinstance(idx, bool):
        raise TypeError(f"{what} must be an integer tensor or an int, got a bool")
    if isinstance(idx, int):
        if n is None:
            raise ValueError(f"{what} must be a 1-D tensor [n] of indices, got an int")
        idx = torch.full((n,), idx, dtype=torch.long, device=device)
    idx = torch.as_tensor(idx, device=device)
    if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.is_complex():
        raise TypeError(f"{what} must be an integer tensor, got {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"{what} must be 1-D [n], got shape {list(idx.shape)}")
    idx = idx.long()
    # Range check only for CPU tensors: on CUDA it would force a device sync on every step.
    if idx.device.type == "cpu" and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= high):
        raise ValueError(f"{what} out of range: values must lie in [0, {high}), got "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    return idx


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _randint(high: int, n: int, generator: torch.Generator | None, device) -> Tensor:
    """``n`` draws in [0, high) from ``generator`` (on the generator's device), moved to ``device``."""
    gdev = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(high, (n,), generator=generator, device=gdev).to(device)


def _randn_(t: Tensor, generator: torch.Generator | None) -> None:
    """Fill ``t`` in place with standard-normal draws from ``generator`` (checked), made on its device."""
    _check_generator(generator)
    gdev = generator.device if generator is not None else torch.device("cpu")
    t.copy_(torch.randn(t.shape, generator=generator, device=gdev, dtype=t.dtype))


def _real_source(images, labels) -> tuple[Tensor, Tensor]:
    """Accept ``(images, labels)`` or a ``haba_fast.data.Dataset`` (its training split)."""
    if labels is None and hasattr(images, "train_images"):
        return images.train_images, images.train_labels
    if labels is None:
        raise TypeError("init_from_real needs (images, labels) or a Dataset with train_images/train_labels")
    if not isinstance(images, Tensor) or not isinstance(labels, Tensor):
        raise TypeError("init_from_real: images and labels must be tensors")
    return images, labels


def _pick_real(images, labels, generator, num_classes: int, per_class: int, channels: int,
               im_size: tuple[int, int]) -> Tensor:
    """``per_class`` distinct random real images of every class, class-major: ``[K*per_class, C, H, W]``.

    ``images, labels, generator`` as ``init_from_real`` takes them: tensors, or a Dataset with ``labels=None``,
    or a Dataset with the generator in ``labels``'s place (the contract's positional form).
    """
    if isinstance(labels, torch.Generator):
        labels, generator = None, labels
    images, labels = _real_source(images, labels)
    _check_generator(generator)
    if images.dim() != 4 or tuple(images.shape[1:]) != (channels, *im_size):
        raise ValueError(f"init_from_real: images must be [N, {channels}, {im_size[0]}, {im_size[1]}], "
                         f"got {list(images.shape)}")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"init_from_real: labels must be [N={images.shape[0]}], got {list(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"init_from_real: labels must be an integer tensor, got {labels.dtype}")
    labels_cpu = labels.detach().cpu()
    picks = []
    gdev = generator.device if generator is not None else torch.device("cpu")
    for c in range(num_classes):
        idx = (labels_cpu == c).nonzero(as_tuple=True)[0]
        if idx.numel() < per_class:
            raise ValueError(f"init_from_real: class {c} has {idx.numel()} real images, {per_class} are needed "
                             "(lower ipc/bpc or use init_noise)")
        perm = torch.randperm(idx.numel(), generator=generator, device=gdev).cpu()
        picks.append(idx[perm[:per_class]])
    sel = torch.cat(picks).to(images.device)
    return images.detach()[sel]


def _check_meta(value: Any, where: str = "meta") -> None:
    """Our files load with ``weights_only=True``: only plain values and tensors may be stored."""
    if value is None or isinstance(value, (bool, int, float, str, Tensor, torch.dtype)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_meta(v, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: keys must be str or int, got {type(k).__name__}")
            _check_meta(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where} is a {type(value).__name__}; checkpoints store only tensors, numbers, strings, "
                    "lists and dicts (store a state_dict() instead of an object)")


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


SOFT_LABEL_INIT_P = 0.9  # initial probability of a soft label's own class (the rest share 1 - this)


class _Synthetic(nn.Module):
    """Common checkpoint and bookkeeping code of both parameterizations.

    Soft labels (``soft_labels=True``): a Parameter ``label_logits [M, K]``, one row per stored row (Pixels: per
    image; HaBa: per basis, shared by all of its hallucinated samples), initialized so that softmax gives
    ``SOFT_LABEL_INIT_P`` to the row's own class. ``label_targets()`` returns their softmax (differentiable).
    """

    kind: str = ""
    meta: dict[str, Any]

    def _init_soft_labels(self, enabled: bool, row_labels: Tensor) -> None:
        """Register ``label_logits [M, K]`` (after the data parameters, so they stay first) when ``enabled``."""
        if not isinstance(enabled, bool):
            raise TypeError(f"soft_labels must be a bool, got {type(enabled).__name__}")
        self.soft_labels = enabled
        if not enabled:
            self.register_parameter("label_logits", None)  # a None parameter: absent from state_dict()
            return
        K = self.num_classes
        logits = torch.zeros(row_labels.numel(), K)
        if K > 1:
            # softmax(logits)[own] = p with the others equal: own logit = log(p (K-1) / (1-p)), the others 0.
            logits[torch.arange(row_labels.numel()), row_labels] = math.log(
                SOFT_LABEL_INIT_P * (K - 1) / (1.0 - SOFT_LABEL_INIT_P))
        self.label_logits = nn.Parameter(logits)

    def label_targets(self) -> Tensor | None:
        """Soft targets ``[M, K]`` = softmax(label_logits) per stored row (differentiable), or None (hard labels)."""
        if self.label_logits is None:
            return None
        return torch.softmax(self.label_logits, dim=1)

    def _label_floats(self) -> int:
        return 0 if self.label_logits is None else self.label_logits.numel()

    def _write_soft_labels(self, directory: PathLike, it) -> list[Path]:
        """Beside the reference files: ``label_logits_<it>.pt`` ``[M, K]`` (the reference code has no soft labels
        and ignores this file; its own evaluation would train with hard labels)."""
        if self.label_logits is None:
            return []
        path = Path(directory) / f"label_logits_{it}.pt"
        hio.atomic_torch_save(self.label_logits.detach().cpu().clone(), path)
        return [path]

    @torch.no_grad()
    def _read_soft_labels(self, directory: Path, it) -> None:
        path = Path(directory) / f"label_logits_{it}.pt"
        if not path.exists():
            return
        logits = _load_tensor(path, "soft label logits")
        rows = self.images.shape[0] if self.kind == "pixels" else self.bases.shape[0]
        if tuple(logits.shape) != (rows, self.num_classes):
            raise ValueError(
                f"{path}: soft label logits must be [{rows}, {self.num_classes}], got {list(logits.shape)}"
            )
        self._init_soft_labels(True, torch.zeros(rows, dtype=torch.long))
        self.label_logits.data = logits.to(self.label_logits.dtype)

    def _ctor_args(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def save(self, path: PathLike, meta: Mapping[str, Any] | None = None) -> Path:
        """Write our own format: one ``.pt`` file, atomically (see the module docstring).

        Args:
            path: destination file.
            meta: plain values (str/int/float/bool/None, tensors, lists, dicts) such as ``dataset``,
                ``lr``, ``zca`` (a state dict), ``mean``, ``std``, ``iteration``. Merged over ``self.meta``.
        """
        merged = dict(getattr(self, "meta", {}) or {})
        merged.update(dict(meta or {}))
        _check_meta(merged)
        _check_meta_lr(merged, f"{type(self).__name__}.save")
        first = next(iter(self.parameters()))
        payload = {
            "format": FORMAT,
            "kind": self.kind,
            "args": self._ctor_args(),
            "dtype": str(first.dtype).replace("torch.", ""),
            "state_dict": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()},
            "meta": _to_cpu(merged),
        }
        hio.atomic_torch_save(payload, path)
        return Path(path)

    @classmethod
    def load(cls, path: PathLike):
        """Load a file in our format (or a reference checkpoint) and check that it is a ``cls``."""
        obj = load_synthetic(path)
        if not isinstance(obj, cls):
            raise ValueError(f"{path} holds a {type(obj).__name__} synthetic set, not a {cls.__name__}; "
                             "use haba_fast.factorization.load_synthetic to load either kind")
        return obj


# --------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------
class Pixels(_Synthetic):
    """Plain synthetic images (the MTT baseline).

    Attributes:
        images: Parameter ``[K*ipc, C, H, W]``, class-major.
        labels: buffer ``[K*ipc]`` int64 (``c`` repeated ``ipc`` times, ``c = 0..K-1``).
    """

    kind = "pixels"

    def __init__(self, num_classes: int, ipc: int, channels: int, im_size, generator: torch.Generator | None = None,
                 soft_labels: bool = False):
        super().__init__()
        num_classes, ipc, channels = (_positive_int(v, name, "Pixels") for name, v in
                                      (("num_classes", num_classes), ("ipc", ipc), ("channels", channels)))
        _check_generator(generator)
        self.num_classes, self.ipc, self.channels = num_classes, ipc, channels
        self.im_size = pair(im_size)
        self.images = nn.Parameter(torch.empty(self.num_classes * self.ipc, self.channels, *self.im_size))
        self.register_buffer("labels", torch.arange(self.num_classes).repeat_interleave(self.ipc))
        self._init_soft_labels(soft_labels, self.labels)
        self.meta = {}
        self.init_noise(generator)

    def _ctor_args(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "ipc": self.ipc, "channels": self.channels,
                "im_size": list(self.im_size), "soft_labels": self.soft_labels}

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, ipc={self.ipc}, channels={self.channels}, im_size={self.im_size}"

    @property
    def num_samples(self) -> int:
        """Samples in one evaluation epoch: ``K*ipc``."""
        return self.images.shape[0]

    @torch.no_grad()
    def init_noise(self, generator: torch.Generator | None = None) -> Pixels:
        """Standard-normal images (the reference's ``torch.randn`` init)."""
        _randn_(self.images, generator)
        return self

    @torch.no_grad()
    def init_from_real(self, images, labels: Tensor | None = None,
                       generator: torch.Generator | None = None) -> Pixels:
        """Copy ``ipc`` distinct random real images of every class.

        Args:
            images: ``[N, C, H, W]`` real (normalized) images, or a ``haba_fast.data.Dataset``.
            labels: ``[N]`` int labels in ``[0, K)`` (omit when passing a Dataset).
        """
        picked = _pick_real(images, labels, generator, self.num_classes, self.ipc, self.channels, self.im_size)
        self.images.copy_(picked)
        return self

    def sample_batch(self, indices: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(images[indices] [n, C, H, W]`` (differentiable), ``labels[indices] [n])``; ``indices`` ``[n]`` int in
        ``[0, K*ipc)`` (checked as ``HaBa.sample_batch`` checks them)."""
        indices = _check_indices(indices, "indices", self.num_samples, self.images.device)
        return self.images[indices], self.labels[indices]

    @torch.no_grad()
    def materialize(self, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """A detached copy of ``(images [K*ipc, C, H, W], labels [K*ipc])`` for evaluation."""
        return self.images.detach().clone(), self.labels.clone()

    def storage(self, train_size: int | None = None) -> Storage:
        """Floats stored: the pixels, plus the soft label logits when there are any (hard labels are implied)."""
        H, W = self.im_size
        return _storage(self.images.numel() + self._label_floats(), self.channels * H * W, train_size)

    # -- reference (MTT) format ------------------------------------------------------------
    @classmethod
    def from_reference(cls, images, labels=None, num_classes: int | None = None) -> Pixels:
        """Build from MTT's ``images_<it>.pt`` (``[K*ipc, C, H, W]``) and optional ``labels_<it>.pt``.

        ``images``/``labels`` may be tensors or paths. Labels must be class-major with equal counts.
        """
        images = _load_tensor(images, "reference images")
        if images.dim() != 4 or images.shape[0] == 0:
            raise ValueError(f"reference images must be [K*ipc, C, H, W] with K*ipc >= 1, got {list(images.shape)}")
        if num_classes is not None:
            _positive_int(num_classes, "num_classes", "Pixels.from_reference")
        if labels is not None:
            labels = _load_tensor(labels, "reference labels")
            if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
                raise ValueError(f"reference labels must be [{images.shape[0]}] to match the images, "
                                 f"got {list(labels.shape)}")
            labels = labels.long()
            k = int(labels.max().item()) + 1
            if num_classes is not None and num_classes != k:
                raise ValueError(f"reference labels have {k} classes but num_classes={num_classes}")
            num_classes = k
        if num_classes is None:
            raise ValueError("Pixels.from_reference needs labels or num_classes")
        n = images.shape[0]
        if n % num_classes:
            raise ValueError(f"reference images: {n} rows is not a multiple of num_classes={num_classes}")
        pix = cls(num_classes, n // num_classes, images.shape[1], images.shape[2:])
        if labels is not None and not torch.equal(labels, pix.labels):
            raise ValueError("reference labels are not class-major (c repeated ipc times for c = 0..K-1); "
                             "Pixels stores images in that order")
        pix.to(images.dtype)
        with torch.no_grad():
            pix.images.copy_(images)
        return pix

    def to_reference(self, directory: PathLike, it: int | str = "best") -> list[Path]:
        """Write ``images_<it>.pt`` and ``labels_<it>.pt`` (MTT's pixel format), and ``label_logits_<it>.pt``
        beside them for soft labels. Returns the paths."""
        names = reference_file_names(it)
        d = Path(directory)
        out = [d / names["images"], d / names["labels"]]
        hio.atomic_torch_save(self.images.detach().cpu().clone(), out[0])
        hio.atomic_torch_save(self.labels.detach().cpu().clone(), out[1])
        return out + self._write_soft_labels(d, it)


# --------------------------------------------------------------------------------------------
# HaBa
# --------------------------------------------------------------------------------------------
class HaBa(_Synthetic):
    """Bases + hallucinators (Liu et al., "Dataset Distillation via Factorization", NeurIPS 2022).

    Args:
        num_classes: K.
        bpc: bases per class.
        channels: C, channels of the generated images (the data's channels).
        im_size: ``H`` or ``(H, W)``.
        n_hallucinators: Hn (the reference's ``--n_style``, default 5).
        kernel_size: k of the encoder conv and decoder transposed conv (reference: 3).
        base_channels: c_b; None = ``channels``; 1 for single-channel bases (``--single_channel``).
        generator: draws the initial bases (standard normal) and hallucinator weights (PyTorch's
            default Conv2d/ConvTranspose2d init distributions); scale starts at 1, shift at 0.

    Parameters (see the module docstring for layouts): ``bases``, ``enc_weight``, ``enc_bias``,
    ``scale``, ``shift``, ``dec_weight``, ``dec_bias``.
    """

    kind = "haba"

    def __init__(self, num_classes: int, bpc: int, channels: int, im_size, n_hallucinators: int = 5,
                 kernel_size: int = 3, base_channels: int | None = None,
                 generator: torch.Generator | None = None, soft_labels: bool = False):
        super().__init__()
        base_channels = channels if base_channels is None else base_channels
        num_classes, bpc, channels, n_hallucinators, kernel_size, base_channels = (
            _positive_int(v, name, "HaBa") for name, v in (
                ("num_classes", num_classes), ("bpc", bpc), ("channels", channels),
                ("n_hallucinators", n_hallucinators), ("kernel_size", kernel_size), ("base_channels", base_channels)))
        _check_generator(generator)
        self.num_classes, self.bpc, self.channels = num_classes, bpc, channels
        self.n_hallucinators, self.kernel_size, self.base_channels = n_hallucinators, kernel_size, base_channels
        self.im_size = pair(im_size)
        H, W = self.im_size
        k, C, cb, Hn = self.kernel_size, self.channels, self.base_channels, self.n_hallucinators
        if k > min(H, W):
            raise ValueError(f"HaBa: kernel_size {k} is larger than the image ({H}x{W})")
        self.bases = nn.Parameter(torch.empty(self.num_classes * self.bpc, cb, H, W))
        self.enc_weight = nn.Parameter(torch.empty(Hn, C, cb, k, k))
        self.enc_bias = nn.Parameter(torch.empty(Hn, C))
        self.scale = nn.Parameter(torch.ones(Hn, C, H - k + 1, W - k + 1))
        self.shift = nn.Parameter(torch.zeros(Hn, C, H - k + 1, W - k + 1))
        self.dec_weight = nn.Parameter(torch.empty(Hn, C, C, k, k))
        self.dec_bias = nn.Parameter(torch.empty(Hn, C))
        self._init_soft_labels(soft_labels, torch.arange(self.num_classes).repeat_interleave(self.bpc))
        self.meta = {}
        self.init_noise(generator)
        self.reset_hallucinators(generator)

    def _ctor_args(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "bpc": self.bpc, "channels": self.channels,
                "im_size": list(self.im_size), "n_hallucinators": self.n_hallucinators,
                "kernel_size": self.kernel_size, "base_channels": self.base_channels, "soft_labels": self.soft_labels}

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, bpc={self.bpc}, channels={self.channels}, im_size={self.im_size}, "
                f"n_hallucinators={self.n_hallucinators}, kernel_size={self.kernel_size}, "
                f"base_channels={self.base_channels}")

    # -- initialization --------------------------------------------------------------------
    @torch.no_grad()
    def reset_hallucinators(self, generator: torch.Generator | None = None) -> HaBa:
        """PyTorch's default init (kaiming_uniform(a=√5) = U(±1/√fan_in), bias U(±1/√fan_in)); scale 1, shift 0.

        fan_in is ``c_b·k²`` for the encoder Conv2d and ``C·k²`` for the decoder ConvTranspose2d
        (PyTorch takes fan_in from dim 1 of the weight, which is ``out`` for a transposed conv).
        """
        _check_generator(generator)
        k = self.kernel_size
        enc_fan_in, dec_fan_in = self.base_channels * k * k, self.channels * k * k
        f64 = torch.float64  # drawn in float64 (the values of earlier releases, for every parameter dtype)
        for h in range(self.n_hallucinators):  # per hallucinator, in the reference's module order
            uniform_fan_in_(self.enc_weight[h], enc_fan_in, generator, draw_dtype=f64)
            uniform_fan_in_(self.enc_bias[h], enc_fan_in, generator, draw_dtype=f64)
            uniform_fan_in_(self.dec_weight[h], dec_fan_in, generator, draw_dtype=f64)
            uniform_fan_in_(self.dec_bias[h], dec_fan_in, generator, draw_dtype=f64)
        self.scale.fill_(1.0)
        self.shift.zero_()
        return self

    @torch.no_grad()
    def init_hallucinators_identity(self, noise: float = 0.1, generator: torch.Generator | None = None) -> HaBa:
        """Near-identity hallucinators (not the reference's init, which is :meth:`reset_hallucinators`).

        The encoder and decoder kernels are centered deltas, one per channel (single-channel bases feed every
        channel), biases 0, scale 1, shift 0, so that every sample starts as its basis: exactly, with ``noise`` 0,
        on the interior, while a border of ``(k - 1) // 2`` pixels starts at 0 (the encoder has no padding). On top,
        ``noise`` times the default draws of :meth:`reset_hallucinators` on the kernels and biases: the
        hallucinators then differ from the start, so that their gradients differ too.
        """
        if not noise >= 0:
            raise ValueError(f"init_hallucinators_identity: noise must be >= 0, got {noise!r}")
        if self.kernel_size % 2 != 1:
            raise ValueError(f"identity hallucinators need an odd kernel_size, got {self.kernel_size}")
        self.reset_hallucinators(generator)
        for p in (self.enc_weight, self.enc_bias, self.dec_weight, self.dec_bias):
            p.mul_(noise)
        m = self.kernel_size // 2
        for c in range(self.channels):
            self.enc_weight[:, c, c if self.base_channels == self.channels else 0, m, m] += 1.0
            self.dec_weight[:, c, c, m, m] += 1.0
        return self

    @torch.no_grad()
    def init_noise(self, generator: torch.Generator | None = None) -> HaBa:
        """Standard-normal bases (the reference's ``pix_init noise``); hallucinators untouched."""
        _randn_(self.bases, generator)
        return self

    @torch.no_grad()
    def init_from_real(self, images, labels: Tensor | None = None,
                       generator: torch.Generator | None = None) -> HaBa:
        """Bases from ``bpc`` distinct random real images per class (``pix_init real``).

        Single-channel bases (``c_b = 1``) from multi-channel data take the channel mean.

        Args:
            images: ``[N, C, H, W]`` real (normalized) images, or a ``haba_fast.data.Dataset``.
            labels: ``[N]`` int labels in ``[0, K)`` (omit when passing a Dataset).
        """
        picked = _pick_real(images, labels, generator, self.num_classes, self.bpc, self.channels, self.im_size)
        if self.base_channels == self.channels:
            self.bases.copy_(picked)
        elif self.base_channels == 1:
            self.bases.copy_(picked.mean(dim=1, keepdim=True))
        else:
            raise ValueError(f"init_from_real: cannot make {self.base_channels}-channel bases from "
                             f"{self.channels}-channel images (use base_channels = channels or 1)")
        return self

    # -- sampling --------------------------------------------------------------------------
    @property
    def base_labels(self) -> Tensor:
        """``[K*bpc]`` int64: the class of every basis (``index // bpc``)."""
        return torch.arange(self.num_classes, device=self.bases.device).repeat_interleave(self.bpc)

    @property
    def labels(self) -> Tensor:
        """Labels of ``materialize()``'s samples (one per basis): ``base_labels``."""
        return self.base_labels

    @property
    def num_bases(self) -> int:
        return self.bases.shape[0]

    @property
    def num_samples(self) -> int:
        """Samples in one evaluation epoch: one per basis, ``K*bpc`` (as the reference's dataset)."""
        return self.bases.shape[0]

    @property
    def num_pairs(self) -> int:
        """Distinct (basis, hallucinator) samples: ``K*bpc*Hn``."""
        return self.bases.shape[0] * self.n_hallucinators

    def hallucinator_parameters(self) -> list[nn.Parameter]:
        """``[enc_weight, enc_bias, scale, shift, dec_weight, dec_bias]`` (optimized with ``lr_style``)."""
        return [self.enc_weight, self.enc_bias, self.scale, self.shift, self.dec_weight, self.dec_bias]

    def _index(self, idx, n: int | None, what: str, high: int) -> Tensor:
        return _check_indices(idx, what, high, self.bases.device, n)

    def generate(self, base_idx, hall_idx) -> Tensor:
        """Hallucinated samples ``[n, C, H, W]``, differentiable in bases and hallucinators.

        Args:
            base_idx: ``[n]`` int flat basis indices (class-major: class ``c``, basis ``j`` is ``c*bpc+j``).
            hall_idx: ``[n]`` int hallucinator indices, or one int for all samples.
        """
        base_idx = self._index(base_idx, None, "base_idx", self.num_bases)
        return self._generate_checked(base_idx, hall_idx)

    def _generate_checked(self, base_idx: Tensor, hall_idx) -> Tensor:
        """``generate`` for ``base_idx`` [n] already checked (``_index``); checks ``hall_idx`` against it."""
        from haba_fast import ops

        hall_idx = self._index(hall_idx, base_idx.shape[0], "hall_idx", self.n_hallucinators)
        if hall_idx.shape[0] != base_idx.shape[0]:
            raise ValueError(f"base_idx and hall_idx must have the same length, got {base_idx.shape[0]} and "
                             f"{hall_idx.shape[0]}")
        return ops.generate(self.bases, self.enc_weight, self.enc_bias, self.scale, self.shift, self.dec_weight,
                            self.dec_bias, base_idx, hall_idx)

    def forward(self, base_idx, hall_idx) -> Tensor:
        """Same as ``generate`` (so ``torch.func.functional_call`` works on a HaBa)."""
        return self.generate(base_idx, hall_idx)

    def labels_of(self, base_idx: Tensor) -> Tensor:
        """Class labels ``[n]`` of the bases ``base_idx`` (``[n]`` int in ``[0, K*bpc)``)."""
        return self._index(base_idx, None, "base_idx", self.num_bases) // self.bpc

    def sample_batch(self, indices, generator: torch.Generator | None = None, *,
                     hall=None) -> tuple[Tensor, Tensor]:
        """Generate the bases ``indices`` ``[n]`` through hallucinators, with their labels.

        Args:
            indices: ``[n]`` flat basis indices.
            generator: draws the hallucinator when ``hall`` is None.
            hall: None = one random hallucinator for the whole batch (the reference's choice per
                unrolled step), an int, or ``[n]`` indices.

        Returns:
            ``(x [n, C, H, W], y [n])``.
        """
        _check_generator(generator)
        indices = self._index(indices, None, "indices", self.num_bases)
        if hall is None:
            hall = int(_randint(self.n_hallucinators, 1, generator, "cpu")[0])
        return self._generate_checked(indices, hall), indices // self.bpc  # indices checked once, here

    def all_pairs(self) -> tuple[Tensor, Tensor]:
        """Every basis through every hallucinator: ``(x [K*bpc*Hn, C, H, W], y [K*bpc*Hn])``.

        Row ``b*Hn + h`` is basis ``b`` through hallucinator ``h`` (so rows stay class-major).
        Differentiable; wrap in ``torch.no_grad()`` when exporting.
        """
        b, h = self.pair_indices()
        return self.generate(b, h), self.labels_of(b)

    def pair_indices(self) -> tuple[Tensor, Tensor]:
        """``(base_idx, hall_idx)`` ``[K*bpc*Hn]`` in ``all_pairs()`` order."""
        device = self.bases.device
        b = torch.arange(self.num_bases, device=device).repeat_interleave(self.n_hallucinators)
        h = torch.arange(self.n_hallucinators, device=device).repeat(self.num_bases)
        return b, h

    @torch.no_grad()
    def materialize(self, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Every basis through one random hallucinator (per basis): detached ``(x [K*bpc, C, H, W], y [K*bpc])``.

        This is one evaluation epoch's training set, as the reference's dataset draws it.
        """
        _check_generator(generator)
        hall = _randint(self.n_hallucinators, self.num_bases, generator, self.bases.device)
        base = torch.arange(self.num_bases, device=self.bases.device)
        return self.generate(base, hall).detach(), self.base_labels

    # -- storage ---------------------------------------------------------------------------
    def storage(self, train_size: int | None = None) -> Storage:
        """Floats stored: bases + all hallucinator parameters (scale/shift maps included) + soft label logits."""
        H, W = self.im_size
        floats = self.bases.numel() + sum(p.numel() for p in self.hallucinator_parameters()) + self._label_floats()
        return _storage(floats, self.channels * H * W, train_size)

    # -- reference format ------------------------------------------------------------------
    @classmethod
    def from_reference(cls, images, styles, num_classes: int, syn_lr=None) -> HaBa:
        """Build from the reference's checkpoint (tensors/state dicts or paths to its files).

        Args:
            images: ``[K*bpc, c_b, H, W]`` tensor, or a path to ``images_<it>.pt`` / ``images_best.pt``.
            styles: hallucinator state dict (``{i}.enc.weight`` ... ``{i}.dec.bias``), or a path to
                ``styles_<it>.pt`` / ``weights_best.pt``.
            num_classes: K (the reference files do not record it).
            syn_lr: optional learned lr (float, tensor or path); stored as ``meta["lr"]``.

        The parameters take the dtype of ``images``; values are copied bit for bit.
        """
        images = _load_tensor(images, "reference images")
        styles_what = f"reference styles {styles}" if isinstance(styles, (str, os.PathLike)) else "reference styles"
        if isinstance(styles, (str, os.PathLike)):
            styles = hio.torch_load(styles, what="reference styles file")
        if not isinstance(styles, Mapping):
            raise ValueError(f"{styles_what}: expected a state dict of hallucinators, got {type(styles).__name__}")
        if images.dim() != 4:
            raise ValueError(f"reference images must be [K*bpc, c_b, H, W], got {list(images.shape)}")
        if int(num_classes) != num_classes or num_classes <= 0:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        M, cb, H, W = images.shape
        if M % num_classes:
            raise ValueError(f"reference images: {M} bases is not a multiple of num_classes={num_classes} "
                             "(pass the dataset's number of classes)")
        styles = dict(styles)
        lr_files = syn_lr is not None  # a path the caller passed; never one read from the styles file
        if syn_lr is None and "syn_lr" in styles:
            syn_lr = styles["syn_lr"]
        stacked = _parse_styles(styles, styles_what)
        Hn = stacked["enc.weight"].shape[0]
        ew = stacked["enc.weight"]
        if ew.dim() != 5 or ew.shape[3] != ew.shape[4]:
            raise ValueError(f"{styles_what}: '0.enc.weight' must be [C, c_b, k, k], got {list(ew.shape[1:])}")
        C, k = ew.shape[1], ew.shape[3]
        if ew.shape[2] != cb:
            raise ValueError(f"{styles_what}: '0.enc.weight' takes {ew.shape[2]} input channels but the bases have "
                             f"{cb} (images and styles come from different runs?)")
        expect = {"enc.weight": (C, cb, k, k), "enc.bias": (C,), "scale": (1, C, H - k + 1, W - k + 1),
                  "shift": (1, C, H - k + 1, W - k + 1), "dec.weight": (C, C, k, k), "dec.bias": (C,)}
        for field, shape in expect.items():
            got = tuple(stacked[field].shape[1:])
            if got != shape:
                raise ValueError(f"{styles_what}: '{{i}}.{field}' has shape {list(got)}, expected {list(shape)} for "
                                 f"{H}x{W} bases and kernel {k} (images and styles from different runs?)")
        haba = cls(num_classes, M // num_classes, C, (H, W), n_hallucinators=Hn, kernel_size=k, base_channels=cb)
        haba.to(images.dtype)
        with torch.no_grad():
            haba.bases.copy_(images)
            haba.enc_weight.copy_(stacked["enc.weight"])
            haba.enc_bias.copy_(stacked["enc.bias"])
            haba.scale.copy_(stacked["scale"][:, 0])
            haba.shift.copy_(stacked["shift"][:, 0])
            haba.dec_weight.copy_(stacked["dec.weight"])
            haba.dec_bias.copy_(stacked["dec.bias"])
        if syn_lr is not None:
            haba.meta["lr"] = _lr_value(syn_lr, files=lr_files)
        return haba

    def reference_styles(self) -> dict[str, Tensor]:
        """The hallucinators as the reference's ``nn.ModuleList`` state dict (CPU copies)."""
        out: dict[str, Tensor] = {}
        for h in range(self.n_hallucinators):
            out[f"{h}.enc.weight"] = self.enc_weight[h].detach().cpu().clone()
            out[f"{h}.enc.bias"] = self.enc_bias[h].detach().cpu().clone()
            out[f"{h}.scale"] = self.scale[h].detach().cpu().unsqueeze(0).clone()
            out[f"{h}.shift"] = self.shift[h].detach().cpu().unsqueeze(0).clone()
            out[f"{h}.dec.weight"] = self.dec_weight[h].detach().cpu().clone()
            out[f"{h}.dec.bias"] = self.dec_bias[h].detach().cpu().clone()
        return out

    def to_reference(self, directory: PathLike, it: int | str = "best", lr=None) -> list[Path]:
        """Write the reference's files into ``directory`` (atomically); returns the paths written.

        ``it="best"`` writes ``images_best.pt`` + ``weights_best.pt``; an int writes ``images_<it>.pt`` +
        ``styles_<it>.pt``. The learned lr (``lr`` or ``meta["lr"]``) goes to ``syn_lr_<it>.pt``.
        """
        names = reference_file_names(it)
        d = Path(directory)
        paths = [d / names["images"], d / names["styles"]]
        hio.atomic_torch_save(self.bases.detach().cpu().clone(), paths[0])
        hio.atomic_torch_save(self.reference_styles(), paths[1])
        lr_files = lr is not None  # a path the caller passed may be read; meta's lr must be a number
        lr = self.meta.get("lr") if lr is None else lr
        if lr is not None:
            paths.append(d / names["lr"])
            # float64 keeps the Python float exact
            value = _lr_value(lr, positive=False, files=lr_files)
            hio.atomic_torch_save(torch.tensor(value, dtype=torch.float64), paths[2])
        return paths + self._write_soft_labels(d, it)

    @classmethod
    def load_reference_dir(cls, directory: PathLike, it: int | str = "best", num_classes: int = 10) -> HaBa:
        """Load ``images_<it>.pt`` + ``styles_<it>.pt`` (``it="best"``: ``images_best.pt`` + ``weights_best.pt``).

        ``num_classes`` defaults to 10 (every reference dataset but CIFAR-100 and Tiny ImageNet);
        the reference files do not record it. An optional ``syn_lr_<it>.pt`` supplies the learned lr.
        """
        obj = _load_reference_dir(directory, it, num_classes, want="haba")
        assert isinstance(obj, HaBa)
        return obj


# --------------------------------------------------------------------------------------------
# File helpers
# --------------------------------------------------------------------------------------------
def reference_file_names(it: int | str = "best") -> dict[str, str]:
    """The reference's file names for iteration ``it`` (int or ``"best"``)."""
    if it != "best":
        if isinstance(it, str) and it.isdigit():
            it = int(it)
        if not isinstance(it, int) or isinstance(it, bool) or it < 0:
            raise ValueError(f"iteration must be 'best' or an int >= 0, got {it!r}")
    styles = "weights_best.pt" if it == "best" else f"styles_{it}.pt"
    return {"images": f"images_{it}.pt", "styles": styles, "labels": f"labels_{it}.pt", "lr": f"syn_lr_{it}.pt"}


def _check_float_values(t: Tensor, what: str) -> None:
    """A file's parameters: a real floating dtype and finite values (a damaged or diverged file otherwise)."""
    if not t.is_floating_point():
        raise ValueError(f"{what} has dtype {t.dtype}, expected a floating-point tensor")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} contains NaN or Inf (did the run that wrote it diverge?)")


def _load_tensor(x, what: str) -> Tensor:
    if isinstance(x, (str, os.PathLike)):
        path = x
        x = hio.torch_load(path, what=f"{what} file")
        if not isinstance(x, Tensor):
            raise ValueError(f"{what} file {path} holds a {type(x).__name__}, expected one tensor")
        if "labels" in what:
            if x.dtype != torch.int64:
                raise ValueError(f"{what} file {path} has dtype {x.dtype}, expected int64 labels")
        else:
            _check_float_values(x, f"{what} file {path}")
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a tensor or a path, got {type(x).__name__}")
    if not x.dtype.is_floating_point and "labels" not in what:
        raise TypeError(f"{what} must be a floating-point tensor, got {x.dtype}")
    return x.detach().cpu()


def _lr_value(lr, *, positive: bool = True, files: bool = False) -> float:
    """One finite number from a float, a 1-element tensor or, with ``files``, a file (``positive``: and > 0, as a
    file must hold). ``files`` only for a path the caller passed: a value read from a file must not open another."""
    where = ""
    if isinstance(lr, (str, os.PathLike)):
        if not files:
            raise ValueError(f"learned lr must be a number, got {type(lr).__name__} {str(lr)!r}")
        where = f" (file {lr})"
        lr = hio.torch_load(lr, what="learned lr file")
    if isinstance(lr, Tensor):
        if lr.dtype == torch.bool or lr.is_complex():
            raise ValueError(f"learned lr must be a real number, got a {lr.dtype} tensor{where}")
        if lr.numel() != 1:
            raise ValueError(f"learned lr must be a single number, got a tensor of shape {list(lr.shape)}{where}")
        lr = lr.item()
    if not isinstance(lr, (int, float)) or isinstance(lr, bool):
        raise ValueError(f"learned lr must be a number, got {type(lr).__name__}{where}")
    if not math.isfinite(lr) or (positive and lr <= 0):
        raise ValueError(f"learned lr must be a finite number{' > 0' if positive else ''}, got {lr}{where}")
    return float(lr)


def _check_meta_lr(meta: Mapping[str, Any], where: object) -> float | None:
    """``meta['lr']`` (when present and not None) as a float, by the rule ``load`` applies: a finite number > 0."""
    if meta.get("lr") is None:
        return None
    try:
        return _lr_value(meta["lr"])
    except ValueError as exc:
        raise ValueError(f"{where}: meta 'lr': {exc}") from exc


def _parse_styles(styles: Mapping[str, Any], what: str) -> dict[str, Tensor]:
    """Stack ``{i}.<field>`` tensors over i: ``{field: [Hn, ...]}``; missing/extra keys are errors."""
    found: dict[int, dict[str, Tensor]] = {}
    for key, value in styles.items():
        if key == "syn_lr":
            continue
        m = _HALL_KEY.match(str(key))
        if not m:
            raise ValueError(f"{what}: unexpected key {key!r}; a hallucinator state dict has keys "
                             f"{{i}}.{', {i}.'.join(_HALL_FIELDS)}")
        if not isinstance(value, Tensor):
            raise ValueError(f"{what}: {key!r} is a {type(value).__name__}, expected a tensor")
        _check_float_values(value, f"{what}: {key!r}")
        found.setdefault(int(m.group(1)), {})[m.group(2)] = value.detach().cpu()
    if not found:
        raise ValueError(f"{what}: no hallucinator keys ({{i}}.enc.weight, ...) found; is this a styles_<it>.pt / "
                         "weights_best.pt file?")
    n = max(found) + 1
    stacked: dict[str, Tensor] = {}
    for field in _HALL_FIELDS:
        tensors = []
        for i in range(n):
            t = found.get(i, {}).get(field)
            if t is None:
                raise ValueError(f"{what}: missing key '{i}.{field}' ({n} hallucinators expected from the keys "
                                 "present)")
            tensors.append(t)
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            raise ValueError(f"{what}: '{{i}}.{field}' differs in shape between hallucinators: {sorted(shapes)}")
        stacked[field] = torch.stack(tensors)
    return stacked


def _find_lr(directory: Path, it) -> float | None:
    for name in (f"syn_lr_{it}.pt", f"lr_{it}.pt"):
        p = directory / name
        if p.exists():
            return _lr_value(p, files=True)
    return None


def _load_reference_dir(directory: PathLike, it, num_classes: int | None, want: str | None = None):
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"reference checkpoint directory not found: {d}")
    names = reference_file_names(it)
    images_p, styles_p, labels_p = d / names["images"], d / names["styles"], d / names["labels"]
    if not images_p.exists():
        found = sorted(p.name for p in d.glob("images_*.pt"))
        ours = sorted(p.name for p in d.glob("*.pt") if not p.name.startswith(("images_", "styles_", "weights_",
                                                                                  "labels_", "syn_lr_")))
        hint = f"; this folder has {', '.join(found)}: pass that iteration" if found else ""
        if ours:
            hint += f"; to load our format pass the file itself (here: {', '.join(ours[:5])})"
        raise FileNotFoundError(f"{images_p} not found (reference checkpoints are images_<it>.pt / images_best.pt"
                                f"{hint})")
    if styles_p.exists() and want != "pixels":
        haba = HaBa.from_reference(images_p, styles_p, 10 if num_classes is None else num_classes,
                                   syn_lr=_find_lr(d, it))
        haba.meta.setdefault("iteration", it)
        haba._read_soft_labels(d, it)
        return haba
    if want == "haba":
        raise FileNotFoundError(f"{styles_p} not found: a HaBa reference checkpoint has images and "
                                f"{'weights_best.pt' if it == 'best' else 'styles_<it>.pt'} side by side")
    if labels_p.exists() or num_classes is not None:
        pix = Pixels.from_reference(images_p, labels_p if labels_p.exists() else None,
                                    num_classes=None if labels_p.exists() else num_classes)
        lr = _find_lr(d, it)
        if lr is not None:
            pix.meta["lr"] = lr
        pix.meta.setdefault("iteration", it)
        pix._read_soft_labels(d, it)
        return pix
    raise FileNotFoundError(f"{d}: found {images_p.name} but neither {styles_p.name} (HaBa) nor {labels_p.name} "
                            "(pixels); pass num_classes to read the images as pixels")


_FLOAT_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                 "bfloat16": torch.bfloat16}


def _check_state(kind: str, args: Mapping[str, Any], state: Mapping[str, Any], path: Path) -> None:
    """Refuse damaged tensors, and args that disagree with them, before anything is allocated from ``args``.

    The file is someone else's: ``args`` are only trusted once the tensors it describes are there, so a damaged
    ``num_classes=10**12`` cannot make the constructor allocate terabytes.
    """
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise ValueError(f"{path}: state_dict entry {k!r} is a {type(v).__name__}, expected a tensor")
        if k == "labels":
            if v.dtype != torch.int64:
                raise ValueError(f"{path}: 'labels' must be int64, got {v.dtype}")
            continue
        if not v.is_floating_point():
            raise ValueError(f"{path}: state_dict entry {k!r} has dtype {v.dtype}, expected a floating dtype")
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{path}: state_dict entry {k!r} contains NaN or Inf (did the run that wrote it diverge?)")
    main, fields = ("bases", ("num_classes", "bpc", "base_channels")) if kind == "haba" else \
        ("images", ("num_classes", "ipc", "channels"))
    t = state.get(main)
    if t is None:
        raise ValueError(f"{path}: state_dict lacks {main!r}")
    try:
        K, per, ch = (int(args[f]) if f != "base_channels" or args.get(f) is not None else int(args["channels"])
                      for f in fields)
        H, W = pair(args["im_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: bad constructor args {dict(args)} ({type(exc).__name__}: {exc})") from exc
    if t.dim() != 4 or tuple(t.shape) != (K * per, ch, H, W):
        raise ValueError(f"{path}: {main!r} has shape {list(t.shape)}, which does not match its args {dict(args)} "
                         f"(they describe {[K * per, ch, H, W]})")
    if kind == "haba":
        ew = state.get("enc_weight")
        try:
            Hn, k, C = int(args.get("n_hallucinators", 5)), int(args.get("kernel_size", 3)), int(args["channels"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: bad constructor args {dict(args)} ({type(exc).__name__}: {exc})") from exc
        if ew is None or tuple(ew.shape) != (Hn, C, ch, k, k):
            raise ValueError(f"{path}: 'enc_weight' has shape {None if ew is None else list(ew.shape)}, which does "
                             f"not match its args {dict(args)} (they describe {[Hn, C, ch, k, k]})")


def _from_payload(payload: Mapping[str, Any], path: Path):
    kind = payload.get("kind")
    args = payload.get("args")
    state = payload.get("state_dict")
    if not isinstance(args, Mapping) or not isinstance(state, Mapping):
        raise ValueError(f"{path}: a {FORMAT} file needs 'args' and 'state_dict' entries (file damaged?)")
    classes = {"haba": HaBa, "pixels": Pixels}
    if not isinstance(kind, str) or kind not in classes:
        raise ValueError(f"{path}: unknown synthetic-set kind {kind!r} (expected 'haba' or 'pixels')")
    dtype_name = payload.get("dtype", "float32")
    dtype = _FLOAT_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise ValueError(f"{path}: dtype entry {dtype_name!r} is not one of {', '.join(_FLOAT_DTYPES)}")
    meta = payload.get("meta") or {}
    if not isinstance(meta, Mapping):
        raise ValueError(f"{path}: 'meta' must be a dict, got {type(meta).__name__}")
    _check_state(kind, args, state, path)
    try:
        obj = classes[kind](**dict(args))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: bad constructor args {dict(args)} ({exc})") from exc
    obj.to(dtype)
    try:
        obj.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: state dict does not match its args ({exc})") from exc
    if kind == "pixels" and not torch.equal(obj.labels, torch.arange(obj.num_classes).repeat_interleave(obj.ipc)):
        raise ValueError(f"{path}: 'labels' must be each class 0..{obj.num_classes - 1} repeated ipc={obj.ipc} times")
    obj.meta = dict(meta)
    lr = _check_meta_lr(obj.meta, path)
    if lr is not None:
        obj.meta["lr"] = lr
    return obj


def load_synthetic(path: PathLike, *, it: int | str = "best", num_classes: int | None = None):
    """Load a synthetic set: our ``.pt`` format, or a reference checkpoint (directory or ``images_<it>.pt``).

    Args:
        path: our checkpoint file; a reference run directory (``images_<it>.pt`` with
            ``weights_best.pt``/``styles_<it>.pt`` for HaBa, or ``labels_<it>.pt`` for pixels); or a
            reference ``images_<it>.pt`` file whose styles/labels file sits beside it.
        it: iteration to read from a reference directory (default ``"best"``).
        num_classes: K for reference checkpoints (default 10; not recorded in those files).

    Returns:
        ``Pixels`` or ``HaBa``, with ``.meta`` (dataset, lr, zca, ... when recorded).
    """
    p = Path(path)
    if p.is_dir():
        return _load_reference_dir(p, it, num_classes)
    if not p.exists():
        raise FileNotFoundError(f"synthetic-set checkpoint not found: {p} (expected our .pt file or a reference "
                                "checkpoint directory with images_<it>.pt)")
    obj = hio.torch_load(p, what="synthetic-set checkpoint")
    if isinstance(obj, Mapping) and "format" in obj:
        from haba_fast.checkpoint import FORMATS as RESUME_FORMATS

        if obj["format"] in RESUME_FORMATS:
            raise ValueError(
                f"{p} is a distillation run's resume state (checkpoint.pt), not a synthetic set: give the run's "
                "synthetic.pt or synthetic_best.pt (or continue the run with `haba-fast distill --resume`)"
            )
        if obj["format"] != FORMAT:
            raise ValueError(f"{p}: format {obj['format']!r} is not supported by this haba_fast (reads {FORMAT!r})")
        return _from_payload(obj, p)
    if isinstance(obj, Tensor):
        m = re.match(r"^images_(.+)\.pt$", p.name)
        if not m:
            raise ValueError(f"{p} holds a bare tensor; reference checkpoints are named images_<it>.pt so that "
                             "the styles/labels file beside it can be found")
        rit = m.group(1)
        return _load_reference_dir(p.parent, rit if rit == "best" else int(rit) if rit.isdigit() else rit, num_classes)
    if isinstance(obj, Mapping) and any(_HALL_KEY.match(str(k)) for k in obj):
        raise ValueError(f"{p} is a reference hallucinator (styles) file; pass its directory or the images_<it>.pt "
                         "file beside it")
    raise ValueError(f"{p} is not a synthetic-set checkpoint (no 'format' entry; expected {FORMAT!r} or a "
                     "reference images_<it>.pt)")
