"""Every engine (naive, exact, first-order) answers bad inputs the same way: a clear error before any step, never a
NaN loss or an error from deep inside autograd."""

from __future__ import annotations

import pytest
import torch
from test_adjoint import _convnet, make_problem

from haba_fast.engines import get_engine

ENGINES = ["naive", "exact", "first-order"]


def _problem():
    model = _convnet(depth=2, norm="instancenorm", dtype=torch.float64)
    X, Y, ws, wt = make_problem(model, 2, 3, tuple(model.im_size), torch.float64)
    return model, X, Y, ws, wt, torch.tensor(0.1, dtype=torch.float64)


def _nan_lr(m, X, Y, ws, wt, lr):
    return m, X, Y, ws, wt, torch.tensor(float("nan"), dtype=torch.float64)


def _inf_lr(m, X, Y, ws, wt, lr):
    return m, X, Y, ws, wt, torch.tensor(float("inf"), dtype=torch.float64)


def _nan_x(m, X, Y, ws, wt, lr):
    return m, torch.full_like(X, float("nan")), Y, ws, wt, lr


def _labels_out_of_range(m, X, Y, ws, wt, lr):
    return m, X, Y + 100, ws, wt, lr


def _no_steps(m, X, Y, ws, wt, lr):
    return m, X[:0], Y[:0], ws, wt, lr


def _no_samples(m, X, Y, ws, wt, lr):
    return m, X[:, :0], Y[:, :0], ws, wt, lr


def _x_as_list(m, X, Y, ws, wt, lr):
    return m, list(X), Y, ws, wt, lr


def _lr_as_string(m, X, Y, ws, wt, lr):
    return m, X, Y, ws, wt, "0.1"


def _nan_expert(m, X, Y, ws, wt, lr):
    return m, X, Y, ws, torch.full_like(wt, float("nan")), lr


BAD = {
    "nan lr": (_nan_lr, ValueError, "lr is not finite"),
    "inf lr": (_inf_lr, ValueError, "lr is not finite"),
    "nan X": (_nan_x, ValueError, "contains NaN or Inf"),
    "labels out of range": (_labels_out_of_range, ValueError, r"labels Y must be in \[0, "),
    "no steps": (_no_steps, ValueError, "at least one step of at least one sample"),
    "no samples": (_no_samples, ValueError, "at least one step of at least one sample"),
    "X a list": (_x_as_list, TypeError, "X must be a tensor, got list"),
    "lr a string": (_lr_as_string, TypeError, "lr must be a 0-dim tensor or a number, got str"),
    "nan expert": (_nan_expert, ValueError, "not finite|NaN or Inf"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("engine", ENGINES)
def test_every_engine_refuses_bad_inputs_alike(engine, case):
    corrupt, error, message = BAD[case]
    with pytest.raises(error, match=message):
        get_engine(engine)(*corrupt(*_problem()))


@pytest.mark.parametrize("engine", ENGINES)
def test_a_python_number_lr_is_taken_by_every_engine(engine):
    model, X, Y, ws, wt, lr = _problem()
    eng = get_engine(engine)
    assert torch.equal(eng(model, X, Y, ws, wt, 0.1), eng(model, X, Y, ws, wt, lr))


@pytest.mark.skipif(not __import__("haba_fast._ext", fromlist=["x"]).extension_available(), reason="no C++ extension")
@pytest.mark.parametrize(
    "spec, side, message",
    [
        ([1, 10, 2**62, 1, 1, 0, 1, 1], 8, r"must be <= 2\^24, depth and first_padding <= 1024"),
        ([1, 10, 8, 2**40, 1, 0, 1, 1], 8, r"must be <= 2\^24, depth and first_padding <= 1024"),
        ([1, 10, 8, 1, 1, 0, 1, 2**61], 8, r"must be <= 2\^24, depth and first_padding <= 1024"),
        ([3, 10, 2**24, 1, 0, 0, 0, 2**24], 8, r"must be <= 2\^24, depth and first_padding <= 1024"),
        # within the bounds, but classes x width x 256 x 256 = 2^64 parameters: int64 would wrap around
        ([1, 2**24, 2**24, 1, 0, 0, 0, 1], 256, "more parameters than int64 counts"),
    ],
)
def test_the_cpp_op_refuses_specs_whose_layout_would_overflow(spec, side, message):
    """A spec list passed to the C++ op by hand: sizes checked before the layout multiplies them (int64 overflow is
    undefined behaviour), never a parameter count that wrapped around."""
    w, x, y = torch.randn(10), torch.randn(1, 1, side, side), torch.zeros(1, dtype=torch.long)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.haba_fast.trajectory_step_grad(w, x, y, spec, True)


@pytest.mark.parametrize("switch", ["offload_weights", "compile_step", "cuda_graphs"])
def test_engine_switches_must_be_bools(switch):
    with pytest.raises(TypeError, match=f"{switch} must be True or False, got 'no'"):
        get_engine("exact", **{switch: "no"})
