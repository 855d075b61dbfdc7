"""Writers of tiny dataset files in each on-disk format haba_fast.data reads (for tests).

Each writer takes uint8 pixels and int labels and lays them out as the real datasets do, so a loader's
output can be compared pixel for pixel with what was written.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np


def write_idx(path, array: np.ndarray) -> Path:
    """An idx file of uint8 ``array`` (any ndim); gzip-compressed when ``path`` ends in ``.gz``."""
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    return path


def write_mnist(root, train_x, train_y, test_x, test_y, gz: bool = False) -> Path:
    """The four MNIST-style idx files in ``root`` (images ``[N, H, W]`` uint8, labels ``[N]``)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    write_idx(root / f"train-images-idx3-ubyte{ext}", train_x)
    write_idx(root / f"train-labels-idx1-ubyte{ext}", train_y)
    write_idx(root / f"t10k-images-idx3-ubyte{ext}", test_x)
    write_idx(root / f"t10k-labels-idx1-ubyte{ext}", test_y)
    return root


def _dump(path: Path, obj: dict) -> None:
    # The real batches were written by Python 2: bytes keys, protocol 2.
    with open(path, "wb") as f:
        pickle.dump({k.encode(): v for k, v in obj.items()}, f, protocol=2)


def write_cifar10(root, batches, test, label_names=None) -> Path:
    """``root/cifar-10-batches-py``: ``batches`` = 5 pairs (images ``[n, 3, 32, 32]`` uint8, labels), ``test``."""
    d = Path(root) / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    for i, (x, y) in enumerate(batches, 1):
        _dump(d / f"data_batch_{i}", {"data": x.reshape(len(x), -1), "labels": [int(v) for v in y]})
    _dump(d / "test_batch", {"data": test[0].reshape(len(test[0]), -1), "labels": [int(v) for v in test[1]]})
    if label_names is not None:
        _dump(d / "batches.meta", {"label_names": [n.encode() for n in label_names]})
    return d


def write_cifar100(root, train, test, fine_names=None) -> Path:
    """``root/cifar-100-python/{train,test}`` with fine and (dummy) coarse labels."""
    d = Path(root) / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    for name, (x, y) in (("train", train), ("test", test)):
        y = [int(v) for v in y]
        _dump(d / name, {"data": x.reshape(len(x), -1), "fine_labels": y, "coarse_labels": [v // 5 for v in y]})
    if fine_names is not None:
        _dump(d / "meta", {"fine_label_names": [n.encode() for n in fine_names]})
    return d


def write_svhn(root, train, test) -> Path:
    """``train_32x32.mat``/``test_32x32.mat``: X ``[H, W, 3, N]`` uint8, y ``[N, 1]`` with 10 for digit 0."""
    import scipy.io

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name, (x, y) in (("train", train), ("test", test)):
        y = np.where(np.asarray(y) == 0, 10, y).astype(np.uint8).reshape(-1, 1)
        scipy.io.savemat(str(root / f"{name}_32x32.mat"), {"X": np.transpose(x, (2, 3, 1, 0)), "y": y})
    return root


def write_folder(root, images, labels, class_names, ext: str = ".png") -> Path:
    """``root/<class>/<i>.png``: images ``[N, C, H, W]`` uint8 (C = 1 -> mode L, 3 -> RGB)."""
    from PIL import Image

    root = Path(root)
    for i, (x, y) in enumerate(zip(images, labels)):
        d = root / class_names[int(y)]
        d.mkdir(parents=True, exist_ok=True)
        arr = x[0] if x.shape[0] == 1 else np.transpose(x, (1, 2, 0))
        Image.fromarray(np.ascontiguousarray(arr)).save(d / f"{i:04d}{ext}")
    return root


def random_uint8(rng: np.random.Generator, *shape) -> np.ndarray:
    return rng.integers(0, 256, size=shape, dtype=np.uint8)
