"""Datasets as tensors, and ZCA whitening.

``load(name)`` returns a :class:`Dataset`: train and test images as float32 ``[N, C, H, W]`` tensors,
normalized the way the reference code (MTT / HaBa ``utils.get_dataset``) normalizes them, int64 labels,
class names and the transform applied, so that pictures can be mapped back to pixels.

Sources (nothing is ever downloaded; a missing file raises ``FileNotFoundError`` naming the expected paths):

- ``digits``: scikit-learn's embedded 8x8 digits (pixels / 16), a fixed stratified 3/4 : 1/4 split.
- ``mnist``, ``fashion-mnist``: idx files (``train-images-idx3-ubyte`` ..., plain or ``.gz``). Fashion-MNIST
  defaults to ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``).
- ``cifar10``, ``cifar100``: the "python version" pickles (``cifar-10-batches-py``, ``cifar-100-python``).
- ``svhn``: ``train_32x32.mat`` and ``test_32x32.mat`` (cropped digits; label 10 means digit 0).
- ``folder``: ``root/<class>/*.png|jpg`` (optionally ``root/train`` + ``root/test``), one image size.

The reference's torchvision folder layouts (``<root>/MNIST/raw``, ``<root>/FashionMNIST/raw``, ...) are
searched too, so the reference's ``--data_path`` works unchanged.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "REFERENCE_NAMES",
    "ZCA",
    "Dataset",
    "canonical_name",
    "check_test_images",
    "load",
    "read_idx",
    "zca_of_normalized",
]

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "svhn", "folder")

# The reference scripts spell datasets like this (buffer folders are named after them: <DATASET>[_NO_ZCA]).
REFERENCE_NAMES = {
    "mnist": "MNIST",
    "fashion-mnist": "FashionMNIST",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
    "svhn": "SVHN",
    "digits": "digits",
    "folder": "folder",
}

# Per-channel mean/std the reference normalizes with (MTT and HaBa utils.get_dataset, checked in their
# sources). Note: both reference repositories normalize CIFAR-100 with CIFAR-10's statistics, not with
# CIFAR-100's own (0.5071, 0.4866, 0.4409)/(0.2673, 0.2564, 0.2762); we follow the reference so that its
# expert buffers and checkpoints mean the same thing here.
REFERENCE_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2861,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}
# DC/DSA/DM's public code (DatasetCondensation utils.get_dataset): the same, except CIFAR-100's own statistics.
DC_REFERENCE_STATS = {**REFERENCE_STATS, "cifar100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762))}
# Whose statistics normalize: "mtt" (MTT's and HaBa's code) or "dc" (DC/DSA/DM's code).
STATISTICS = {"mtt": REFERENCE_STATS, "dc": DC_REFERENCE_STATS}


def statistics_for(objective: str) -> str:
    """The :data:`STATISTICS` of the code an objective comes from: ``mtt`` for trajectory matching, ``dc`` for
    dc, dsa and dm (they differ on CIFAR-100 only)."""
    return "mtt" if objective == "mtt" else "dc"

# Datasets the reference normalizes by mean/std whatever --zca says (its MNIST/FashionMNIST transform has no ZCA
# branch), so their ZCA is fit on normalized images; every other dataset is whitened from pixels in [0, 1].
_NORMALIZED_BEFORE_ZCA = frozenset({"mnist", "fashion-mnist"})


def zca_of_normalized(dataset) -> bool:
    """Whether ``dataset`` was mean/std-normalized before its ZCA (MNIST / Fashion-MNIST since 2026-12-03, as the
    reference; files made before whitened [0, 1] pixels, so buffers and sets record which)."""
    return getattr(dataset, "zca", None) is not None and any(m != 0.0 for m in (getattr(dataset, "mean", ()) or ()))


FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
DEFAULT_ROOT = "data"  # the reference scripts' default --data_path

FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")

_SPLIT_SEED = 0  # fixed: the digits / folder split must be the same in every run and on every machine
_TEST_FRACTION = 0.25


# --------------------------------------------------------------------------------------------- ZCA


class ZCA:
    """ZCA whitening exactly as the reference applies it (kornia ``ZCAWhitening(eps=0.1)``).

    Images are flattened to ``D = C*H*W`` features. ``fit`` computes, in float64,
    ``mu = mean(X)``, ``Sigma = (X - mu)^T (X - mu) / (N - 1) = U S U^T``; then
    ``transform(x) = (x - mu) T`` with ``T = U (S + eps)^(-1/2) U^T`` and
    ``inverse(y) = y U (S + eps)^(1/2) U^T + mu``. Both matrices are symmetric.

    Args:
        eps: regularizer added to the eigenvalues (the reference's 0.1).
    """

    def __init__(self, eps: float = 0.1):
        if not eps > 0:
            raise ValueError(f"ZCA eps must be > 0, got {eps}")
        self.eps = float(eps)
        self.mean: Tensor | None = None  # [D] float64
        self.eigvals: Tensor | None = None  # [D] float64, ascending, clamped at 0
        self.eigvecs: Tensor | None = None  # [D, D] float64, columns are eigenvectors
        self.shape: tuple[int, ...] | None = None  # per-sample shape seen by fit, e.g. (C, H, W)
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    @property
    def fitted(self) -> bool:
        return self.eigvecs is not None

    def fit(self, x: Tensor, chunk: int = 4096) -> ZCA:
        """Fit on training images ``x`` ``[N, ...]`` (float; N >= 2). Returns self.

        Runs on ``x``'s device (a GPU makes CIFAR's D=3072 fit take seconds); the fitted state lives on the CPU.
        """
        x = self._check_input(x, fitting=True)
        n = x.shape[0]
        flat = x.reshape(n, -1)
        d = flat.shape[1]
        # Two chunked passes in float64: the mean, then the centred scatter matrix. Centring before the
        # product keeps the covariance accurate; chunking keeps memory at D*D doubles (CIFAR: 75 MB).
        mean = torch.zeros(d, dtype=torch.float64, device=x.device)
        for i in range(0, n, chunk):
            mean += flat[i : i + chunk].to(torch.float64).sum(0)
        mean /= n
        cov = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        for i in range(0, n, chunk):
            c = flat[i : i + chunk].to(torch.float64) - mean
            cov.addmm_(c.T, c)
        cov /= n - 1
        s, u = torch.linalg.eigh(cov)
        self.mean = mean.cpu()
        # Sigma is PSD; rounding can leave eigenvalues at -1e-16. kornia's SVD returns |.|; 0 is as close.
        self.eigvals = s.clamp_min(0.0).cpu()
        self.eigvecs = u.cpu()
        self.shape = tuple(x.shape[1:])
        self._cache = {}
        return self

    def _matrices(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(T, T_inv)`` built in float64, cached per device/dtype (applying in float32 halves the cost)."""
        key = (str(device), dtype)
        if key not in self._cache:
            u, s = self.eigvecs, self.eigvals + self.eps
            t = (u * s.rsqrt()) @ u.T
            t_inv = (u * s.sqrt()) @ u.T
            self._cache[key] = (t.to(device=device, dtype=dtype), t_inv.to(device=device, dtype=dtype))
        return self._cache[key]

    @property
    def matrix(self) -> Tensor:
        """The whitening matrix ``T`` ``[D, D]`` (float64)."""
        self._require_fitted()
        return self._matrices(torch.device("cpu"), torch.float64)[0]

    @property
    def inverse_matrix(self) -> Tensor:
        """``T^-1 = U (S + eps)^(1/2) U^T`` ``[D, D]`` (float64)."""
        self._require_fitted()
        return self._matrices(torch.device("cpu"), torch.float64)[1]

    def transform(self, x: Tensor) -> Tensor:
        """Whiten ``x`` ``[..., *shape]`` -> same shape and dtype (computed in x's dtype on x's device)."""
        x = self._check_input(x)
        t, _ = self._matrices(x.device, x.dtype)
        lead = x.shape[: x.dim() - len(self.shape)]
        flat = x.reshape(-1, t.shape[0]) - self.mean.to(device=x.device, dtype=x.dtype)
        return (flat @ t).reshape(*lead, *self.shape)

    __call__ = transform

    def inverse(self, y: Tensor) -> Tensor:
        """Undo :meth:`transform`: ``y`` ``[..., *shape]`` -> pixels, same shape and dtype."""
        y = self._check_input(y)
        _, t_inv = self._matrices(y.device, y.dtype)
        lead = y.shape[: y.dim() - len(self.shape)]
        flat = y.reshape(-1, t_inv.shape[0]) @ t_inv + self.mean.to(device=y.device, dtype=y.dtype)
        return flat.reshape(*lead, *self.shape)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the transform exactly (float64 tensors; D*D doubles)."""
        self._require_fitted()
        return {
            "eps": self.eps,
            "shape": list(self.shape),
            "mean": self.mean.clone(),
            "eigvals": self.eigvals.clone(),
            "eigvecs": self.eigvecs.clone(),
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> ZCA:
        missing = [k for k in ("eps", "shape", "mean", "eigvals", "eigvecs") if k not in d]
        if missing:
            raise ValueError(f"ZCA state dict lacks {missing}; expected the output of ZCA.state_dict()")
        z = cls(eps=d["eps"])
        shape = tuple(int(v) for v in d["shape"])
        dim = int(np.prod(shape))
        mean = torch.as_tensor(d["mean"], dtype=torch.float64)
        eigvals = torch.as_tensor(d["eigvals"], dtype=torch.float64)
        eigvecs = torch.as_tensor(d["eigvecs"], dtype=torch.float64)
        if mean.shape != (dim,) or eigvals.shape != (dim,) or eigvecs.shape != (dim, dim):
            raise ValueError(
                f"ZCA state dict shapes do not fit shape {shape} (D={dim}): mean {tuple(mean.shape)}, "
                f"eigvals {tuple(eigvals.shape)}, eigvecs {tuple(eigvecs.shape)}"
            )
        z.mean, z.eigvals, z.eigvecs, z.shape = mean, eigvals, eigvecs, shape
        return z

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise ValueError("ZCA is not fitted: call fit(train_images) or ZCA.from_state_dict(...) first")

    def _check_input(self, x: Tensor, fitting: bool = False) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"ZCA expects a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"ZCA expects floating-point images (pixels in [0, 1]), got dtype {x.dtype}")
        if fitting:
            if x.dim() < 2 or x.shape[0] < 2:
                raise ValueError(f"ZCA.fit needs at least 2 samples [N, ...], got shape {tuple(x.shape)}")
            return x
        self._require_fitted()
        k = len(self.shape)
        if x.dim() < k or tuple(x.shape[x.dim() - k :]) != self.shape:
            raise ValueError(f"ZCA was fitted on samples of shape {self.shape}; got a tensor of shape {tuple(x.shape)}")
        return x


# ------------------------------------------------------------------------------------------ Dataset


@dataclass
class Dataset:
    """A labelled image dataset held in memory.

    Attributes:
        name: canonical dataset name (one of ``DATASETS``).
        train_images: ``[N, C, H, W]`` float32, normalized (``(pixel - mean) / std``) or ZCA-whitened.
        train_labels: ``[N]`` int64 in ``[0, num_classes)``.
        test_images: ``[M, C, H, W]`` float32, same transform as the train images.
        test_labels: ``[M]`` int64.
        class_names: ``num_classes`` names.
        mean, std: per-channel normalization applied (all 0 / all 1 when none was, e.g. with ZCA).
        zca: the fitted transform when the images are ZCA-whitened, else None.
    """

    name: str
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    class_names: list
    mean: tuple
    std: tuple
    zca: ZCA | None = None
    root: str | None = field(default=None, compare=False)

    @property
    def channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def im_size(self) -> tuple[int, int]:
        return (int(self.train_images.shape[2]), int(self.train_images.shape[3]))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def reference_name(self) -> str:
        """The reference scripts' spelling (``CIFAR10``, ``FashionMNIST``, ...), e.g. for buffer folders."""
        return REFERENCE_NAMES.get(self.name, self.name)

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shape = (-1, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return mean, std

    def denormalize(self, x: Tensor) -> Tensor:
        """Model-space images ``[..., C, H, W]`` -> pixels (about [0, 1]; not clamped). Inverts ZCA too (then
        the mean/std, identity unless the dataset was normalized before its ZCA)."""
        if self.zca is not None:
            x = self.zca.inverse(x)
        mean, std = self._stats(x)
        return x * std + mean

    def normalize(self, x: Tensor) -> Tensor:
        """Pixels in [0, 1] ``[..., C, H, W]`` -> the space the dataset's images live in (inverse of denormalize)."""
        mean, std = self._stats(x)
        x = (x - mean) / std
        return self.zca.transform(x) if self.zca is not None else x

    def class_indices(self) -> list[Tensor]:
        """For each class, the indices of its train images (``[n_c]`` int64, ascending)."""
        return [torch.nonzero(self.train_labels == c).flatten() for c in range(self.num_classes)]

    def to(self, device: str | torch.device) -> Dataset:
        """A copy with images and labels on ``device`` (the ZCA stays on the CPU; it moves lazily)."""
        return replace(
            self,
            train_images=self.train_images.to(device),
            train_labels=self.train_labels.to(device),
            test_images=self.test_images.to(device),
            test_labels=self.test_labels.to(device),
        )

    def __repr__(self) -> str:
        tf = "zca" if self.zca is not None else f"mean={self.mean}, std={self.std}"
        return (
            f"Dataset({self.name!r}, train={tuple(self.train_images.shape)}, test={tuple(self.test_images.shape)}, "
            f"classes={self.num_classes}, {tf})"
        )


# ----------------------------------------------------------------------------------------- helpers


def canonical_name(name: str) -> str:
    """Our name of a dataset from any accepted spelling (``FashionMNIST``, ``fashion_mnist`` -> ``fashion-mnist``).

    Raises:
        TypeError: not a str. ValueError: an unknown dataset (the message lists ours).
    """
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {type(name).__name__}")
    # Accept the reference's spellings too (FashionMNIST, CIFAR10, ...).
    key = name.strip().lower().replace("-", "").replace("_", "")
    for canon in DATASETS:
        if key == canon.replace("-", ""):
            return canon
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def _stratified_split(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed split: per class, a seeded permutation; the first round(n/4) go to test (at least 1 stays in train).

    NumPy's legacy ``RandomState`` stream is frozen by NumPy's compatibility policy, so the split is the same
    on every machine and version. Returns sorted (train_idx, test_idx).
    """
    rng = np.random.RandomState(_SPLIT_SEED)
    train, test = [], []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = min(round(len(idx) * _TEST_FRACTION), max(len(idx) - 1, 0))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _to_float(pixels: np.ndarray, scale: float) -> Tensor:
    # A fresh writable float32 copy (idx arrays are read-only views of the file's bytes), divided in float32
    # like torchvision's ToTensor, so pixel values match the reference bit for bit.
    return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).div_(scale)


def _labels(arr: Any, num_classes: int, path: str | Path) -> Tensor:
    y = np.asarray(arr).reshape(-1)
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{path}: labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{path}: labels must lie in [0, {num_classes}), found range [{y.min()}, {y.max()}]")
    return torch.from_numpy(y)


def _check_pair(images: Tensor, labels: Tensor, what: str) -> None:
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{what}: {images.shape[0]} images but {labels.shape[0]} labels")


def _missing(what: str, expected: Sequence[str | Path], searched: Sequence[str | Path], how: str):
    # Absolute paths: a relative default such as ./data is ambiguous in a message read later.
    lines = "\n  ".join(str(Path(p).absolute()) for p in expected)
    places = ", ".join(str(Path(p).absolute()) for p in searched)
    return FileNotFoundError(f"{what} not found. Expected files:\n  {lines}\n(searched: {places}). {how}")


# --------------------------------------------------------------------------------------------- idx

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (plain or gzip-compressed), validating magic and size against its header.

    Returns:
        The array, e.g. ``[N, 28, 28]`` uint8 for images or ``[N]`` uint8 for labels.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"idx file not found: {path}")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: corrupt or truncated gzip file ({exc}); re-fetch it") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(f"{path}: not an idx file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header ({len(raw)} bytes, needs {header})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = math.prod(dims) * dtype.itemsize  # Python ints: a header of huge dimensions cannot wrap around
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: header says shape {dims} ({expected} data bytes) but the file holds {len(raw) - header}: "
            "truncated or corrupt; re-fetch it"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _find_first(dirs: Sequence[Path], names: Sequence[str]) -> Path | None:
    for d in dirs:
        for n in names:
            p = d / n
            if p.is_file():
                return p
    return None


def _load_idx_dataset(name: str, root: str | None):
    pretty = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}[name]
    base = Path(root if root is not None else (FASHION_MNIST_ROOT if name == "fashion-mnist" else DEFAULT_ROOT))
    tv = "FashionMNIST" if name == "fashion-mnist" else "MNIST"  # torchvision's folder (the reference's layout)
    dirs = [base, base / tv / "raw", base / name]
    stems = {
        "train_images": "train-images-idx3-ubyte",
        "train_labels": "train-labels-idx1-ubyte",
        "test_images": "t10k-images-idx3-ubyte",
        "test_labels": "t10k-labels-idx1-ubyte",
    }
    found = {k: _find_first(dirs, [s, s + ".gz"]) for k, s in stems.items()}
    if any(v is None for v in found.values()):
        expected = [base / f"{s}[.gz]" for k, s in stems.items() if found[k] is None]
        how = (
            "Install it with `apt-get install dataset-fashion-mnist` (puts it in /usr/share/datasets/fashion-mnist) "
            "or download the four idx files from github.com/zalandoresearch/fashion-mnist"
            if name == "fashion-mnist"
            else "Download the four MNIST idx files (yann.lecun.com/exdb/mnist or a mirror)"
        ) + " and pass root= / --data_path to their folder; nothing is downloaded automatically."
        raise _missing(pretty, expected, dirs, how)
    arrays = {k: read_idx(p) for k, p in found.items()}
    out = []
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        px, py = found[f"{split}_images"], found[f"{split}_labels"]
        if x.ndim != 3 or x.dtype != np.uint8:
            raise ValueError(f"{px}: expected uint8 images [N, H, W], got {x.dtype} of shape {x.shape}")
        if y.ndim != 1:
            raise ValueError(f"{py}: expected labels [N], got shape {y.shape}")
        if len(x) != len(y):
            raise ValueError(f"{px} holds {len(x)} images but {py} holds {len(y)} labels")
        if split == "train" and (len(x) == 0 or min(x.shape[1:]) < 1):
            raise ValueError(f"{px}: no training images (shape {x.shape})")
        out.append((_to_float(x[:, None], 255.0), _labels(y, 10, py)))
    train_hw, test_hw = arrays["train_images"].shape[1:], arrays["test_images"].shape[1:]
    if train_hw != test_hw:
        raise ValueError(
            f"{found['train_images']} holds {train_hw[0]}x{train_hw[1]} images but {found['test_images']} "
            f"{test_hw[0]}x{test_hw[1]}: the two splits must be of one dataset"
        )
    classes = FASHION_CLASSES if name == "fashion-mnist" else [str(c) for c in range(10)]
    return out[0], out[1], list(classes), str(base)


# ------------------------------------------------------------------------------------------- CIFAR


class _SafeUnpickler(pickle.Unpickler):
    """Only what CIFAR's pickles need (numpy arrays, dicts, lists): a crafted pickle cannot run code."""

    def find_class(self, module: str, name: str):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
            mod = getattr(np, "_core", None) or np.core
            return getattr(mod.multiarray, name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.dtypes") and name == "dtype":
            return np.dtype
        if module == "_codecs" and name == "encode":
            import codecs

            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not part of a CIFAR batch)")


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise ValueError(f"{path}: not a readable CIFAR python pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")  # noqa: TRY004 (a corrupt file)
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[Tensor, Tensor]:
    d = _read_pickle(path)
    if "data" not in d or label_key not in d:
        raise ValueError(f"{path}: CIFAR batch lacks {'data' if 'data' not in d else label_key!r} (keys {list(d)})")
    x = d["data"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        desc = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"{path}: 'data' must be uint8 [N, 3072], got {desc}")
    y = _labels(d[label_key], num_classes, path)
    if len(y) != len(x):
        raise ValueError(f"{path}: {len(x)} images but {len(y)} labels")
    return _to_float(x.reshape(-1, 3, 32, 32), 255.0), y


def _names_from_meta(path: Path, key: str, fallback: list) -> list:
    if not path.is_file():
        return fallback
    names = _read_pickle(path).get(key)
    if not isinstance(names, (list, tuple)) or len(names) != len(fallback):
        raise ValueError(f"{path}: {key!r} must list {len(fallback)} class names")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _load_cifar(name: str, root: str | None):
    base = Path(root if root is not None else DEFAULT_ROOT)
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if name == "cifar10" else ["train", "test"]
    # root may be the extracted folder itself or its parent.
    candidates = [base / folder, base] if base.name != folder else [base]
    d = next((c for c in candidates if all((c / f).is_file() for f in files)), None)
    if d is None:
        tar = "cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz"
        tars = [c / tar for c in (base, base.parent) if (c / tar).is_file()]
        hint = f" Found {tars[0]}: extract it (tar xzf) next to itself." if tars else ""
        pretty = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
        how = (
            f"Download the {pretty} python version ({tar}, www.cs.toronto.edu/~kriz/cifar.html), extract it and "
            f"pass root= / --data_path to the folder holding {folder}; nothing is downloaded automatically.{hint}"
        )
        raise _missing(pretty, [candidates[0] / f for f in files], candidates, how)
    if name == "cifar10":
        parts = [_cifar_batch(d / f, "labels", 10) for f in files[:5]]
        train = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        test = _cifar_batch(d / "test_batch", "labels", 10)
        classes = _names_from_meta(d / "batches.meta", "label_names", CIFAR10_CLASSES)
    else:
        train = _cifar_batch(d / "train", "fine_labels", 100)
        test = _cifar_batch(d / "test", "fine_labels", 100)
        classes = _names_from_meta(d / "meta", "fine_label_names", [str(c) for c in range(100)])
    return train, test, classes, str(d)


# -------------------------------------------------------------------------------------------- SVHN


def _svhn_split(path: Path) -> tuple[Tensor, Tensor]:
    import scipy.io

    try:
        m = scipy.io.loadmat(str(path))
    except Exception as exc:  # scipy raises several types (ValueError, TypeError, MatReadError, ...)
        raise ValueError(f"{path}: not a readable SVHN .mat file ({type(exc).__name__}: {exc})") from exc
    if "X" not in m or "y" not in m:
        raise ValueError(f"{path}: SVHN .mat must hold 'X' and 'y' (found {sorted(k for k in m if k[0] != '_')})")
    x, y = m["X"], m["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[2] != 3:
        raise ValueError(f"{path}: 'X' must be uint8 [H, W, 3, N], got {x.dtype} {x.shape}")
    y = np.asarray(y).reshape(-1)
    if y.size and (not np.issubdtype(y.dtype, np.number) or y.min() < 0 or y.max() > 10):
        raise ValueError(f"{path}: 'y' must hold digit labels 1..10 (10 = digit 0)")
    y = np.where(y == 10, 0, y).astype(np.int64)
    images = _to_float(np.transpose(x, (3, 2, 0, 1)), 255.0)
    labels = _labels(y, 10, path)
    if len(images) != len(labels):
        raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels


def _load_svhn(root: str | None):
    base = Path(root if root is not None else DEFAULT_ROOT)
    dirs = [base, base / "svhn", base / "SVHN"]
    files = ["train_32x32.mat", "test_32x32.mat"]
    d = next((c for c in dirs if all((c / f).is_file() for f in files)), None)
    if d is None:
        how = (
            "Download train_32x32.mat and test_32x32.mat (ufldl.stanford.edu/housenumbers, format 2) and pass root= / "
            "--data_path to their folder; nothing is downloaded automatically."
        )
        raise _missing("SVHN", [base / f for f in files], dirs, how)
    return _svhn_split(d / files[0]), _svhn_split(d / files[1]), [str(c) for c in range(10)], str(d)


# ------------------------------------------------------------------------------------------ folder


def _image_files(d: Path) -> list[Path]:
    return sorted(
        p for p in d.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _class_dirs(d: Path) -> list[Path]:
    return sorted((p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


_GREY_MODES = ("1", "L", "LA")
_COLOUR_MODES = ("P", "RGB", "RGBA", "CMYK", "YCbCr", "PA", "RGBX")


def _read_images(files: list[Path]) -> Tensor:
    """Read images of one size; greyscale (1 channel) when every file is greyscale, else RGB."""
    from PIL import Image, UnidentifiedImageError

    pics, size = [], None
    for p in files:
        try:
            with Image.open(p) as im:
                im.load()
                pic = im.copy()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"{p}: not a readable image ({exc})") from exc
        if pic.mode not in _GREY_MODES + _COLOUR_MODES:
            raise ValueError(f"{p}: unsupported image mode {pic.mode!r} (use 8-bit greyscale or RGB images)")
        if size is None:
            size, first = pic.size, p
        elif pic.size != size:
            raise ValueError(
                f"{p}: size {pic.size[0]}x{pic.size[1]} differs from {first} ({size[0]}x{size[1]}); "
                "all images of a folder dataset must have one size (resize them first)"
            )
        pics.append(pic)
    grey = all(pic.mode in _GREY_MODES for pic in pics)
    arr = np.stack([np.asarray(pic.convert("L" if grey else "RGB"), dtype=np.uint8) for pic in pics])
    arr = arr[:, None] if grey else arr.transpose(0, 3, 1, 2)
    return _to_float(arr, 255.0)


def _scan(d: Path, classes: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    dirs = _class_dirs(d)
    names = [p.name for p in dirs]
    if classes is None:
        classes = names
    files, labels = [], []
    for p in dirs:
        if p.name not in classes:
            raise ValueError(f"{p}: class {p.name!r} is not among the training classes {classes}")
        f = _image_files(p)
        if not f:
            raise ValueError(f"{p}: class folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        files += f
        labels += [classes.index(p.name)] * len(f)
    return files, labels, classes


def _load_folder(root: str | None):
    if root is None:
        raise ValueError("dataset 'folder' needs root= (or --data_path): a folder with one sub-folder per class")
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(
            f"image folder not found: {base}. Expected {base}/<class>/*.png|jpg (or {base}/train/<class>/... and "
            f"{base}/test/<class>/...)"
        )
    train_dir = base / "train"
    test_dir = next((base / n for n in ("test", "val") if (base / n).is_dir()), None)
    split_dir = train_dir if train_dir.is_dir() else base
    if not _class_dirs(split_dir):
        raise FileNotFoundError(f"no class folders in {split_dir}: expected {split_dir}/<class>/*.png|jpg")
    files, labels, classes = _scan(split_dir)
    images = _read_images(files)
    y = torch.tensor(labels, dtype=torch.int64)
    if train_dir.is_dir() and test_dir is not None:
        if not _class_dirs(test_dir):
            raise FileNotFoundError(f"no class folders in {test_dir}: expected {test_dir}/<class>/*.png|jpg")
        tfiles, tlabels, _ = _scan(test_dir, classes)
        timages = _read_images(tfiles)
        if timages.shape[1:] != images.shape[1:]:
            raise ValueError(
                f"{test_dir}: test images are {tuple(timages.shape[1:])} but train images {tuple(images.shape[1:])}"
            )
        train, test = (images, y), (timages, torch.tensor(tlabels, dtype=torch.int64))
    else:
        tr, te = _stratified_split(np.asarray(labels), len(classes))
        tr, te = torch.from_numpy(tr), torch.from_numpy(te)
        train, test = (images[tr], y[tr]), (images[te], y[te])
    return train, test, classes, str(base)


def check_test_images(dataset) -> None:
    """Raise ``ValueError`` when ``dataset`` has no test images, saying why: for a folder dataset split per class
    (no test folder), how the split works and how many images a class needs for one of them to be tested."""
    if int(dataset.test_images.shape[0]) > 0:
        return
    name = getattr(dataset, "name", "?")
    root = getattr(dataset, "root", None)
    if name != "folder" or root is None:
        raise ValueError(f"dataset {name} has no test images")
    base = Path(root)
    split_dir = base / "train" if (base / "train").is_dir() else base
    counts = [f"{p.name} {len(_image_files(p))}" for p in _class_dirs(split_dir)] if split_dir.is_dir() else []
    listed = ", ".join(counts[:10]) + (f", ... ({len(counts)} classes)" if len(counts) > 10 else "")
    layout = "without train/ and test/ folders" if split_dir == base else "without a test/ or val/ folder beside train/"
    raise ValueError(
        f"the folder dataset {base} has no test images: {layout}, the n images of each {split_dir}/<class>/ are "
        f"split, round(n / 4) held out for testing and at least one kept for training, so a class needs 3 images or "
        f"more to have one tested (images per class here: {listed or 'none'}). Add images, or give "
        f"{base}/train/<class>/ and {base}/test/<class>/ folders"
    )


# ------------------------------------------------------------------------------------------ digits


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (pixels [1797, 8, 8] in 0..16, labels [1797]).

    Reads the CSV that ships inside scikit-learn directly when it is where scikit-learn keeps it: importing
    ``sklearn.datasets`` takes seconds (18 s measured on the loaded 2-core test machine) and every test that
    uses digits would pay for it. Falls back to ``sklearn.datasets.load_digits`` otherwise.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    if spec is None:
        raise ModuleNotFoundError("dataset 'digits' needs scikit-learn: pip install scikit-learn")
    for loc in spec.submodule_search_locations or []:
        csv = Path(loc) / "datasets" / "data" / "digits.csv.gz"
        if csv.is_file():
            table = np.loadtxt(csv, delimiter=",", dtype=np.float64)
            if table.shape == (1797, 65):
                return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target.astype(np.int64)


def _load_digits():
    images, y = _digits_arrays()
    x = images.astype(np.float32) / 16.0  # 0..16 -> [0, 1]
    tr, te = _stratified_split(y, 10)
    images = torch.from_numpy(x[:, None])
    labels = torch.from_numpy(y)
    tr, te = torch.from_numpy(tr), torch.from_numpy(te)
    return (images[tr], labels[tr]), (images[te], labels[te]), [str(c) for c in range(10)], None


# -------------------------------------------------------------------------------------------- load


def _subset(images: Tensor, labels: Tensor, k: int, num_classes: int, generator: torch.Generator | None):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"subset_per_class must be a positive int, got {k!r}")
    keep = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < k:
            raise ValueError(f"subset_per_class={k}, but class {c} has only {len(idx)} training images")
        if generator is not None:
            idx = idx[torch.randperm(len(idx), generator=generator)[:k]]
        keep.append(idx[:k])
    keep = torch.cat(keep).sort().values  # keep the file order
    return images[keep], labels[keep]


def load(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    zca: bool = False,
    normalize: bool = True,
    subset_per_class: int | None = None,
    generator: torch.Generator | None = None,
    statistics: str = "mtt",
) -> Dataset:
    """Load a dataset into memory.

    Args:
        name: one of ``DATASETS`` (the reference's spellings such as ``FashionMNIST``/``CIFAR10`` work too).
        root: folder holding the files (``folder``: required). Default: Debian's folder for Fashion-MNIST,
            ``./data`` (the reference's ``--data_path``) otherwise; ``digits`` needs none.
        zca: ZCA-whiten (DESIGN.md; the reference's ``--zca``): the transform fit on the returned train images
            and applied to train and test, from pixels in [0, 1] (no mean/std), except MNIST and Fashion-MNIST,
            which the reference normalizes first (``normalize`` still applies to them).
        normalize: subtract the per-dataset mean and divide by the std, as the reference does (``digits`` and
            ``folder``: statistics of their own train split). False: pixels in [0, 1].
        subset_per_class: keep only k train images per class (the first k in file order, or k random ones drawn
            with ``generator``); the test set is kept whole.
        generator: draws the subset (the global RNG is never used).
        statistics: whose per-channel mean/std normalize (:data:`STATISTICS`): ``"mtt"`` (MTT's and HaBa's code,
            CIFAR-100 with CIFAR-10's statistics) or ``"dc"`` (DC/DSA/DM's code: CIFAR-100's own);
            :func:`statistics_for` maps an objective to it.

    Returns:
        A :class:`Dataset` (images float32 ``[N, C, H, W]``, labels int64 ``[N]``).

    Raises:
        ValueError: unknown name, bad arguments, corrupt or inconsistent files (the message names the file).
        FileNotFoundError: missing files (the message lists the expected paths and where the data comes from).
    """
    if statistics not in STATISTICS:
        raise ValueError(f"statistics must be one of {', '.join(STATISTICS)}, got {statistics!r}")
    canon = canonical_name(name)
    if root is not None:
        root = os.path.expanduser(os.fspath(root))
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if canon == "digits":
        train, test, classes, where = _load_digits()
    elif canon in ("mnist", "fashion-mnist"):
        train, test, classes, where = _load_idx_dataset(canon, root)
    elif canon in ("cifar10", "cifar100"):
        train, test, classes, where = _load_cifar(canon, root)
    elif canon == "svhn":
        train, test, classes, where = _load_svhn(root)
    else:
        train, test, classes, where = _load_folder(root)
    (x_train, y_train), (x_test, y_test) = train, test
    _check_pair(x_train, y_train, f"{canon} train split")
    _check_pair(x_test, y_test, f"{canon} test split")
    channels = x_train.shape[1]

    if canon in STATISTICS[statistics]:
        mean, std = STATISTICS[statistics][canon]
    else:  # digits / folder: statistics of the full train split, before any subset, so they never change
        mean = tuple(float(v) for v in x_train.mean(dim=(0, 2, 3), dtype=torch.float64))
        std = tuple(float(v) for v in x_train.to(torch.float64).std(dim=(0, 2, 3), unbiased=False))
        std = tuple(s if s > 0 else 1.0 for s in std)

    if subset_per_class is not None:
        x_train, y_train = _subset(x_train, y_train, subset_per_class, len(classes), generator)

    if normalize and (not zca or canon in _NORMALIZED_BEFORE_ZCA):
        # torchvision's Normalize order (subtract, then divide, in float32), so values match the reference's bits.
        m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        x_train = x_train.sub_(m).div_(s) if x_train.is_contiguous() else (x_train - m) / s
        x_test = x_test.sub_(m).div_(s) if x_test.is_contiguous() else (x_test - m) / s
    else:
        mean, std = (0.0,) * channels, (1.0,) * channels
    fitted = None
    if zca:
        fitted = ZCA(eps=0.1).fit(x_train)
        x_train, x_test = fitted.transform(x_train), fitted.transform(x_test)

    return Dataset(
        name=canon,
        train_images=x_train.contiguous(),
        train_labels=y_train.contiguous(),
        test_images=x_test.contiguous(),
        test_labels=y_test.contiguous(),
        class_names=list(classes),
        mean=tuple(mean),
        std=tuple(std),
        zca=fitted,
        root=where,
    )
