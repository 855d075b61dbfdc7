"""The shared SGD loop (haba_fast.training): convergence, schedules, data providers, determinism, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from haba_fast import data, models
from haba_fast.training import (
    evaluate_loss_accuracy,
    standardize_batch,
    test_accuracy,
    train_network,
)


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", subset_per_class=8, generator=torch.Generator().manual_seed(0))


def _net(ds, seed=0, name="MLP"):  # MLP: ~10x cheaper than a ConvNet here; the loop is under test
    return models.get_network(
        name, ds.channels, ds.num_classes, ds.im_size, generator=torch.Generator().manual_seed(seed)
    )


def _flat(net):
    return models.flatten_params(net).clone()


def test_loss_decreases_on_digits(digits):
    net = _net(digits)
    hist = train_network(
        net,
        digits.train_images,
        digits.train_labels,
        epochs=12,
        lr=0.05,
        batch_size=32,
        momentum=0.9,
        dsa=False,
        generator=torch.Generator().manual_seed(1),
    )
    assert len(hist.epochs) == 12
    assert hist.losses[-1] < 0.5 * hist.losses[0]
    assert all(b < a for a, b in zip(hist.losses[:5], hist.losses[1:6]))
    assert hist.accuracies[-1] > 0.5  # 10 classes: chance is 0.1


def test_test_accuracy_matches_direct_computation(digits):
    net = _net(digits, seed=3)
    x, y = digits.test_images[:37], digits.test_labels[:37]  # odd size: a partial last batch
    with torch.no_grad():
        out = net.eval()(x)
    net.train()
    expected_acc = (out.argmax(1) == y).float().mean().item()
    expected_loss = F.cross_entropy(out, y).item()
    loss, acc = evaluate_loss_accuracy(net, x, y, batch_size=10)
    assert acc == pytest.approx(expected_acc)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert test_accuracy(net, x, y, batch_size=7) == pytest.approx(expected_acc)
    assert net.training  # mode restored


def test_standardize_batch_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 7, 7, generator=g) * 3 + 2
    z = standardize_batch(x)
    torch.testing.assert_close(z, (x - x.mean()) / x.std())
    assert z.mean().abs() < 1e-5 and (z.std() - 1).abs() < 1e-5
    assert torch.isfinite(standardize_batch(torch.ones(2, 1, 3, 3))).all()


def test_batch_standardize_makes_testing_affine_invariant(digits):
    net = _net(digits, seed=4)
    x, y = digits.test_images[:64], digits.test_labels[:64]
    a = test_accuracy(net, x, y, batch_size=64, batch_standardize=True)
    b = test_accuracy(net, 3.0 * x + 1.5, y, batch_size=64, batch_standardize=True)
    assert a == pytest.approx(b)
    # The standardization is applied in training too: affine-shifted training data gives the same weights.
    w1 = _net(digits, seed=5)
    w2 = _net(digits, seed=5)
    for net_, scale in ((w1, 1.0), (w2, 2.0)):
        train_network(
            net_,
            scale * digits.train_images + 0.25,
            digits.train_labels,
            epochs=2,
            lr=0.01,
            batch_size=40,
            dsa=False,
            batch_standardize=True,
            generator=torch.Generator().manual_seed(2),
        )
    torch.testing.assert_close(_flat(w1), _flat(w2), rtol=1e-4, atol=1e-5)


def test_half_schedule_lrs(digits):
    def epoch_lrs(epochs, **schedule):
        hist = train_network(_net(digits), digits.train_images[:20], digits.train_labels[:20], epochs=epochs, lr=0.1,
                             batch_size=20, dsa=False, generator=torch.Generator().manual_seed(0), **schedule)
        return [e.lr for e in hist.epochs]

    # the reference's buffer.py: decay after epoch 5 // 2 + 1 = 3, so epoch 4 is the first at lr x0.1
    assert epoch_lrs(5, lr_schedule="half") == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.01])
    assert epoch_lrs(3) == pytest.approx([0.1, 0.1, 0.1])


def test_epoch_data_callable_called_each_epoch(digits):
    calls = []
    x, y = digits.train_images[:30], digits.train_labels[:30]

    def epoch_data(epoch, generator):
        assert isinstance(generator, torch.Generator)
        calls.append(epoch)
        return x + 0.01 * epoch, y

    hist = train_network(
        _net(digits),
        epoch_data,
        epochs=3,
        lr=0.01,
        batch_size=16,
        dsa=False,
        generator=torch.Generator().manual_seed(0),
    )
    assert calls == [0, 1, 2]
    assert len(hist.epochs) == 3
    # A callable that always returns the same data trains exactly like the fixed pair.
    n1, n2 = _net(digits, seed=7), _net(digits, seed=7)
    train_network(n1, lambda e, g: (x, y), epochs=2, lr=0.01, batch_size=16, generator=torch.Generator().manual_seed(3))
    train_network(n2, (x, y), epochs=2, lr=0.01, batch_size=16, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_flat(n1), _flat(n2))


def test_deterministic_given_generator_and_dsa_changes_result(digits):
    x, y = digits.train_images[:40], digits.train_labels[:40]

    def run(seed, dsa):
        net = _net(digits, seed=11)
        train_network(
            net, x, y, epochs=2, lr=0.01, batch_size=16, dsa=dsa, generator=torch.Generator().manual_seed(seed)
        )
        return _flat(net)

    a, b = run(0, True), run(0, True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, run(1, True))
    assert not torch.equal(a, run(0, False))


def test_callback_and_test_data(digits):
    seen = []
    hist = train_network(
        _net(digits),
        digits.train_images[:30],
        digits.train_labels[:30],
        epochs=3,
        lr=0.01,
        batch_size=16,
        dsa=False,
        test_data=(digits.test_images[:50], digits.test_labels[:50]),
        test_every=2,
        callback=lambda ep, net, stats: seen.append((ep, stats.test_accuracy is not None)),
        generator=torch.Generator().manual_seed(0),
    )
    assert seen == [(0, False), (1, True), (2, True)]  # every 2nd epoch and after the last
    assert 0.0 <= hist.final_test_accuracy <= 1.0

    def boom(ep, net, stats):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        train_network(
            _net(digits),
            digits.train_images[:10],
            digits.train_labels[:10],
            epochs=2,
            lr=0.01,
            callback=boom,
            generator=torch.Generator().manual_seed(0),
        )


def test_bad_inputs(digits):
    net = _net(digits)
    x, y = digits.train_images[:10], digits.train_labels[:10]
    kw = {"epochs": 1, "lr": 0.01, "generator": torch.Generator().manual_seed(0)}
    with pytest.raises(ValueError, match="labels"):
        train_network(net, x, y[:5], **kw)
    with pytest.raises(ValueError, match="without labels"):
        train_network(net, x, **kw)
    with pytest.raises(TypeError, match="data must be"):
        train_network(net, "images", **kw)
    with pytest.raises(ValueError, match="lr_schedule"):
        train_network(net, x, y, lr_schedule="cosine", epochs=1, lr=0.01)
    with pytest.raises(ValueError, match="lr"):
        train_network(net, x, y, epochs=1, lr=float("nan"))
    with pytest.raises(ValueError, match="batch_size"):
        train_network(net, x, y, epochs=1, lr=0.01, batch_size=0)
    with pytest.raises(TypeError, match="float"):
        train_network(net, x.long(), y, **kw)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        test_accuracy(net, x[0], y[:1])
