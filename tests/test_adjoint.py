"""The adjoint engines (haba_fast.engines.adjoint): exact == the create-graph unroll; first-order is an approximation.

The oracle is ``naive_unroll`` below: a straightforward create-graph unroll through
``haba_fast.models.functional_forward``, written here so these tests do not depend on another engine.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from utils import requires_ext

from haba_fast.backend import BackendUnavailableError
from haba_fast.engines import adjoint
from haba_fast.engines.adjoint import ExactEngine, FirstOrderEngine, get_adjoint_engine
from haba_fast.models import ConvNetSpec, build_convnet, flatten_params, functional_forward, get_network


def naive_unroll(model, X, Y, w_start, w_target, lr):
    """Oracle: N SGD steps with create_graph=True, loss ||w_N - w*||^2 / ||w_start - w*||^2."""
    w = w_start.detach().clone().requires_grad_(True)
    for t in range(X.shape[0]):
        ce = F.cross_entropy(functional_forward(model, w, X[t]), Y[t])
        (g,) = torch.autograd.grad(ce, w, create_graph=True)
        w = w - lr * g
    return (w - w_target).pow(2).sum() / (w_start - w_target).pow(2).sum()


def first_order_oracle(model, X, Y, w_start, w_target, lr):
    """Oracle of the first-order engine: the same unroll, each step's gradient taken at a detached copy of w_t.

    w_{t+1} = w_t - lr * g_t(stop_grad(w_t), X_t): the loss's value is the exact one, and autograd drops exactly the
    dg_t/dw_t (Hessian) coupling between steps, i.e. lam = dL/dw_N is carried back unchanged;
    dL/dX_t = -lr (dg_t/dX_t)^T lam and dL/dlr = -sum_t g_t . lam.
    """
    w = w_start.detach().clone()
    for t in range(X.shape[0]):
        wd = w.detach().requires_grad_(True)  # cut dg_t/dw_t
        (g,) = torch.autograd.grad(F.cross_entropy(functional_forward(model, wd, X[t]), Y[t]), wd, create_graph=True)
        w = w - lr * g
    return (w - w_target).pow(2).sum() / (w_start - w_target).pow(2).sum()


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def make_problem(model, n_steps, batch, im_size, dtype, seed=0, spread=0.1):
    """Random (X, Y, w_start, w_target) for ``model`` (w_start = the model's init, w_target nearby)."""
    g = torch.Generator().manual_seed(seed)
    w_start = flatten_params(model).to(dtype)
    w_target = w_start + spread * torch.randn(w_start.shape, generator=g, dtype=dtype)
    channels = model.channel
    X = torch.randn(n_steps, batch, channels, *im_size, generator=g, dtype=dtype)
    Y = torch.randint(0, model.num_classes, (n_steps, batch), generator=g)
    return X, Y, w_start, w_target


def grads(engine, model, X, Y, w_start, w_target, lr_value=0.05):
    """(loss, dL/dX, dL/dlr) of one engine call."""
    Xr = X.clone().requires_grad_(True)
    lr = torch.tensor(lr_value, dtype=X.dtype, device=X.device, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = engine(model, Xr, Y, w_start, w_target, lr)
    loss.backward()
    return loss.detach(), Xr.grad, lr.grad


def _convnet(
    channel=3,
    width=8,
    depth=2,
    norm="instancenorm",
    act="relu",
    pool="avgpooling",
    im=9,
    k=5,
    dtype=torch.float64,
    seed=0,
):
    spec = ConvNetSpec(channel, k, width, depth, norm, act, pool, (im, im))
    return build_convnet(spec, torch.Generator().manual_seed(seed), dtype=dtype)


class _MLPStudent(nn.Module):
    """A student outside the ConvNet family (the Python engine must take it)."""

    def __init__(self, channel=1, im=5, k=4):
        super().__init__()
        self.channel, self.num_classes = channel, k
        self.fc1 = nn.Linear(channel * im * im, 7)
        self.fc2 = nn.Linear(7, k)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


# --------------------------------------------------------------------------------------------------------------------


CONFIGS = [
    {"norm": "instancenorm", "act": "relu", "pool": "avgpooling", "depth": 1, "im": 8, "steps": 1, "batch": 3},
    {"norm": "groupnorm", "act": "sigmoid", "pool": "maxpooling", "depth": 2, "im": 9, "steps": 3, "batch": 5},
    {"norm": "layernorm", "act": "leakyrelu", "pool": "none", "depth": 2, "im": 7, "steps": 2, "batch": 3},
    {"norm": "none", "act": "relu", "pool": "avgpooling", "depth": 3, "im": 11, "steps": 4, "batch": 1},
    {"norm": "batchnorm", "act": "relu", "pool": "avgpooling", "depth": 2, "im": 8, "steps": 3, "batch": 3},
    {"norm": "instancenorm", "act": "relu", "pool": "avgpooling", "depth": 2, "im": 8, "steps": 2, "batch": 3,
     "channel": 1},
]


def _cfg_id(c):
    return "-".join(str(v) for v in c.values())


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_python_exact_matches_naive_float64(cfg):
    cfg = dict(cfg)
    steps, batch = cfg.pop("steps"), cfg.pop("batch")
    model = _convnet(**cfg)
    X, Y, ws, wt = make_problem(model, steps, batch, model.im_size, torch.float64)
    ref = grads(naive_unroll, model, X, Y, ws, wt)
    eng = get_adjoint_engine("exact", backend="torch")
    out = grads(eng, model, X, Y, ws, wt)
    assert eng.last_backend == "torch"
    assert rel_err(out[0], ref[0]) < 1e-12
    assert rel_err(out[1], ref[1]) < 1e-9
    assert rel_err(out[2], ref[2]) < 1e-9


def assert_first_order_matches_oracle(model, X, Y, ws, wt, backend, lr_value=0.2):
    """The first-order engine on ``backend`` (``torch``: Python adjoint, ``cpu``: the C++ op) against
    :func:`first_order_oracle`: loss, dL/dX and dL/dlr in float64 (measured: ~1e-15 relative)."""
    ref = grads(first_order_oracle, model, X, Y, ws, wt, lr_value=lr_value)
    eng = get_adjoint_engine("first-order", backend=backend)
    out = grads(eng, model, X, Y, ws, wt, lr_value=lr_value)
    assert eng.last_backend == backend
    assert ref[1].abs().max() > 0 and ref[2] != 0  # the gradients compared are not trivially zero
    assert rel_err(out[0], ref[0]) < 1e-12
    assert rel_err(out[1], ref[1]) < 1e-10, f"dL/dX: {rel_err(out[1], ref[1]):.3g}"
    assert rel_err(out[2], ref[2]) < 1e-10, f"dL/dlr: {rel_err(out[2], ref[2]):.3g}"


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=requires_ext)])
@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_first_order_matches_its_oracle_float64(cfg, backend):
    """First-order (both backends) against the plain-PyTorch stop-gradient unroll, not only against itself."""
    cfg = dict(cfg)
    steps, batch = cfg.pop("steps"), cfg.pop("batch")
    model = _convnet(**cfg)
    if backend == "cpu" and adjoint.cpp_spec(model) is None:
        pytest.skip("the C++ engine does not implement batchnorm")
    X, Y, ws, wt = make_problem(model, steps, batch, model.im_size, torch.float64)
    assert_first_order_matches_oracle(model, X, Y, ws, wt, backend)


def test_python_exact_any_module_float32():
    model = _MLPStudent()
    X, Y, ws, wt = make_problem(model, 5, 7, (5, 5), torch.float32, spread=0.5)
    ref = grads(naive_unroll, model, X.double(), Y, ws.double(), wt.double(), lr_value=0.3)
    eng = ExactEngine()  # auto: not a ConvNet -> Python
    out = grads(eng, model, X, Y, ws, wt, lr_value=0.3)
    assert eng.last_backend == "torch"
    assert rel_err(out[1].double(), ref[1]) < 1e-4
    assert rel_err(out[2].double(), ref[2]) < 1e-4


def test_reference_network_outside_convnet_family():
    model = get_network("MLP", 1, 3, (6, 6), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    X, Y, ws, wt = make_problem(model, 3, 4, (6, 6), torch.float64)
    ref = grads(naive_unroll, model, X, Y, ws, wt)
    out = grads(get_adjoint_engine("exact"), model, X, Y, ws, wt)
    assert rel_err(out[1], ref[1]) < 1e-9 and rel_err(out[2], ref[2]) < 1e-9


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_first_order_is_an_approximation(backend):
    model = _convnet(depth=2, im=8)
    X, Y, ws, wt = make_problem(model, 4, 3, model.im_size, torch.float64)
    exact = grads(get_adjoint_engine("exact", backend), model, X, Y, ws, wt, lr_value=0.2)
    approx = grads(get_adjoint_engine("first-order", backend), model, X, Y, ws, wt, lr_value=0.2)
    assert torch.equal(exact[0], approx[0]) or rel_err(approx[0], exact[0]) < 1e-12  # same forward
    assert rel_err(approx[1], exact[1]) > 1e-3  # dropping the Hessian term changes dL/dX
    # At N = 1 there is no later step to couple to: first-order is exact.
    e1 = grads(get_adjoint_engine("exact", backend), model, X[:1], Y[:1], ws, wt)
    a1 = grads(get_adjoint_engine("first-order", backend), model, X[:1], Y[:1], ws, wt)
    assert rel_err(a1[1], e1[1]) < 1e-12 and rel_err(a1[2], e1[2]) < 1e-12


def test_first_order_says_it_is_approximate(monkeypatch):
    monkeypatch.setattr(adjoint, "_warned_first_order", False)
    eng = get_adjoint_engine("first_order")
    assert isinstance(eng, FirstOrderEngine) and eng.approximate and eng.name == "first-order"
    assert "APPROXIMATION" in FirstOrderEngine.__doc__
    model = _convnet(depth=1, im=8)
    X, Y, ws, wt = make_problem(model, 2, 2, model.im_size, torch.float64)
    with pytest.warns(UserWarning, match="APPROXIMATION"):
        eng(model, X, Y, ws, wt, torch.tensor(0.1, dtype=torch.float64))
    assert not get_adjoint_engine("exact").approximate


def test_gradient_flows_to_what_produced_X():
    """dL/dX reaches the parameters upstream of X (bases/hallucinators in HaBa), as with the naive unroll."""
    model = _convnet(depth=1, im=8)
    _, Y, ws, wt = make_problem(model, 3, 2, model.im_size, torch.float64)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(3, 2, 3, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    lr = torch.tensor(0.1, dtype=torch.float64)
    results = []
    for eng in (naive_unroll, get_adjoint_engine("exact", "torch"), get_adjoint_engine("exact", "auto")):
        loss = eng(model, torch.tanh(base) * scale, Y, ws, wt, lr)
        results.append(torch.autograd.grad(loss, [base, scale]))
    for r in results[1:]:
        assert rel_err(r[0], results[0][0]) < 1e-9 and rel_err(r[1], results[0][1]) < 1e-9


def test_lr_not_requiring_grad_and_float_lr():
    model = _convnet(depth=1, im=8)
    X, Y, ws, wt = make_problem(model, 2, 2, model.im_size, torch.float64)
    eng = get_adjoint_engine("exact", "torch")
    a = eng(model, X, Y, ws, wt, torch.tensor(0.1, dtype=torch.float64))
    b = eng(model, X, Y, ws, wt, 0.1)
    assert torch.allclose(a, b) and a.dim() == 0


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_bad_inputs_raise_clear_errors(backend):
    model = _convnet(depth=1, im=8, k=5)
    X, Y, ws, wt = make_problem(model, 2, 3, model.im_size, torch.float64)
    lr = torch.tensor(0.1, dtype=torch.float64)
    eng = get_adjoint_engine("exact", backend)
    with pytest.raises(ValueError, match="w_start"):
        eng(model, X, Y, ws[:-1], wt, lr)
    with pytest.raises(ValueError, match="Y must be"):
        eng(model, X, Y[:, :2], ws, wt, lr)
    with pytest.raises(ValueError, match="X must be"):
        eng(model, X[0], Y, ws, wt, lr)
    with pytest.raises(TypeError, match="int64"):
        eng(model, X, Y.float(), ws, wt, lr)
    bad = X.clone()
    bad[1, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        eng(model, bad, Y, ws, wt, lr)
    with pytest.raises(ValueError, match="identical"):
        eng(model, X, Y, ws, ws.clone(), lr)
    with pytest.raises(ValueError, match="labels"):
        eng(model, X, Y + 5, ws, wt, lr)
    with pytest.raises(ValueError, match="lr"):
        eng(model, X, Y, ws, wt, torch.tensor(float("inf"), dtype=torch.float64))


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown adjoint engine"):
        get_adjoint_engine("naive")
    with pytest.raises(ValueError, match="unknown backend"):
        get_adjoint_engine("exact", backend="gpu")


def test_cpp_backend_refuses_what_it_cannot_run():
    eng = get_adjoint_engine("exact", backend="cpu")
    model = _MLPStudent()
    X, Y, ws, wt = make_problem(model, 1, 2, (5, 5), torch.float64)
    with pytest.raises(BackendUnavailableError, match="backend 'cpu' cannot run trajectory_match: .*not a ConvNet"):
        eng(model, X, Y, ws, wt, torch.tensor(0.1, dtype=torch.float64))


def test_trajectory_module_gets_these_engines():
    from haba_fast.engines import get_engine

    assert isinstance(get_engine("exact"), ExactEngine)
    assert isinstance(get_engine("first-order"), FirstOrderEngine)


@pytest.mark.parametrize("engine_name", ["exact", "first-order"])
def test_whole_haba_iteration_gradients_match_naive(engine_name):
    """Bases, hallucinator parameters and lr get the naive engine's gradients (first-order: its oracle's) through
    generate + augment."""
    import argparse

    from haba_fast.benchmarks import iteration

    parser = argparse.ArgumentParser()
    iteration.add_arguments(parser)
    args = parser.parse_args(
        [
            "--engine",
            engine_name,
            "--ipc",
            "2",
            "--n-hallucinators",
            "3",
            "--syn-steps",
            "3",
            "--batch-syn",
            "5",
            "--width",
            "32",
        ]
    )
    assert_iteration_grads_match_naive(iteration.build_distiller(args), engine_name)


def _first_order_oracle_engine(model, X, Y, w_start, w_target, lr, *, reducer=None):
    """:func:`first_order_oracle` with the engine call's signature (one process: ``reducer`` is None)."""
    assert reducer is None or not reducer.active
    return first_order_oracle(model, X, Y, w_start.to(X.dtype), w_target.to(X.dtype), lr)


def assert_iteration_grads_match_naive(distiller, engine_name):
    """One HaBa iteration's matching loss and its gradients (lr, bases, every hallucinator parameter): the engine
    ``engine_name`` against the naive unroll (``first-order``: :func:`first_order_oracle`) on the same trajectory
    and plan."""
    from haba_fast.engines import NaiveEngine
    from haba_fast.objectives.mtt import trajectory_loss

    _, _, w_start, w_target = distiller.sample_trajectory()
    plan = distiller.sample_plan()
    syn = distiller.synthetic
    params = [distiller.syn_lr, syn.bases] + list(syn.hallucinator_parameters())
    oracle = _first_order_oracle_engine if engine_name in ("first-order", "first_order") else NaiveEngine()
    results = []
    for engine in (oracle, get_adjoint_engine(engine_name)):
        loss = trajectory_loss(engine, distiller.student, syn, plan, w_start, w_target, distiller.syn_lr)
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
    (l_ref, g_ref), (l_out, g_out) = results
    assert rel_err(l_out, l_ref) < 1e-5
    for a, b in zip(g_out, g_ref):
        assert rel_err(a, b) < 1e-4  # float32 end to end
