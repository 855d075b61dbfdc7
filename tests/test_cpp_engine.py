"""The C++ trajectory engine (csrc/trajectory.cpp): torch.ops.haba_fast.trajectory_match and its pieces.

Oracles: the create-graph unroll ``naive_unroll`` (tests/test_adjoint.py) for whole trajectories (its stop-gradient
variant ``first_order_oracle`` for the first-order op), and autograd's double backward through ``functional_forward``
for one step's gradient and Hessian-vector products. Both the fused CPU loops and the ATen-only (device-generic) path
are checked (``HABA_FAST_TRAJECTORY_FUSED=0`` selects the latter).
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
import torch.nn.functional as F
from test_adjoint import _convnet, first_order_oracle, grads, make_problem, naive_unroll, rel_err
from utils import devices, requires_ext

from haba_fast._ext import has_op
from haba_fast.engines.adjoint import cpp_spec, get_adjoint_engine
from haba_fast.models import functional_forward

pytestmark = [
    requires_ext,
    pytest.mark.skipif(not has_op("trajectory_match"), reason="C++ extension without trajectory_match"),
]

PATHS = ["fused", "composite"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setenv("HABA_FAST_TRAJECTORY_FUSED", "1" if request.param == "fused" else "0")
    return request.param


def autograd_step(model, w, x, y, lam):
    """(g, h_w, h_x) by autograd's double backward: the oracle of trajectory_step_hvp."""
    w = w.clone().requires_grad_(True)
    x = x.clone().requires_grad_(True)
    ce = F.cross_entropy(functional_forward(model, w, x), y)
    (g,) = torch.autograd.grad(ce, w, create_graph=True)
    hw, hx = torch.autograd.grad(g, [w, x], grad_outputs=lam)
    return g.detach(), hw, hx


NORMS = ["instancenorm", "groupnorm", "layernorm", "none"]
ACTS = ["relu", "sigmoid", "leakyrelu"]
POOLS = ["avgpooling", "maxpooling", "none"]


@pytest.mark.parametrize("norm,act,pool", list(itertools.product(NORMS, ACTS, POOLS)))
def test_step_hvp_matches_autograd_float64(norm, act, pool, path):
    model = _convnet(width=8, depth=2, norm=norm, act=act, pool=pool, im=9)
    g = torch.Generator().manual_seed(1)
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    w = w + 0.2 * torch.randn(w.shape, generator=g, dtype=w.dtype)  # away from the init (norm affine != 1, 0)
    x = torch.randn(5, 3, 9, 9, generator=g, dtype=w.dtype)
    y = torch.randint(0, model.num_classes, (5,), generator=g)
    lam = torch.randn(w.shape, generator=g, dtype=w.dtype)
    got = torch.ops.haba_fast.trajectory_step_hvp(w, x, y, lam, cpp_spec(model))
    ref = autograd_step(model, w, x, y, lam)
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-12  # float64 rounding only (a float32 constant in the math showed as ~3e-10)


def _conv_gradient_kernels(fn) -> set[str]:
    """The convolution-gradient ATen ops ``fn()`` runs (profiler names)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name in ("aten::_slow_conv2d_backward", "aten::convolution_backward")}


@pytest.mark.parametrize("im,expect_aten_pool_backward", [(8, False), (9, True)])
def test_composite_avg_pool_backward_is_one_broadcast_multiply_at_even_sizes(im, expect_aten_pool_backward,
                                                                           monkeypatch):
    """The ATen-only path (what runs on CUDA) turns 2x2 average pooling's backward and the activation's derivative
    into one broadcast multiply where the block's size is even (ATen's CUDA avg_pool2d_backward was 5.5x its forward's
    time on an H200); an odd size (9 -> 4: the last row and column get no gradient) keeps ATen's kernel. Values: the
    step's g, h_w and h_x against autograd in float64 at both sizes."""
    monkeypatch.setenv("HABA_FAST_TRAJECTORY_FUSED", "0")
    model = _convnet(width=8, depth=2, norm="instancenorm", act="sigmoid", pool="avgpooling", im=im)
    g = torch.Generator().manual_seed(3)
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    w = w + 0.2 * torch.randn(w.shape, generator=g, dtype=w.dtype)
    x = torch.randn(4, 3, im, im, generator=g, dtype=w.dtype)
    y = torch.randint(0, model.num_classes, (4,), generator=g)
    lam = torch.randn(w.shape, generator=g, dtype=w.dtype)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = torch.ops.haba_fast.trajectory_step_hvp(w, x, y, lam, cpp_spec(model))
    names = {e.name for e in prof.events()}
    assert ("aten::avg_pool2d_backward" in names) == expect_aten_pool_backward
    for a, b in zip(got, autograd_step(model, w, x, y, lam)):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("channels", [1, 3, 16, 17, 24])
def test_step_float32_on_both_first_block_convolution_kernels(channels, path):
    """The convolution gradients run ATen's im2col + GEMM kernel for <= 16 input channels and oneDNN's above
    (csrc/trajectory.cpp, conv_bwd; width 32 keeps the later blocks on oneDNN): on both sides of that switch one
    float32 step matches the float64 autograd oracle, and the kept step's backward equals the recomputing one bit
    for bit."""
    model = _convnet(channel=channels, width=32, depth=2, im=12)
    g = torch.Generator().manual_seed(channels)
    w64 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    w64 = w64 + 0.2 * torch.randn(w64.shape, generator=g, dtype=w64.dtype)
    x64 = torch.randn(6, channels, 12, 12, generator=g, dtype=w64.dtype)
    y = torch.randint(0, model.num_classes, (6,), generator=g)
    lam64 = torch.randn(w64.shape, generator=g, dtype=w64.dtype)
    ref = autograd_step(model, w64, x64, y, lam64)
    spec = cpp_spec(model)
    w, x, lam = w64.float(), x64.float(), lam64.float()
    ops = torch.ops.haba_fast
    kernels = _conv_gradient_kernels(lambda: ops.trajectory_step_hvp(w, x, y, lam, spec))
    assert ("aten::_slow_conv2d_backward" in kernels) == (channels <= 16)
    got = ops.trajectory_step_hvp(w, x, y, lam, spec)
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32
        assert rel_err(a.double(), b) < 1e-5
    g_keep, kept = ops.trajectory_step_grad_keep(w, x, y, spec)
    assert torch.equal(g_keep, ops.trajectory_step_grad(w, x, y, spec))
    recomputed = ops.trajectory_step_adjoint(w, x, y, lam, spec, True)
    reused = ops.trajectory_step_adjoint_kept(w, x, y, lam, kept, spec, True)
    for a, b in zip(reused, recomputed):
        assert torch.equal(a, b)
    assert rel_err(recomputed[1].double(), ref[1]) < 1e-5 and rel_err(recomputed[2].double(), ref[2]) < 1e-5


@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_takes_inputs_of_any_memory_layout(layout, dtype, path):
    """A batch that is a view (strided, a slice) or channels_last gives the contiguous batch's results (up to
    rounding): the im2col + GEMM gradient kernel reads its input as dense NCHW, so conv_bwd hands it a contiguous
    copy."""
    model = _convnet(channel=3, width=8, depth=2, im=10, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    big = torch.randn(5, 3, 10, 14, generator=g, dtype=dtype)
    y = torch.randint(0, model.num_classes, (5,), generator=g)
    lam = torch.randn(w.shape, generator=g, dtype=dtype)
    if layout == "transposed":
        x = big[..., :10].transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "sliced":
        x = big[..., 2:12]
    else:
        x = big[..., :10].contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    spec = cpp_spec(model)
    ops = torch.ops.haba_fast
    dense = x.contiguous()
    tol = 1e-12 if dtype == torch.float64 else 1e-5  # oneDNN may sum a channels_last batch in another order
    for a, b in zip(ops.trajectory_step_hvp(w, x, y, lam, spec), ops.trajectory_step_hvp(w, dense, y, lam, spec)):
        assert rel_err(a, b) < tol
    assert rel_err(ops.trajectory_step_grad(w, x, y, spec), ops.trajectory_step_grad(w, dense, y, spec)) < tol


CONFIGS = [
    # (channel, width, depth, norm, act, pool, im, steps, batch)
    (3, 8, 1, "instancenorm", "relu", "avgpooling", 8, 1, 3),
    (1, 8, 2, "instancenorm", "relu", "avgpooling", 8, 3, 5),
    (3, 8, 3, "groupnorm", "leakyrelu", "maxpooling", 16, 2, 3),
    (3, 12, 2, "layernorm", "sigmoid", "avgpooling", 11, 4, 7),
    (1, 8, 2, "none", "relu", "none", 7, 8, 3),
    (3, 8, 3, "instancenorm", "relu", "avgpooling", 32, 2, 3),
    (3, 16, 2, "groupnorm", "sigmoid", "none", 9, 5, 1),
]


@functools.cache
def _oracle(cfg, first_order=False):
    """(model, X, Y, w_start, w_target, oracle (loss, dX, dlr)) in float64: the naive unroll, or (``first_order``)
    its stop-gradient variant; cached: both paths compare to it."""
    c, width, depth, norm, act, pool, im, steps, batch = cfg
    model = _convnet(channel=c, width=width, depth=depth, norm=norm, act=act, pool=pool, im=im)
    X, Y, ws, wt = make_problem(model, steps, batch, model.im_size, torch.float64)
    unroll = first_order_oracle if first_order else naive_unroll
    return model, X, Y, ws, wt, grads(unroll, model, X, Y, ws, wt, lr_value=0.1)


@pytest.mark.parametrize("engine", ["exact", "first-order"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_trajectory_matches_naive_float64(cfg, engine, path):
    """The whole-unroll op, exact against the naive unroll, first-order against first_order_oracle."""
    model, X, Y, ws, wt, ref = _oracle(cfg, first_order=engine == "first-order")
    eng = get_adjoint_engine(engine, backend="cpu")
    out = grads(eng, model, X, Y, ws, wt, lr_value=0.1)
    assert eng.last_backend == "cpu"
    assert rel_err(out[0], ref[0]) < 1e-12
    assert rel_err(out[1], ref[1]) < 1e-9
    assert rel_err(out[2], ref[2]) < 1e-9


@pytest.mark.parametrize("cfg", CONFIGS[1:4], ids=lambda c: "-".join(map(str, c)))
def test_trajectory_float32_matches_float64_oracle(cfg, path):
    c, width, depth, norm, act, pool, im, _steps, _batch = cfg
    model32 = _convnet(channel=c, width=width, depth=depth, norm=norm, act=act, pool=pool, im=im, dtype=torch.float32)
    _, X, Y, ws, wt, ref = _oracle(cfg)
    out = grads(get_adjoint_engine("exact", "cpu"), model32, X.float(), Y, ws.float(), wt.float(), lr_value=0.1)
    assert out[1].dtype == torch.float32
    assert rel_err(out[1].double(), ref[1]) < 1e-4
    assert rel_err(out[2].double(), ref[2]) < 1e-4


def test_cpp_equals_python_engine_first_order():
    model = _convnet(width=8, depth=2, im=9, norm="groupnorm")
    X, Y, ws, wt = make_problem(model, 4, 3, model.im_size, torch.float64)
    py = grads(get_adjoint_engine("first-order", "torch"), model, X, Y, ws, wt, lr_value=0.2)
    cpp = grads(get_adjoint_engine("first-order", "cpu"), model, X, Y, ws, wt, lr_value=0.2)
    exact = grads(get_adjoint_engine("exact", "cpu"), model, X, Y, ws, wt, lr_value=0.2)
    ref = grads(first_order_oracle, model, X, Y, ws, wt, lr_value=0.2)
    assert rel_err(cpp[1], py[1]) < 1e-9 and rel_err(cpp[2], py[2]) < 1e-9
    for out in (py, cpp):  # and both equal the oracle, not only each other
        assert rel_err(out[0], ref[0]) < 1e-12 and rel_err(out[1], ref[1]) < 1e-10 and rel_err(out[2], ref[2]) < 1e-10
    assert rel_err(cpp[1], exact[1]) > 1e-3


def test_batchnorm_convnet_falls_back_to_python():
    model = _convnet(depth=1, im=8, norm="batchnorm")
    assert cpp_spec(model) is None
    eng = get_adjoint_engine("exact")
    X, Y, ws, wt = make_problem(model, 2, 3, model.im_size, torch.float64)
    eng(model, X, Y, ws, wt, torch.tensor(0.1, dtype=torch.float64))
    assert eng.last_backend == "torch"


def _op_args(dtype=torch.float64, requires_grad=True):
    model = _convnet(width=4, depth=2, im=6)
    X, Y, ws, wt = make_problem(model, 2, 3, model.im_size, dtype)
    lr = torch.tensor(0.05, dtype=dtype, requires_grad=requires_grad)
    return model, X.requires_grad_(requires_grad), Y, ws, wt, lr


OPCHECK_FAST = ("test_schema", "test_autograd_registration", "test_faketensor")


def test_opcheck():
    model, X, Y, ws, wt, lr = _op_args()
    spec = cpp_spec(model)
    torch.library.opcheck(
        torch.ops.haba_fast.trajectory_match.default, (X, Y, ws, wt, lr, spec, False), test_utils=OPCHECK_FAST
    )
    torch.library.opcheck(
        torch.ops.haba_fast.trajectory_match_forward.default,
        (X.detach(), Y, ws, wt, lr.detach(), spec, True),
        test_utils=OPCHECK_FAST,
    )


@pytest.mark.slow
def test_opcheck_aot_dispatch():
    model, X, Y, ws, wt, lr = _op_args()
    torch.library.opcheck(
        torch.ops.haba_fast.trajectory_match.default,
        (X, Y, ws, wt, lr, cpp_spec(model), False),
        test_utils="test_aot_dispatch_dynamic",
    )


def test_gradcheck_small():
    model = _convnet(width=4, depth=1, im=5, norm="instancenorm", act="sigmoid")
    X, Y, ws, wt = make_problem(model, 2, 1, model.im_size, torch.float64, spread=0.3)
    spec = cpp_spec(model)

    def f(X, lr):
        return torch.ops.haba_fast.trajectory_match(X, Y, ws, wt, lr, spec, False)

    X.requires_grad_(True)
    lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (X, lr), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_op_errors_are_runtime_errors_not_crashes():
    model, X, Y, ws, wt, lr = _op_args(requires_grad=False)
    spec = cpp_spec(model)
    op = torch.ops.haba_fast.trajectory_match
    cases = [
        ((X, Y, ws[:-3], wt, lr, spec, False), "w_start must be a flat vector of P"),
        ((X, Y[:, :2], ws, wt, lr, spec, False), "Y must be"),
        ((X[0], Y, ws, wt, lr, spec, False), "X must be"),
        ((X, Y, ws, wt, lr, spec[:5], False), "spec must be"),
        ((X, Y + 100, ws, wt, lr, spec, False), "labels must be in"),
        ((X.float(), Y, ws, wt, lr, spec, False), "dtype"),
        ((X, Y, ws, ws, lr, spec, False), "distance 0"),
        ((X, Y, ws, wt, lr.reshape(1), spec, False), "lr must be a 0-dim"),
        ((X[:, :, :1], Y, ws, wt, lr, spec, False), "channels"),
        ((X, Y, ws, wt, lr, [3, 5, 8, 2, 9, 0, 1, 1], False), "norm code"),
    ]
    bad = X.clone()
    bad[0, 0, 0, 0, 0] = float("inf")
    cases.append(((bad, Y, ws, wt, lr, spec, False), "NaN or Inf"))
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            op(*args)


def test_each_value_check_names_its_input():
    """The value checks share one host read (one device sync on CUDA); a failure still names the bad input, for the
    whole-unroll op and for the per-step ops that run the checks every step."""
    model, X, Y, ws, wt, lr = _op_args(requires_grad=False)
    spec = cpp_spec(model)
    nan_ws, inf_wt = ws.clone(), wt.clone()
    nan_ws[3], inf_wt[-1] = float("nan"), float("inf")
    neg_y = Y.clone()
    neg_y[1, 2] = -1
    whole = torch.ops.haba_fast.trajectory_match
    cases = [
        ((X, neg_y, ws, wt, lr), r"labels must be in \[0, 5\), got values in \[-1, "),
        ((X, Y, nan_ws, wt, lr), "w_start or w_target contains NaN or Inf"),
        ((X, Y, ws, inf_wt, lr), "w_start or w_target contains NaN or Inf"),
        ((X, Y, ws, wt, torch.full_like(lr, float("nan"))), "lr is NaN or Inf"),
    ]
    for (x, y, a, b, r), msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            whole(x, y, a, b, r, spec, False)
    whole(X, Y, ws, wt, lr, spec, False)  # and the good inputs pass
    bad_x = X[0].clone()
    bad_x[1, 0, 2, 2] = float("nan")
    for op in (torch.ops.haba_fast.trajectory_step_grad, torch.ops.haba_fast.trajectory_step_grad_keep):
        with pytest.raises(RuntimeError, match=r"labels must be in \[0, 5\), got values in \[-1, "):
            op(ws, X[1], neg_y[1], spec)
        with pytest.raises(RuntimeError, match="X contains NaN or Inf"):
            op(ws, bad_x, Y[0], spec)
        with pytest.raises(RuntimeError, match="w_start or w_target contains NaN or Inf"):
            op(nan_ws, X[0], Y[0], spec)
        op(ws, X[0], Y[0], spec)


def test_engine_checks_image_size():
    model, X, Y, ws, wt, lr = _op_args(requires_grad=False)
    eng = get_adjoint_engine("exact", "cpu")
    with pytest.raises(ValueError, match="im_size"):
        eng(model, X[:, :, :, :5], Y, ws, wt, lr)  # same P after pooling, but not the model's input size


@pytest.mark.parametrize("device", devices())
def test_device_generic(device, monkeypatch):
    """The composite path runs on every device present (CUDA when a GPU is lent). On the CPU the op takes the
    fused loops unless HABA_FAST_TRAJECTORY_FUSED=0 selects the ATen-only path, so the test sets it; that path (and
    only it) calls ATen's avg_pool2d_backward at this odd size (see the test above), which shows it ran."""
    monkeypatch.setenv("HABA_FAST_TRAJECTORY_FUSED", "0")
    model = _convnet(width=8, depth=2, im=9).to(device)
    X, Y, ws, wt = make_problem(model.cpu(), 3, 3, model.im_size, torch.float64)
    model = model.to(device)
    ref = grads(naive_unroll, model.cpu(), X, Y, ws, wt)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = grads(get_adjoint_engine("exact", "cpu"), model, X.to(device), Y.to(device), ws.to(device),
                    wt.to(device))
    assert "aten::avg_pool2d_backward" in {e.name for e in prof.events()}, "the fused path ran, not the composite"
    assert rel_err(out[1].cpu(), ref[1]) < 1e-9 and rel_err(out[2].cpu(), ref[2]) < 1e-9


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_isa_copies_of_the_fused_loops_agree(isa, monkeypatch):
    """The baseline / AVX2 / AVX-512 copies of the fused loops (csrc/cpu_isa.h) compute the same trajectory."""
    model = _convnet(width=8, depth=2, im=8, norm="groupnorm", act="sigmoid", pool="avgpooling")
    X, Y, ws, wt = make_problem(model, 3, 5, model.im_size, torch.float64)
    eng = get_adjoint_engine("exact", backend="cpu")
    monkeypatch.delenv("HABA_FAST_CPU_ISA", raising=False)
    best = grads(eng, model, X, Y, ws, wt)
    monkeypatch.setenv("HABA_FAST_CPU_ISA", isa)
    capped = grads(eng, model, X, Y, ws, wt)
    for a, b in zip(best, capped):
        assert rel_err(a, b) < 1e-12


def test_error_messages_format_integers_and_shapes():
    """csrc/check.h builds the messages without ostream: numbers and shapes must still read as before."""
    model, X, Y, ws, wt, lr = _op_args(requires_grad=False)
    spec = cpp_spec(model)
    op = torch.ops.haba_fast.trajectory_match
    with pytest.raises(RuntimeError, match=r"P = 301 parameters for this model spec and a 6x6 input, got shape \[298"):
        op(X, Y, ws[:-3], wt, lr, spec, False)
    with pytest.raises(RuntimeError, match=r"Y must be \[N, B\] = \[2, 3\] to match X, got \[2, 2\]"):
        op(X, Y[:, :2], ws, wt, lr, spec, False)
    with pytest.raises(RuntimeError, match=r"labels must be in \[0, 5\), got values in \[100, 104\]"):
        op(X, Y + 100, ws, wt, lr, spec, False)
    with pytest.raises(RuntimeError, match=r"must have X's dtype \(Float\), got Double"):
        op(X.float(), Y, ws, wt, lr, spec, False)
