"""haba_fast.data: every format round-trips pixels and labels exactly; corrupt files fail clearly; ZCA = DESIGN.md."""

from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest
import torch
from data_fixtures import (
    random_uint8,
    write_cifar10,
    write_cifar100,
    write_folder,
    write_idx,
    write_mnist,
    write_svhn,
)
from utils import devices

from haba_fast import data
from haba_fast.data import DATASETS, ZCA, load, read_idx

FMNIST = data.FASHION_MNIST_ROOT
HAS_FMNIST = os.path.isfile(os.path.join(FMNIST, "train-images-idx3-ubyte.gz")) or os.path.isfile(
    os.path.join(FMNIST, "train-images-idx3-ubyte")
)
requires_fmnist = pytest.mark.skipif(
    not HAS_FMNIST, reason=f"Fashion-MNIST not in {FMNIST} (apt-get install dataset-fashion-mnist)"
)




def pixels(u8: np.ndarray) -> torch.Tensor:
    """What a loader must return for uint8 pixels with normalize=False: value / 255 in float32."""
    return torch.from_numpy(u8.astype(np.float32)) / 255.0


# ------------------------------------------------------------------------------------- ZCA oracle


def zca_numpy(train: np.ndarray, eps: float = 0.1):
    """DESIGN.md's ZCA, straight from the formula, in float64 numpy: returns (mu, T, T_inv)."""
    x = train.reshape(len(train), -1).astype(np.float64)
    mu = x.mean(0)
    c = x - mu
    sigma = c.T @ c / (len(x) - 1)
    s, u = np.linalg.eigh(sigma)  # Sigma = U S U^T
    t = u @ np.diag((s + eps) ** -0.5) @ u.T
    t_inv = u @ np.diag((s + eps) ** 0.5) @ u.T
    return mu, t, t_inv


def zca_apply(x: np.ndarray, mu, t) -> np.ndarray:
    return ((x.reshape(len(x), -1).astype(np.float64) - mu) @ t).reshape(x.shape)


# ------------------------------------------------------------------------------------------ names


def test_unknown_name_lists_all_datasets():
    with pytest.raises(ValueError) as e:
        load("imagenet-9000")
    for name in DATASETS:
        assert name in str(e.value)


@pytest.mark.parametrize(
    "spelling, canon",
    [
        ("FashionMNIST", "fashion-mnist"),
        ("fashion_mnist", "fashion-mnist"),
        ("CIFAR10", "cifar10"),
        ("CIFAR100", "cifar100"),
        ("SVHN", "svhn"),
        ("MNIST", "mnist"),
        ("digits", "digits"),
    ],
)
def test_reference_spellings_are_accepted(spelling, canon):
    assert data.canonical_name(spelling) == canon


def test_name_must_be_str():
    with pytest.raises(TypeError):
        load(10)


# ----------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_raw():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def test_digits_shapes_and_split(digits_raw):
    x_all, y_all = digits_raw
    d = load("digits", normalize=False)
    assert d.train_images.shape[1:] == (1, 8, 8) and d.train_images.dtype == torch.float32
    assert d.train_labels.dtype == torch.int64
    assert (d.channels, d.im_size, d.num_classes) == (1, (8, 8), 10)
    assert d.class_names == [str(c) for c in range(10)]
    assert len(d.train_images) + len(d.test_images) == len(x_all) == 1797
    # Stratified: each class contributes round(n/4) images to test.
    for c in range(10):
        n = int((y_all == c).sum())
        assert int((d.test_labels == c).sum()) == round(n / 4)
    # Train and test are a partition of the 1797 images, labels attached to the right images.
    ref = {}
    for x, y in zip(x_all.reshape(1797, -1), y_all):
        ref.setdefault(x.tobytes(), []).append(int(y))
    got = {}
    for x, y in zip(
        torch.cat([d.train_images, d.test_images]).reshape(1797, -1).numpy(),
        torch.cat([d.train_labels, d.test_labels]).tolist(),
    ):
        got.setdefault(x.tobytes(), []).append(y)
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in ref.items()}
    assert 0.0 <= float(d.train_images.min()) and float(d.train_images.max()) == 1.0


def test_digits_split_is_fixed():
    a, b = load("digits"), load("digits")
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    # Pin the split itself (not only self-consistency): it must never change between runs, machines, versions.
    _, test_idx = data._stratified_split(data._digits_arrays()[1], 10)
    assert test_idx[:12].tolist() == [3, 7, 13, 16, 19, 22, 26, 36, 38, 43, 47, 48]
    assert (len(test_idx), int(test_idx.sum())) == (450, 386702)


def test_digits_direct_read_equals_sklearn(digits_raw):
    x, y = data._digits_arrays()  # reads scikit-learn's CSV without importing sklearn.datasets
    assert np.array_equal(x / 16.0, digits_raw[0]) and np.array_equal(y, digits_raw[1])


def test_digits_normalization_stats():
    d = load("digits")
    assert d.train_images.mean().abs() < 1e-5
    assert abs(float(d.train_images.std(unbiased=False)) - 1.0) < 1e-5
    raw = load("digits", normalize=False)
    expected = (raw.test_images - d.mean[0]) / d.std[0]
    torch.testing.assert_close(d.test_images, expected)
    torch.testing.assert_close(d.denormalize(d.test_images), raw.test_images)
    torch.testing.assert_close(d.normalize(raw.train_images), d.train_images)
    assert raw.mean == (0.0,) and raw.std == (1.0,)


def test_subset_first_k_and_seeded():
    full = load("digits", normalize=False)
    first = load("digits", normalize=False, subset_per_class=3)
    assert len(first.train_labels) == 30 and torch.bincount(first.train_labels).tolist() == [3] * 10
    for c in range(10):
        torch.testing.assert_close(
            first.train_images[first.train_labels == c], full.train_images[full.train_labels == c][:3]
        )
    assert torch.equal(first.test_images, full.test_images)  # the test set stays whole
    state = torch.random.get_rng_state()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    r1 = load("digits", subset_per_class=4, generator=g1)
    r2 = load("digits", subset_per_class=4, generator=g2)
    r3 = load("digits", subset_per_class=4, generator=torch.Generator().manual_seed(6))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert torch.equal(r1.train_images, r2.train_images)
    assert not torch.equal(r1.train_images, r3.train_images)
    assert r1.mean == load("digits").mean  # stats come from the full split, not the subset


@pytest.mark.parametrize("k", [0, -1, 1.5, 10_000])
def test_subset_bad_values(k):
    with pytest.raises(ValueError, match="subset_per_class"):
        load("digits", subset_per_class=k)


def test_generator_type_checked():
    with pytest.raises(TypeError, match="generator"):
        load("digits", subset_per_class=2, generator=0)


def test_dataset_helpers():
    d = load("digits", subset_per_class=2)
    idx = d.class_indices()
    assert [len(i) for i in idx] == [2] * 10 and all((d.train_labels[i] == c).all() for c, i in enumerate(idx))
    assert d.to("cpu").train_images.data_ptr() == d.train_images.data_ptr()
    assert d.reference_name == "digits" and "digits" in repr(d)


# -------------------------------------------------------------------------------------------- idx


@pytest.fixture
def idx_arrays():
    rng = np.random.default_rng(0)
    # Odd, non-square sizes and a prime count: nothing may assume 28x28 or round numbers.
    return (
        random_uint8(rng, 13, 7, 5),
        rng.integers(0, 10, 13).astype(np.uint8),
        random_uint8(rng, 11, 7, 5),
        rng.integers(0, 10, 11).astype(np.uint8),
    )


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_round_trip(tmp_path, idx_arrays, gz, name):
    tx, ty, vx, vy = idx_arrays
    write_mnist(tmp_path, tx, ty, vx, vy, gz=gz)
    d = load(name, tmp_path, normalize=False)
    torch.testing.assert_close(d.train_images, pixels(tx)[:, None], rtol=0, atol=0)
    torch.testing.assert_close(d.test_images, pixels(vx)[:, None], rtol=0, atol=0)
    assert d.train_labels.tolist() == ty.tolist() and d.test_labels.tolist() == vy.tolist()
    assert d.im_size == (7, 5) and d.channels == 1
    assert d.class_names[0] == ("T-shirt/top" if name == "fashion-mnist" else "0")
    n = load(name, tmp_path)
    m, s = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2861, 0.3530)}[name]
    assert n.mean == (m,) and n.std == (s,)
    torch.testing.assert_close(n.train_images, (pixels(tx)[:, None] - m) / s, rtol=0, atol=0)


def test_idx_torchvision_layout(tmp_path, idx_arrays):
    write_mnist(tmp_path / "MNIST" / "raw", *idx_arrays)
    d = load("MNIST", tmp_path, normalize=False)
    assert d.train_labels.tolist() == idx_arrays[1].tolist()


def _corrupt_variants(tmp_path, tx):
    good = write_idx(tmp_path / "good", tx).read_bytes()
    return {
        "bad magic": b"\x01\x02" + good[2:],
        "bad dtype": good[:2] + b"\x42" + good[3:],
        "truncated data": good[:-7],
        "trailing bytes": good + b"\x00\x00",
        "truncated header": good[:9],
        "empty": b"",
    }


@pytest.mark.parametrize(
    "kind", ["bad magic", "bad dtype", "truncated data", "trailing bytes", "truncated header", "empty"]
)
def test_idx_corrupt_raises(tmp_path, idx_arrays, kind):
    tx, ty, vx, vy = idx_arrays
    write_mnist(tmp_path, tx, ty, vx, vy)
    target = tmp_path / "train-images-idx3-ubyte"
    target.write_bytes(_corrupt_variants(tmp_path, tx)[kind])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        load("mnist", tmp_path)


def test_idx_truncated_gzip_raises(tmp_path, idx_arrays):
    tx, ty, vx, vy = idx_arrays
    write_mnist(tmp_path, tx, ty, vx, vy, gz=True)
    p = tmp_path / "t10k-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-20])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        load("mnist", tmp_path)
    p.write_bytes(b"this is not gzip at all")
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        load("mnist", tmp_path)


def test_idx_count_mismatch_and_label_range(tmp_path, idx_arrays):
    tx, ty, vx, vy = idx_arrays
    write_mnist(tmp_path, tx, ty[:-1], vx, vy)
    with pytest.raises(ValueError, match="13 images but .*12 labels"):
        load("mnist", tmp_path)
    bad = vy.copy()
    bad[3] = 10
    write_mnist(tmp_path, tx, ty, vx, bad)
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte"):
        load("mnist", tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", tx.reshape(13, -1))  # 2-d: not images
    with pytest.raises(ValueError, match="train-images"):
        load("mnist", tmp_path)


def test_read_idx_gz_and_plain_equal(tmp_path, idx_arrays):
    tx = idx_arrays[0]
    a = read_idx(write_idx(tmp_path / "a", tx))
    b = read_idx(write_idx(tmp_path / "a.gz", tx))
    assert np.array_equal(a, tx) and np.array_equal(b, tx)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_missing_lists_paths(tmp_path, idx_arrays, name):
    tx, _ty, _vx, _vy = idx_arrays
    write_idx(tmp_path / "train-images-idx3-ubyte", tx)
    with pytest.raises(FileNotFoundError) as e:
        load(name, tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "t10k-images-idx3-ubyte") in msg and "train-labels-idx1-ubyte" in msg
    assert "train-images" not in msg.split("(searched")[0]  # the present file is not listed as missing
    if name == "fashion-mnist":
        assert "apt-get install dataset-fashion-mnist" in msg


# ------------------------------------------------------------------------------------------ CIFAR


@pytest.fixture
def cifar10_files(tmp_path):
    rng = np.random.default_rng(1)
    batches = [(random_uint8(rng, n, 3, 32, 32), rng.integers(0, 10, n)) for n in (3, 2, 5, 1, 3)]
    test = (random_uint8(rng, 7, 3, 32, 32), rng.integers(0, 10, 7))
    names = [f"class{i}" for i in range(10)]
    d = write_cifar10(tmp_path, batches, test, label_names=names)
    return tmp_path, d, batches, test, names


@pytest.mark.parametrize("point_at", ["parent", "folder"])
def test_cifar10_round_trip(cifar10_files, point_at):
    root, folder, batches, test, names = cifar10_files
    d = load("cifar10", root if point_at == "parent" else folder, normalize=False)
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    torch.testing.assert_close(d.train_images, pixels(x), rtol=0, atol=0)
    assert d.train_labels.tolist() == y.tolist() and d.test_labels.tolist() == test[1].tolist()
    torch.testing.assert_close(d.test_images, pixels(test[0]), rtol=0, atol=0)
    assert d.class_names == names and d.reference_name == "CIFAR10"
    n = load("cifar10", root)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    assert n.mean == mean and n.std == std
    expected = (pixels(x) - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(n.train_images, expected, rtol=0, atol=0)
    torch.testing.assert_close(n.denormalize(n.train_images), pixels(x))


def test_cifar_python2_numpy1_pickles(cifar10_files):
    # The real batches name numpy 1's module (numpy.core.multiarray); our writer used numpy 2's spelling.
    root, folder, batches, *_ = cifar10_files
    p = folder / "data_batch_2"
    raw = p.read_bytes()
    if b"numpy._core.multiarray" in raw:
        p.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert b"numpy.core.multiarray\n_reconstruct" in p.read_bytes()
    d = load("cifar10", root, normalize=False)
    torch.testing.assert_close(d.train_images[3:5], pixels(batches[1][0]), rtol=0, atol=0)


def test_cifar10_default_class_names_without_meta(cifar10_files):
    root, folder, *_ = cifar10_files
    (folder / "batches.meta").unlink()
    assert load("cifar10", root).class_names == data.CIFAR10_CLASSES


def test_cifar100_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    train = (random_uint8(rng, 9, 3, 32, 32), rng.integers(0, 100, 9))
    test = (random_uint8(rng, 4, 3, 32, 32), rng.integers(0, 100, 4))
    names = [f"fine{i}" for i in range(100)]
    write_cifar100(tmp_path, train, test, fine_names=names)
    d = load("cifar100", tmp_path, normalize=False)
    torch.testing.assert_close(d.train_images, pixels(train[0]), rtol=0, atol=0)
    torch.testing.assert_close(d.test_images, pixels(test[0]), rtol=0, atol=0)
    assert d.train_labels.tolist() == train[1].tolist() and d.test_labels.tolist() == test[1].tolist()
    assert d.num_classes == 100 and d.class_names == names
    # The reference normalizes CIFAR-100 with CIFAR-10's statistics (MTT and HaBa utils.get_dataset).
    assert load("cifar100", tmp_path).mean == (0.4914, 0.4822, 0.4465)


def test_cifar_missing_lists_paths(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load("cifar10", tmp_path)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in str(e.value)
    assert "cifar-10-python.tar.gz" in str(e.value)
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="extract it"):
        load("cifar100", tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    "kind", ["garbage", "truncated", "evil", "not a dict", "no labels", "bad shape", "count mismatch", "label range"]
)
def test_cifar_corrupt_raises(cifar10_files, kind):
    root, folder, batches, *_ = cifar10_files
    p = folder / "data_batch_3"
    x, y = batches[2]
    payloads = {
        "garbage": b"\x00not a pickle\xff",
        "truncated": p.read_bytes()[: len(p.read_bytes()) // 2],
        "evil": pickle.dumps(_Evil(), protocol=2),
        "not a dict": pickle.dumps([1, 2, 3], protocol=2),
        "no labels": pickle.dumps({b"data": x.reshape(len(x), -1)}, protocol=2),
        "bad shape": pickle.dumps({b"data": x.reshape(len(x), 3, -1), b"labels": list(y)}, protocol=2),
        "count mismatch": pickle.dumps({b"data": x.reshape(len(x), -1), b"labels": [0] * (len(x) + 1)}, protocol=2),
        "label range": pickle.dumps({b"data": x.reshape(len(x), -1), b"labels": [10] * len(x)}, protocol=2),
    }
    p.write_bytes(payloads[kind])
    with pytest.raises(ValueError, match="data_batch_3"):
        load("cifar10", root)


# ------------------------------------------------------------------------------------------- SVHN


@pytest.fixture
def svhn_files(tmp_path):
    rng = np.random.default_rng(3)
    train = (random_uint8(rng, 6, 3, 32, 32), np.array([0, 1, 9, 0, 5, 3]))
    test = (random_uint8(rng, 5, 3, 32, 32), np.array([2, 0, 7, 7, 1]))
    write_svhn(tmp_path, train, test)
    return tmp_path, train, test


def test_svhn_round_trip(svhn_files):
    root, train, test = svhn_files
    d = load("svhn", root, normalize=False)
    torch.testing.assert_close(d.train_images, pixels(train[0]), rtol=0, atol=0)
    torch.testing.assert_close(d.test_images, pixels(test[0]), rtol=0, atol=0)
    assert d.train_labels.tolist() == train[1].tolist()  # label 10 in the file is digit 0
    assert d.test_labels.tolist() == test[1].tolist()
    assert load("svhn", root).std == (0.1980, 0.2010, 0.1970)


def test_svhn_corrupt_and_missing(svhn_files, tmp_path_factory):
    import scipy.io

    root, _train, _ = svhn_files
    p = root / "test_32x32.mat"
    p.write_bytes(b"MATLAB 5.0 MAT-file, garbage" + b"\x00" * 50)
    with pytest.raises(ValueError, match="test_32x32.mat"):
        load("svhn", root)
    scipy.io.savemat(str(p), {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((3, 1), np.uint8)})
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        load("svhn", root)
    scipy.io.savemat(str(p), {"images": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="'X' and 'y'"):
        load("svhn", root)
    empty = tmp_path_factory.mktemp("nosvhn")
    with pytest.raises(FileNotFoundError) as e:
        load("svhn", empty)
    assert str(empty / "train_32x32.mat") in str(e.value) and str(empty / "test_32x32.mat") in str(e.value)


# ----------------------------------------------------------------------------------------- folder


@pytest.mark.parametrize("channels", [1, 3])
def test_folder_with_train_test(tmp_path, channels):
    rng = np.random.default_rng(4)
    names = ["zebra", "apple", "mango"]  # not sorted on purpose
    tx, ty = random_uint8(rng, 7, channels, 5, 3), np.array([0, 1, 2, 2, 1, 0, 1])
    vx, vy = random_uint8(rng, 4, channels, 5, 3), np.array([2, 0, 1, 1])
    write_folder(tmp_path / "train", tx, ty, names)
    write_folder(tmp_path / "test", vx, vy, names)
    d = load("folder", tmp_path, normalize=False)
    assert d.class_names == sorted(names) and d.channels == channels and d.im_size == (5, 3)
    remap = {i: sorted(names).index(n) for i, n in enumerate(names)}
    # Files are read class by class in sorted order; compare as (label, pixels) multisets in that order.
    for imgs, labs, x, y in ((d.train_images, d.train_labels, tx, ty), (d.test_images, d.test_labels, vx, vy)):
        order = sorted(range(len(y)), key=lambda i: (remap[int(y[i])], i))
        assert labs.tolist() == [remap[int(y[i])] for i in order]
        torch.testing.assert_close(imgs, pixels(x[order]), rtol=0, atol=0)
    n = load("folder", tmp_path)
    assert len(n.mean) == channels
    torch.testing.assert_close(n.train_images.mean(dim=(0, 2, 3)), torch.zeros(channels), atol=1e-5, rtol=0)


def test_folder_fixed_split(tmp_path):
    rng = np.random.default_rng(5)
    x, y = random_uint8(rng, 20, 3, 4, 4), np.repeat([0, 1], 10)
    write_folder(tmp_path, x, y, ["a", "b"], ext=".png")
    a, b = load("folder", tmp_path, normalize=False), load("folder", tmp_path, normalize=False)
    assert torch.equal(a.test_images, b.test_images)
    assert a.test_labels.bincount().tolist() == [2, 2] and a.train_labels.bincount().tolist() == [8, 8]
    both = torch.cat([a.train_images, a.test_images])
    assert sorted(map(bytes, (both * 255).round().to(torch.uint8).reshape(20, -1).numpy())) == sorted(
        map(bytes, x.reshape(20, -1))
    )


def test_folder_errors(tmp_path):
    rng = np.random.default_rng(6)
    write_folder(tmp_path, random_uint8(rng, 4, 3, 6, 6), [0, 0, 1, 1], ["a", "b"])
    from PIL import Image

    Image.fromarray(random_uint8(rng, 7, 6, 3)).save(tmp_path / "b" / "odd.png")
    with pytest.raises(ValueError, match="odd.png"):
        load("folder", tmp_path)
    (tmp_path / "b" / "odd.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="odd.png"):
        load("folder", tmp_path)
    (tmp_path / "b" / "odd.png").unlink()
    (tmp_path / "c").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load("folder", tmp_path)
    with pytest.raises(ValueError, match="root"):
        load("folder")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load("folder", tmp_path / "nowhere")


def test_folder_jpg_and_mixed_modes(tmp_path):
    rng = np.random.default_rng(7)
    write_folder(tmp_path, random_uint8(rng, 2, 1, 8, 8), [0, 1], ["a", "b"], ext=".jpg")
    assert load("folder", tmp_path).channels == 1
    write_folder(tmp_path, random_uint8(rng, 1, 3, 8, 8), [1], ["a", "b"], ext=".png")  # one RGB file
    d = load("folder", tmp_path, normalize=False)
    assert d.channels == 3 and len(d.train_images) + len(d.test_images) == 3


# -------------------------------------------------------------------------------------------- ZCA


@pytest.mark.parametrize("n, shape", [(17, (2, 3, 5)), (7, (1, 4, 4)), (40, (3, 2, 2))])
def test_zca_matches_formula(n, shape):
    rng = np.random.default_rng(8)
    train = rng.random((n, *shape))
    test = rng.random((5, *shape))
    z = ZCA().fit(torch.from_numpy(train))
    mu, t, t_inv = zca_numpy(train)
    np.testing.assert_allclose(z.matrix.numpy(), t, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(z.inverse_matrix.numpy(), t_inv, rtol=1e-9, atol=1e-10)
    out = z.transform(torch.from_numpy(train))
    assert out.shape == (n, *shape) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), zca_apply(train, mu, t), rtol=1e-9, atol=1e-10)
    # The test set uses the training set's mean and matrix.
    np.testing.assert_allclose(z(torch.from_numpy(test)).numpy(), zca_apply(test, mu, t), rtol=1e-9, atol=1e-10)
    mu_test = zca_numpy(test)[0]
    assert not np.allclose(mu_test, mu)  # so the line above could fail if test stats were used
    # float32 input: same result at float32 precision, dtype kept.
    out32 = z.transform(torch.from_numpy(test).float())
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), zca_apply(test, mu, t), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", devices())
def test_zca_inverse_and_state_dict_round_trip(device):
    g = torch.Generator().manual_seed(9)
    x = torch.rand(23, 3, 3, 3, generator=g, dtype=torch.float64).to(device)
    z = ZCA().fit(x)
    assert z.eigvecs.device.type == "cpu"  # the state lives on the CPU whatever device fitted it
    torch.testing.assert_close(z.inverse(z.transform(x)), x, rtol=1e-10, atol=1e-10)
    lead = torch.rand(2, 4, 3, 3, 3, generator=g, dtype=torch.float64).to(device)  # extra leading dims
    torch.testing.assert_close(z.inverse(z.transform(lead)), lead, rtol=1e-10, atol=1e-10)
    sd = z.state_dict()
    z2 = ZCA.from_state_dict(sd)
    assert torch.equal(z2.transform(x), z.transform(x)) and torch.equal(z2.inverse(x), z.inverse(x))
    sd["eps"] = 0.2  # the state really drives the transform
    assert not torch.allclose(ZCA.from_state_dict(sd).transform(x), z.transform(x))


def test_zca_state_dict_survives_torch_save(tmp_path):
    x = torch.rand(9, 1, 3, 3, generator=torch.Generator().manual_seed(10))
    z = ZCA().fit(x)
    torch.save(z.state_dict(), tmp_path / "zca.pt")
    z2 = ZCA.from_state_dict(torch.load(tmp_path / "zca.pt", weights_only=True))
    assert torch.equal(z2.transform(x), z.transform(x))


def test_zca_errors():
    z = ZCA()
    with pytest.raises(ValueError, match="not fitted"):
        z.transform(torch.zeros(2, 1, 2, 2))
    with pytest.raises(TypeError, match="floating"):
        z.fit(torch.zeros(4, 1, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="2 samples"):
        z.fit(torch.zeros(1, 1, 2, 2))
    z.fit(torch.rand(5, 1, 2, 2, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match=r"\(1, 2, 2\)"):
        z.transform(torch.zeros(3, 1, 3, 3))
    with pytest.raises(ValueError, match="eigvecs"):
        ZCA.from_state_dict({"eps": 0.1, "shape": [1, 2, 2]})
    sd = z.state_dict()
    sd["shape"] = [1, 3, 3]
    with pytest.raises(ValueError, match="shape"):
        ZCA.from_state_dict(sd)
    with pytest.raises(ValueError, match="eps"):
        ZCA(eps=0)


def test_load_zca_digits(digits_raw):
    raw = load("digits", normalize=False)
    d = load("digits", zca=True)
    assert d.zca is not None and d.mean == (0.0,) and d.std == (1.0,)
    mu, t, _ = zca_numpy(raw.train_images.double().numpy())
    np.testing.assert_allclose(d.train_images.numpy(), zca_apply(raw.train_images.numpy(), mu, t), atol=2e-5)
    np.testing.assert_allclose(d.test_images.numpy(), zca_apply(raw.test_images.numpy(), mu, t), atol=2e-5)
    torch.testing.assert_close(d.denormalize(d.test_images), raw.test_images, atol=1e-5, rtol=0)
    torch.testing.assert_close(d.normalize(raw.test_images), d.test_images)
    # With a subset, ZCA is fitted on the images returned (the subset).
    s = load("digits", zca=True, subset_per_class=5)
    sub = load("digits", normalize=False, subset_per_class=5)
    mu_s, t_s, _ = zca_numpy(sub.train_images.double().numpy())
    np.testing.assert_allclose(s.test_images.numpy(), zca_apply(sub.test_images.numpy(), mu_s, t_s), atol=2e-5)


# ---------------------------------------------------------------------------- real Fashion-MNIST


@pytest.fixture(scope="module")
def fmnist():
    return load("fashion-mnist")


@requires_fmnist
def test_fashion_mnist_real(fmnist):
    d = fmnist
    assert d.train_images.shape == (60000, 1, 28, 28) and d.test_images.shape == (10000, 1, 28, 28)
    assert d.train_labels.bincount().tolist() == [6000] * 10 and d.test_labels.bincount().tolist() == [1000] * 10
    assert d.class_names[9] == "Ankle boot" and d.reference_name == "FashionMNIST"
    lo, hi = (0 - 0.2861) / 0.3530, (1 - 0.2861) / 0.3530
    assert abs(float(d.train_images.min()) - lo) < 1e-6 and abs(float(d.train_images.max()) - hi) < 1e-5
    # The reference's constants are the data's own statistics (to ~1e-3 in normalized units).
    assert abs(float(d.train_images.mean())) < 2e-3 and abs(float(d.train_images.std()) - 1) < 2e-3


@requires_fmnist
def test_fashion_mnist_real_zca_subset():
    def g():
        return torch.Generator().manual_seed(11)

    pixels = load("fashion-mnist", normalize=False, subset_per_class=10, generator=g())
    # The reference normalizes MNIST / FashionMNIST by mean/std before its ZCA (no ZCA branch in their transform).
    raw = load("fashion-mnist", subset_per_class=10, generator=g())
    d = load("fashion-mnist", zca=True, subset_per_class=10, generator=g())
    assert d.train_images.shape == (100, 1, 28, 28) and torch.equal(d.train_labels, raw.train_labels)
    assert (d.mean, d.std) == (raw.mean, raw.std) == ((0.2861,), (0.3530,))
    assert not load("fashion-mnist", zca=True, normalize=False, subset_per_class=10, generator=g()).zca.matrix.equal(
        d.zca.matrix)  # normalize=False: whitened from pixels, another transform
    # D = 784: instead of a second eigendecomposition (seconds on 2 busy cores), check that T is the symmetric
    # positive-definite matrix with T^2 = (Sigma + 0.1 I)^-1, which determines it uniquely.
    # (torch, not numpy, for the 784^3 products: numpy's BLAS threads crawl on the oversubscribed machine.)
    x = raw.train_images.double().reshape(100, -1)
    mu = x.mean(0)
    sigma = (x - mu).T @ (x - mu) / 99
    t = d.zca.matrix
    torch.testing.assert_close(t, t.T, atol=1e-12, rtol=0)
    torch.linalg.cholesky(t)  # raises unless positive definite
    torch.testing.assert_close(
        t @ t @ (sigma + 0.1 * torch.eye(784, dtype=t.dtype)), torch.eye(784, dtype=t.dtype), atol=1e-8, rtol=0
    )
    mu, t = mu.numpy(), t.numpy()
    np.testing.assert_allclose(d.train_images.numpy(), zca_apply(raw.train_images.numpy(), mu, t), atol=1e-4)
    np.testing.assert_allclose(d.test_images[:200].numpy(), zca_apply(raw.test_images[:200].numpy(), mu, t), atol=1e-4)
    torch.testing.assert_close(d.denormalize(d.test_images[:50]), pixels.test_images[:50], atol=1e-4, rtol=0)
    torch.testing.assert_close(d.normalize(pixels.test_images[:50]), d.test_images[:50], atol=1e-4, rtol=0)


def test_fashion_mnist_default_root_in_message(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_ROOT", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError) as e:
        load("fashion-mnist")
    assert str(tmp_path / "absent" / "train-images-idx3-ubyte") in str(e.value)
    assert "apt-get install dataset-fashion-mnist" in str(e.value)


def test_gzip_module_used_for_gz_only(tmp_path, idx_arrays):
    # A plain file whose name ends in .gz must not be read as plain (and vice versa): the error names it.
    p = tmp_path / "x.gz"
    p.write_bytes(write_idx(tmp_path / "plain", idx_arrays[0]).read_bytes())
    with pytest.raises(ValueError, match="x.gz"):
        read_idx(p)
    q = tmp_path / "y"
    q.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc"))
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(q)


def test_idx_splits_of_other_image_sizes_or_an_empty_train_split_are_refused(tmp_path):
    from data_fixtures import write_mnist

    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 8).astype(np.uint8)
    write_mnist(tmp_path / "a", rng.integers(0, 255, (8, 4, 4), dtype=np.uint8), y,
                rng.integers(0, 255, (8, 5, 5), dtype=np.uint8), y)  # fmt: skip
    with pytest.raises(ValueError, match="holds 4x4 images but .* 5x5: the two splits must be of one dataset"):
        data.load("mnist", str(tmp_path / "a"))
    write_mnist(tmp_path / "b", np.zeros((0, 4, 4), np.uint8), np.zeros(0, np.uint8),
                rng.integers(0, 255, (8, 4, 4), dtype=np.uint8), y)  # fmt: skip
    with pytest.raises(ValueError, match="no training images"):
        data.load("mnist", str(tmp_path / "b"))


def test_an_idx_header_of_huge_dimensions_is_a_clear_error(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(bytes([0, 0, 8, 4]) + (65536).to_bytes(4, "big") * 4)  # 2**64 bytes: int64 wraps to 0
    with pytest.raises(ValueError, match=r"header says shape \(65536, 65536, 65536, 65536\)"):
        data.read_idx(p)


def test_cifar100_statistics_follow_the_objectives_public_code(tmp_path):
    """MTT/HaBa normalize CIFAR-100 with CIFAR-10's statistics, DC/DSA/DM's code with CIFAR-100's own."""
    from haba_fast.data import STATISTICS, statistics_for

    rng = np.random.default_rng(3)
    write_cifar100(tmp_path, (random_uint8(rng, 6, 3, 32, 32), rng.integers(0, 100, 6)),
                   (random_uint8(rng, 2, 3, 32, 32), rng.integers(0, 100, 2)))
    raw = load("cifar100", tmp_path, normalize=False).train_images
    for which, mean, std in (("mtt", (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
                             ("dc", (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762))):
        d = load("cifar100", tmp_path, statistics=which)
        assert d.mean == mean and d.std == std
        m, s = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
        torch.testing.assert_close(d.train_images, (raw - m) / s, rtol=0, atol=0)
    assert STATISTICS["dc"]["cifar10"] == STATISTICS["mtt"]["cifar10"]  # CIFAR-100 is the only difference
    assert [statistics_for(o) for o in ("mtt", "dc", "dsa", "dm")] == ["mtt", "dc", "dc", "dc"]
    with pytest.raises(ValueError, match="statistics must be one of mtt, dc, got 'imagenet'"):
        load("digits", statistics="imagenet")
