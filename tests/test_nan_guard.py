# ruff: noqa: F811  (the digits/buffer fixtures are imported from test_distill and requested by name)
"""The NaN/Inf guard of distillation (skip, restore, stop after max_bad_steps) and the learned lr's
parameterizations (plain with the min_lr clamp, log-space)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from test_distill import _cfg, buffer, digits  # noqa: F401  (fixtures)

from haba_fast.distill import BadStepError, DistillConfig, Distiller, DivergenceError, distill

QUIET = dict(progress=False, log=lambda s: None)


def _state(d):
    """Values and optimizer states that a bad step must leave untouched."""
    return (
        [p.detach().clone() for p in d._trainable() + [d.lr_param]],
        [copy.deepcopy(o.state_dict()) for o in d._optimizers()],
    )


def _assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    for sa, sb in zip(a[1], b[1]):
        assert sa["param_groups"] == sb["param_groups"]
        assert sa["state"].keys() == sb["state"].keys()
        for k in sa["state"]:
            for name, v in sa["state"][k].items():
                w = sb["state"][k][name]
                assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w


def _nan_grad_hook(d, when=lambda: True):
    """Make the bases' gradient NaN whenever ``when()`` is true."""
    return d.synthetic.bases.register_hook(lambda g: g * float("nan") if when() else g)


def test_nan_gradient_skips_the_update(digits, buffer):
    d = Distiller(_cfg(), digits, buffer)
    d.step()  # momentum buffers exist
    before = _state(d)
    _nan_grad_hook(d)
    with pytest.raises(BadStepError, match="non-finite gradients") as info:
        d.step()
    assert info.value.reason == "gradient" and isinstance(info.value, DivergenceError)
    _assert_same(before, _state(d))
    assert d.iteration == 1


def test_non_finite_update_is_restored(digits, buffer):
    d = Distiller(_cfg(), digits, buffer)
    d.step()
    before = _state(d)
    d.opt_img.param_groups[0]["lr"] = float("inf")  # finite gradients, infinite step
    with pytest.raises(BadStepError, match="non-finite") as info:
        d.step()
    assert info.value.reason == "update"
    d.opt_img.param_groups[0]["lr"] = before[1][0]["param_groups"][0]["lr"]
    _assert_same(before, _state(d))
    assert torch.isfinite(d.synthetic.bases).all()


def test_exploded_loss_is_a_bad_step(digits, buffer):
    d = Distiller(_cfg(max_loss=1e-9), digits, buffer)
    with pytest.raises(BadStepError, match="exploded") as info:
        d.step()
    assert info.value.reason == "exploded"


def test_a_transient_bad_step_is_skipped_and_the_run_goes_on(digits, buffer, tmp_path, capsys):
    calls = []

    def install(d, m):  # after iteration 0: the next backward (iteration 1) gets a NaN gradient, later ones not
        if not calls:
            calls.append(_nan_grad_hook(d, lambda: len(calls) == 1 and not calls.append(None)))

    res = distill(_cfg(iterations=4, checkpoint_every=1), digits, buffer, tmp_path, on_iteration=install, **QUIET)
    assert res.iterations == 4
    hist = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [h["iteration"] for h in hist] == [0, 1, 2, 3]
    assert hist[1]["skipped"] == "gradient" and "skipped" not in hist[2] and "loss" in hist[2]
    assert "iteration 1: skipped (non-finite gradients" in capsys.readouterr().err
    # no checkpoint after the bad step; the next good one checkpoints again
    assert not (tmp_path / "synthetic_2.pt").exists() and (tmp_path / "synthetic_3.pt").exists()


def test_k_bad_steps_in_a_row_stop_with_the_cause(digits, buffer, tmp_path):
    def blow_up(d, m):
        if d.iteration == 1:
            _nan_grad_hook(d)

    cfg = _cfg(iterations=10, checkpoint_every=1, max_bad_steps=3)
    with pytest.raises(DivergenceError, match=r"3 bad distillation step\(s\) in a row.*lower --lr_img") as info:
        distill(cfg, digits, buffer, tmp_path, on_iteration=blow_up, **QUIET)
    assert not isinstance(info.value, BadStepError)
    assert "last good checkpoint" in str(info.value)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["iteration"] == 1
    hist = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [h.get("skipped") for h in hist] == [None, "gradient", "gradient"]


def test_a_learned_lr_at_its_floor_is_named(digits, buffer, tmp_path):
    def blow_up(d, m):
        _nan_grad_hook(d)

    # lr_teacher == min_lr: the learned lr sits on its floor.
    cfg = _cfg(iterations=10, max_bad_steps=2, lr_teacher=0.01, min_lr=0.01)
    with pytest.raises(DivergenceError, match="floor.*--lr-param log"):
        distill(cfg, digits, buffer, tmp_path, on_iteration=blow_up, **QUIET)


def test_non_finite_adversary_step_is_skipped(digits, buffer):
    d = Distiller(_cfg(), digits, buffer)
    m = d.step()
    assert m["adv_skipped"] == 0.0
    before = [p.detach().clone() for p in d.adversary.parameters()]
    hooks = [p.register_hook(lambda g: g * float("nan")) for p in d.adversary.parameters()]
    bases = d.synthetic.bases.detach().clone()
    m = d.step()  # the club term's gradient reaches the bases only, so the synthetic step is good
    assert m["adv_skipped"] == 1.0 and not torch.equal(bases, d.synthetic.bases)
    for p, q in zip(d.adversary.parameters(), before):
        assert torch.equal(p, q)
    for h in hooks:
        h.remove()
    assert d.step()["adv_skipped"] == 0.0


def test_max_bad_steps_must_be_positive():
    with pytest.raises(ValueError, match="--max-bad-steps"):
        DistillConfig(max_bad_steps=0).validate()
    with pytest.raises(ValueError, match="--lr-param"):
        DistillConfig(lr_param="softplus").validate()


# ---------------------------------------------------------------------------------------------------------------------
# The learned lr


def test_lr_clamp_is_reported(digits, buffer):
    # Here the matching loss pushes the learned lr down (its gradient is positive): on the floor, every step clamps.
    d = Distiller(_cfg(lr_teacher=0.01, min_lr=0.01, lr_lr=1e-3), digits, buffer)
    for _ in range(2):
        m = d.step()
        assert m["lr_clamped"] == 1.0 and m["syn_lr"] == pytest.approx(0.01)
        assert float(d.syn_lr.grad) > 0
    # Above the floor, a small step does not reach it.
    d = Distiller(_cfg(lr_teacher=0.02, min_lr=0.01, lr_lr=1e-5), digits, buffer)
    m = d.step()
    assert m["lr_clamped"] == 0.0 and 0.01 < m["syn_lr"] < 0.02


def test_log_space_step_matches_the_chain_rule(digits, buffer):
    """Oracle: u' = u - lr_lr * (dL/dlr * lr) (first SGD step: the momentum buffer is the gradient); lr' = exp(u')."""
    lr0, lr_lr = 0.01, 0.5
    plain = Distiller(_cfg(lr_teacher=lr0, lr_lr=0.0), digits, buffer)
    log = Distiller(_cfg(lr_teacher=lr0, lr_lr=lr_lr, lr_param="log"), digits, buffer)
    plain.step()
    m = log.step()
    g = float(plain.syn_lr.grad)
    assert g != 0.0
    expected = math.exp(math.log(lr0) - lr_lr * g * lr0)
    assert m["syn_lr"] == pytest.approx(expected, rel=1e-5)
    assert float(log.lr_param.detach()) == pytest.approx(math.log(expected), rel=1e-5)
    # and the synthetic set took the same step in both (their lr only moved after it)
    torch.testing.assert_close(plain.synthetic.bases, log.synthetic.bases)


def test_log_space_keeps_the_lr_positive(digits, buffer):
    d = Distiller(_cfg(lr_teacher=0.01, lr_lr=1e4, min_lr=0.0, lr_param="log"), digits, buffer)
    for _ in range(3):
        try:
            m = d.step()
        except BadStepError:
            continue
        assert m["syn_lr"] > 0
    assert float(d.syn_lr.detach()) > 0 and math.isfinite(float(d.lr_param.detach()))


def test_log_space_floor(digits, buffer):
    d = Distiller(_cfg(lr_teacher=0.002, min_lr=0.0015, lr_lr=1e3, lr_param="log"), digits, buffer)
    for _ in range(3):
        m = d.step()
        assert m["syn_lr"] >= 0.0015 * (1 - 1e-6)
