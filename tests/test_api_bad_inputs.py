"""The Python API refuses bad input with a ValueError / TypeError that names the argument, instead of a raw
IndexError, a silent wrong answer, or a file that saves but does not load."""

from __future__ import annotations

import math

import pytest
import torch

from haba_fast import ops
from haba_fast.factorization import HaBa, Pixels, load_synthetic


def _haba(**kw):
    args = dict(num_classes=2, bpc=2, channels=1, im_size=5, n_hallucinators=2, kernel_size=3)
    args.update(kw)
    return HaBa(**args, generator=torch.Generator().manual_seed(0))


def _pixels():
    return Pixels(2, 2, 1, 8, generator=torch.Generator().manual_seed(0))


# ---- 1. Pixels.sample_batch checks its indices as HaBa.sample_batch does ----------------------------------
@pytest.mark.parametrize(
    "indices, exc, match",
    [
        (torch.tensor([99]), ValueError, r"indices out of range.*\[0, 4\)"),
        (torch.tensor([-1]), ValueError, r"indices out of range"),
        (torch.tensor([[0, 1]]), ValueError, r"indices must be 1-D"),
        (torch.tensor(1), ValueError, r"indices must be 1-D"),
        (1, ValueError, r"indices must be a 1-D tensor"),
        (torch.tensor([0.0]), TypeError, r"indices must be an integer tensor"),
    ],
)
@pytest.mark.parametrize("make", [_pixels, _haba], ids=["pixels", "haba"])
def test_sample_batch_refuses_bad_indices(make, indices, exc, match):
    with pytest.raises(exc, match=match):
        make().sample_batch(indices)


@pytest.mark.parametrize("hall", [True, False, torch.tensor([True, False])])
def test_generate_refuses_a_bool_hallucinator_index(hall):
    """A bool is not an index: ``generate(idx, True)`` used to pick hallucinator 1."""
    with pytest.raises(TypeError, match=r"hall_idx must be an integer tensor"):
        _haba().generate(torch.tensor([0, 1]), hall)


def test_pixels_sample_batch_good_indices():
    pix = _pixels()
    x, y = pix.sample_batch(torch.tensor([3, 0, 3]))
    assert x.shape == (3, 1, 8, 8) and y.tolist() == [1, 0, 1]
    assert torch.equal(x[0], pix.images[3])


# ---- 2. generate refuses a kernel size of 0 before dispatch (the C++ op returned dec_bias alone) ----------
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("fused", [False, True], ids=["generate", "generate_augment"])
def test_generate_refuses_kernel_size_zero(backend, fused):
    g = torch.Generator().manual_seed(0)
    Hn, C, cb, H, W = 2, 3, 1, 5, 5
    args = (
        torch.randn(4, cb, H, W, generator=g),
        torch.randn(Hn, C, cb, 0, 0, generator=g),
        torch.randn(Hn, C, generator=g),
        torch.randn(Hn, C, H + 1, W + 1, generator=g),
        torch.randn(Hn, C, H + 1, W + 1, generator=g),
        torch.randn(Hn, C, C, 0, 0, generator=g),
        torch.randn(Hn, C, generator=g),
        torch.tensor([0, 3]),
        torch.tensor([1, 0]),
    )
    with pytest.raises(ValueError, match=r"kernel size k must be >= 1"):
        if fused:
            ops.generate_augment(*args, [], backend=backend)
        else:
            ops.generate(*args, backend=backend)


# ---- 3. meta['lr']: save checks it by load's rule; load never reads a path from a file's metadata -----------
@pytest.mark.parametrize("lr", [math.nan, -1.0, 0.0, torch.tensor([1.0, 2.0]), "abc", True])
@pytest.mark.parametrize("make", [_pixels, _haba], ids=["pixels", "haba"])
def test_save_refuses_bad_meta_lr(tmp_path, make, lr):
    path = tmp_path / "syn.pt"
    with pytest.raises(ValueError, match=r"\.save: meta 'lr': learned lr"):
        make().save(path, meta={"lr": lr})
    assert not path.exists()


def test_load_refuses_string_meta_lr_without_opening_it(tmp_path):
    # A file with lr 'lr_file.pt' beside it, holding a valid lr: the loader must not follow the name.
    torch.save(torch.tensor(0.01), tmp_path / "lr_file.pt")
    path = _haba().save(tmp_path / "syn.pt")
    payload = torch.load(path, weights_only=True)
    payload["meta"]["lr"] = str(tmp_path / "lr_file.pt")
    torch.save(payload, path)
    with pytest.raises(ValueError, match=r"meta 'lr': learned lr must be a number, got str"):
        load_synthetic(path)


def test_save_load_good_meta_lr(tmp_path):
    path = _pixels().save(tmp_path / "syn.pt", meta={"lr": torch.tensor(0.02)})
    assert load_synthetic(path).meta["lr"] == pytest.approx(0.02)


# ---- 4. constructors: integer arguments are ints >= 1 (not bool), named in the error ----------------------
_BAD_INTS = [(None, TypeError), (True, TypeError), ("3", TypeError), (math.nan, ValueError), (math.inf, ValueError),
             (0.5, ValueError), (0, ValueError)]  # fmt: skip
_HABA_INTS = ["num_classes", "bpc", "channels", "n_hallucinators", "kernel_size", "base_channels"]


@pytest.mark.parametrize(
    "name, value, exc",
    # base_channels=None means "as channels"
    [(n, v, e) for n in _HABA_INTS for v, e in _BAD_INTS if not (n == "base_channels" and v is None)],
)
def test_haba_refuses_bad_int_args(name, value, exc):
    with pytest.raises(exc, match=rf"HaBa: {name} must be a positive int"):
        _haba(**{name: value})


@pytest.mark.parametrize(
    "value, exc", [(None, TypeError), (True, TypeError), (math.nan, ValueError), (math.inf, ValueError)]
)
@pytest.mark.parametrize("name", ["num_classes", "ipc", "channels"])
def test_pixels_refuses_bad_int_args(name, value, exc):
    args = dict(num_classes=2, ipc=2, channels=1, im_size=8)
    args[name] = value
    with pytest.raises(exc, match=rf"Pixels: {name} must be a positive int"):
        Pixels(**args)


# ---- 5. storage(train_size): None or an int >= 1 ---------------------------------------------------------
@pytest.mark.parametrize(
    "value, exc", [(math.nan, ValueError), (0.5, ValueError), (0, ValueError), (True, TypeError), ("100", TypeError)]
)
@pytest.mark.parametrize("make", [_pixels, _haba], ids=["pixels", "haba"])
def test_storage_refuses_bad_train_size(make, value, exc):
    syn = make()
    with pytest.raises(exc, match=r"storage: train_size must be a positive int"):
        syn.storage(train_size=value)
    assert syn.storage(train_size=100).percent_of_train > 0


# ---- 6. labels_of refuses indices out of range -----------------------------------------------------------
def test_labels_of_refuses_out_of_range():
    haba = _haba()
    assert haba.labels_of(torch.tensor([0, 3])).tolist() == [0, 1]
    for bad in ([99], [-1], [99, -1]):
        with pytest.raises(ValueError, match=r"base_idx out of range.*\[0, 4\)"):
            haba.labels_of(torch.tensor(bad))


def test_pixels_from_reference_refuses_no_images_and_no_classes():
    with pytest.raises(ValueError, match=r"K\*ipc >= 1"):
        Pixels.from_reference(torch.zeros(0, 1, 4, 4), num_classes=2)
    with pytest.raises(ValueError, match="Pixels.from_reference: num_classes"):
        Pixels.from_reference(torch.zeros(4, 1, 4, 4), num_classes=0)
