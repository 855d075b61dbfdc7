"""DC's evaluation augmentation (haba_fast.dc_augment) against per-transform oracles written from the public code's
``augment`` / ``get_daparam`` (VICO-UoE/DatasetCondensation utils.py), and where it reaches the evaluation: DC's
main.py evaluates MNIST and ConvNetBN networks with it, 1000 epochs; DSA, DM, MTT and HaBa never."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import rotate as scipy_rotate

from haba_fast import dc_augment as dca
from haba_fast.distill import DistillConfig, eval_config
from haba_fast.evaluate import EvalConfig
from haba_fast.training import train_network


def _batch(n=3, C=2, H=9, W=9, seed=0):
    return torch.randn(n, C, H, W, generator=torch.Generator().manual_seed(seed))


def _crop_oracle(img, means, r, c):
    C, H, W = img.shape
    k = dca.CROP
    padded = torch.empty(C, H + 2 * k, W + 2 * k)
    padded[:] = means.view(C, 1, 1)
    padded[:, k:k + H, k:k + W] = img
    return padded[:, r:r + H, c:c + W]


def _scale_oracle(img, h, w):
    C, H, W = img.shape
    tmp = F.interpolate(img[None], [h, w])[0]
    side = max(h, w, H, W)
    canvas = torch.zeros(C, side, side)
    canvas[:, int((side - h) / 2):int((side - h) / 2) + h, int((side - w) / 2):int((side - w) / 2) + w] = tmp
    r, c = int((side - H) / 2), int((side - W) / 2)
    return canvas[:, r:r + H, c:c + W]


def _rotate_oracle(img, angle, cval):
    C, H, W = img.shape
    im = scipy_rotate(img.numpy(), angle=angle, axes=(-2, -1), cval=cval)
    r, c = int((im.shape[-2] - H) / 2), int((im.shape[-1] - W) / 2)
    return torch.tensor(im[:, r:r + H, c:c + W], dtype=torch.float)


@pytest.mark.parametrize("shape", [(4, 1, 28, 28), (5, 3, 9, 7), (3, 2, 6, 11)])
def test_every_image_is_one_transform_of_the_reference_with_its_draws_in_range(shape):
    """Each output image equals the oracle of crop, scale or rotate for some draw inside the reference's ranges
    (crop offsets [0, 8), scale factors U(0.8, 1.2) on H, integer angles [-45, 45)); the crop pad is the channel mean
    of the batch as it came, the rotation's fill the mean of those means."""
    x = _batch(*shape)
    means = x.mean(dim=(0, 2, 3))
    H = shape[2]
    sizes = sorted({int(f * H) for f in np.linspace(0.8, 1.2, 4001)[:-1]})
    seen = set()
    for seed in range(12):
        out = dca.dc_augment(x, "crop_scale_rotate", torch.Generator().manual_seed(seed))
        assert out.shape == x.shape and out.dtype == torch.float32
        for i in range(shape[0]):
            crops = [(r, c) for r in range(2 * dca.CROP) for c in range(2 * dca.CROP)
                     if torch.equal(out[i], _crop_oracle(x[i], means, r, c))]
            scales = [(h, w) for h in sizes for w in sizes if torch.equal(out[i], _scale_oracle(x[i], h, w))]
            angles = [a for a in range(-dca.ROTATE, dca.ROTATE)
                      if torch.allclose(out[i], _rotate_oracle(x[i], a, float(means.mean())), atol=1e-5)]
            assert crops or scales or angles, f"image {i} of seed {seed} is no transform the reference makes"
            seen.update(("crop",) * bool(crops) + ("scale",) * bool(scales) + ("rotate",) * bool(angles))
    assert seen == {"crop", "scale", "rotate"}


def test_draws_cover_the_reference_ranges_and_never_leave_them():
    """Crop offsets are uniform over [0, 2·crop): the image itself (offset crop) among them, 2·crop never."""
    x = _batch(1, 1, 8, 8)
    means = x.mean(dim=(0, 2, 3))
    offsets = set()
    for seed in range(300):
        out = dca.dc_augment(x, "crop", torch.Generator().manual_seed(seed))[0]
        found = [(r, c) for r in range(2 * dca.CROP + 1) for c in range(2 * dca.CROP + 1)
                 if torch.equal(out, _crop_oracle(x[0], means, min(r, 2 * dca.CROP), min(c, 2 * dca.CROP)))]
        assert found, "a crop outside the padded image"
        offsets.update(r for r, _ in found)
    assert offsets == set(range(2 * dca.CROP))


def test_noise_adds_a_thousandth_of_a_normal_draw():
    x = _batch(64, 1, 16, 16)
    d = dca.dc_augment(x, "noise", torch.Generator().manual_seed(0)) - x
    assert 0.0009 < float(d.std()) < 0.0011 and abs(float(d.mean())) < 1e-4


def test_crop_noise_picks_each_transform_about_half_the_time_and_none_leaves_the_batch():
    assert dca.dc_augment(_batch().double(), "crop_noise", torch.Generator()).dtype == torch.float64
    x = _batch(400, 1, 6, 6)
    out = dca.dc_augment(x, "crop_noise", torch.Generator().manual_seed(1))
    noisy = ((out - x).abs().amax(dim=(1, 2, 3)) < 0.01) & ~torch.isclose(out, x).flatten(1).all(1)
    assert 150 < int(noisy.sum()) < 250
    assert torch.equal(dca.dc_augment(x, "none", torch.Generator()), x)
    assert dca.dc_augment(x, "crop", torch.Generator()).data_ptr() != x.data_ptr()  # the input is never changed


def test_strategy_of_get_daparam_and_bad_input():
    assert dca.dc_aug_strategy("MNIST", "ConvNet") == "crop_scale_rotate"
    assert dca.dc_aug_strategy("mnist", "ConvNetBN") == "crop_noise"  # ConvNetBN wins over MNIST, as there
    assert dca.dc_aug_strategy("CIFAR10", "ConvNetBN") == "crop_noise"
    assert dca.dc_aug_strategy("fashion-mnist", "ConvNet") == "none"
    with pytest.raises(ValueError, match="unknown DC augmentation 'flip'"):
        dca.dc_augment(_batch(), "crop_flip", torch.Generator())
    with pytest.raises(ValueError, match=r"floating \[n, C, H, W\]"):
        dca.dc_augment(torch.zeros(2, 3, 4, dtype=torch.float32), "crop", torch.Generator())
    tiny = dca.dc_augment(_batch(8, 1, 1, 1), "scale", torch.Generator().manual_seed(0))  # the reference fails here
    assert tiny.shape == (8, 1, 1, 1) and torch.isfinite(tiny).all()


def test_train_network_augments_with_dc_only_without_dsa(monkeypatch):
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 9 * 9, 3))
    x, y = _batch(6), torch.tensor([0, 1, 2, 0, 1, 2])
    calls = []
    real = dca.dc_augment
    monkeypatch.setattr(dca, "dc_augment", lambda *a: calls.append(a[1]) or real(*a))
    train_network(net, x, y, epochs=2, lr=0.01, batch_size=4, dsa=False, dc_aug="crop_noise",
                  generator=torch.Generator().manual_seed(0))
    assert calls == ["crop_noise"] * 4  # 2 batches × 2 epochs
    with pytest.raises(ValueError, match="DC's augmentation without DSA"):
        train_network(net, x, y, epochs=1, lr=0.01, dc_aug="crop", generator=torch.Generator())


def test_dc_evaluation_augments_mnist_and_convnetbn_for_1000_epochs_only_under_dc():
    """DistillConfig -> EvalConfig: objective dc (DSA off) evaluates MNIST and ConvNetBN networks with get_daparam's
    strategy for 1000 epochs and the others as configured; dsa, dm, mtt and dc with --dsa True never."""
    dc = eval_config(DistillConfig(dataset="mnist", objective="dc", dsa=False, epoch_eval_train=300,
                                   eval_models=("ConvNet", "ConvNetBN")))
    assert dc.dc_aug_dataset == "mnist"
    assert [(dc.dc_aug_for(m), dc.epochs_for(m)) for m in dc.models] == [
        ("crop_scale_rotate", 1000), ("crop_noise", 1000)]
    fashion = eval_config(DistillConfig(dataset="fashion-mnist", objective="dc", dsa=False, epoch_eval_train=300,
                                        eval_models=("ConvNet", "ConvNetBN")))
    assert [(fashion.dc_aug_for(m), fashion.epochs_for(m)) for m in fashion.models] == [
        ("none", 300), ("crop_noise", 1000)]
    for cfg in (DistillConfig(dataset="mnist", objective="dsa", dsa=True),
                DistillConfig(dataset="mnist", objective="dm", dsa=True),
                DistillConfig(dataset="mnist"),
                DistillConfig(dataset="mnist", objective="dc", dsa=True)):
        assert eval_config(cfg).dc_aug_dataset is None
    # the dataset evaluated on, not the config's name, decides (distill() passes the loaded dataset's name)
    named = DistillConfig(dataset="cifar10", objective="dc", dsa=False, eval_models=("ConvNet",))
    assert eval_config(named).dc_aug_for("ConvNet") == "none"
    assert eval_config(named, dataset_name="mnist").dc_aug_for("ConvNet") == "crop_scale_rotate"
    # another --epoch_eval_train than DC's 300 holds for the augmented networks too
    short = eval_config(DistillConfig(dataset="mnist", objective="dc", dsa=False, epoch_eval_train=20))
    assert (short.dc_aug_dataset, short.epochs_for("ConvNet")) == ("mnist", 20)
    with pytest.raises(ValueError, match="runs without DSA"):
        EvalConfig(dc_aug_dataset="mnist", dsa=True).validate()
    with pytest.raises(ValueError, match="unknown dataset|Unknown dataset|dataset"):
        EvalConfig(dc_aug_dataset="imagenet-21k", dsa=False).validate()


def test_evaluate_synthetic_trains_each_model_with_its_dc_augmentation(monkeypatch):
    """Per evaluated model: its strategy reaches train_network, and its Epoch (+ 1 trained, as evaluate_synset)."""
    from haba_fast import data, evaluate
    from haba_fast.factorization import Pixels

    ds = data.load("digits")
    syn = Pixels(ds.num_classes, 1, ds.channels, ds.im_size)
    seen = []

    def recording(net, *args, **kwargs):
        seen.append((kwargs["epochs"], kwargs["dc_aug"], kwargs["dsa"]))
        return train_network(net, *args, **{**kwargs, "epochs": 1})  # the run itself kept short

    monkeypatch.setattr(evaluate, "train_network", recording)
    cfg = EvalConfig(models=("ConvNetW32", "ConvNetBN"), num_eval=1, epochs=5, dsa=False, dc_aug_dataset="digits",
                     dc_aug_epochs=1000, device="cpu")
    evaluate.evaluate_synthetic(syn, ds, cfg, lr=0.01, generator=torch.Generator().manual_seed(0))
    assert seen == [(6, "none", False), (1001, "crop_noise", False)]
    seen.clear()  # without dc_aug_epochs (haba-fast eval --dc-aug, or a DC run's --epoch_eval_train): epochs for all
    evaluate.evaluate_synthetic(syn, ds, dataclasses.replace(cfg, dc_aug_epochs=None), lr=0.01,
                                generator=torch.Generator().manual_seed(0))
    assert seen == [(6, "none", False), (6, "crop_noise", False)]


def test_eval_dc_aug_flag_is_refused_where_it_would_do_nothing(capsys, monkeypatch):
    from haba_fast import evaluate
    from haba_fast.cli import main

    monkeypatch.setattr(evaluate, "train_network", lambda net, *a, **k: train_network(net, *a, **{**k, "epochs": 1}))

    base = ["eval", "--baseline", "random", "--ipc", "1", "--dataset", "digits", "--epochs", "0", "--num-eval", "1"]
    assert main([*base, "--dc-aug", "--no-dsa", "--models", "ConvNet"]) == 2
    assert "--dc-aug does nothing for ConvNet on digits" in capsys.readouterr().err
    assert main([*base, "--dc-aug", "--models", "ConvNetBN"]) == 2
    assert "runs without DSA" in capsys.readouterr().err
    assert main([*base, "--dc-aug", "--no-dsa", "--models", "ConvNetBN", "--json"]) == 0
    assert '"dc_aug_dataset": "digits"' in capsys.readouterr().out
