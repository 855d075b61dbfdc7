"""DC/DSA gradient matching: the vmap path against the loop and finite differences on every network DC accepts,
and DC's ``--dis_metric`` distances (ours, mse, cos) against plain-PyTorch oracles.

Oracles are written here from the public code's formulas (VICO-UoE/DatasetCondensation utils.py ``distance_wb`` /
``match_loss``, called once per class), with a Python loop over classes and ``torch.autograd.grad``, in float64.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from haba_fast import data
from haba_fast.distill import DistillConfig, Distiller, apply_objective
from haba_fast.models import NETWORK_NAMES, get_network
from haba_fast.objectives.base import RealSampler, fresh_network, synthetic_classes
from haba_fast.objectives.gradient import (
    DIS_METRICS,
    class_gradients,
    gradient_match_loss,
    match_distance,
    vmap_unsafe_modules,
)

D = torch.float64
SIZES = (8, 16, 32, 64, 128, 256)


def _smallest_size(name: str):
    """The smallest square 1-channel input DC can run ``name`` on, or None where DC refuses the network (BatchNorm).

    Shapes only (meta device): the size checks of the constructors and a forward (GroupNorm needs more than one
    value per group, which rules out ResNet18 at 8x8).
    """
    for size in SIZES:
        shape = SimpleNamespace(channels=1, num_classes=2, im_size=(size, size))
        try:
            net = fresh_network(SimpleNamespace(model=name), shape, torch.Generator(), "meta", what="dc")
            net(torch.empty(1, 1, size, size, device="meta"))
        except ValueError as e:
            if "BatchNorm" in str(e):
                return None
            continue
        return size
    raise AssertionError(f"{name}: no size up to {SIZES[-1]} works")


ACCEPTED = {name: size for name in NETWORK_NAMES if (size := _smallest_size(name)) is not None}
# Over 0.5 s each on a 2-core CPU (measured: wide or deep networks, or inputs of 32x32 and more).
SLOW = {"ConvNetW512", "ConvNetW1024", "ConvNetKIP", "ResNet18", "ResNet18_AP", "VGG11"}
SLOW |= {n for n, s in ACCEPTED.items() if s >= 32}
# The matching loss is a function of the parameter gradient, which jumps wherever a ReLU of the synthetic forward
# crosses zero. At 128x128 and more (ConvNetD7, D8: millions of ReLUs) such jumps lie within 1e-8 of the point along
# any direction (measured, ConvNetD7: finite-difference errors grow as 1/step, 3 directions, steps 1e-6..1e-8), so
# there only vmap and the loop are compared; every layer type they have is also finite-differenced in D1..D6.
FD_MAX_SIZE = 128
NETWORK_CASES = [pytest.param(n, s, marks=[pytest.mark.slow] if n in SLOW else []) for n, s in ACCEPTED.items()]


def _problem(name, size, K=2, S=1, R=2, seed=0, channels=1):
    g = torch.Generator().manual_seed(seed)
    net = get_network(name, channels, K, (size, size), generator=g, dtype=D)
    real = torch.randn(K, R, channels, size, size, dtype=D, generator=g)
    real_y = torch.arange(K).repeat_interleave(R).reshape(K, R)
    syn = torch.randn(K, S, channels, size, size, dtype=D, generator=g)
    syn_y = torch.arange(K).repeat_interleave(S).reshape(K, S)
    return net, real, real_y, syn, syn_y


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _grad_syn(loss_fn, syn):
    x = syn.clone().requires_grad_(True)
    loss = loss_fn(x)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


def _check_fd(loss_fn, syn, grad, seed=0, tol=1e-6):
    """Fourth-order central differences of ``loss_fn`` along random directions agree with ``<grad, direction>``.

    The loss is only piecewise smooth: the parameter gradient jumps where a ReLU of the synthetic forward crosses
    zero, and DC's distance bends sharply where a gradient row is tiny (ReLU-dead channels; instance norms over 2x2
    maps). A fixed step can straddle such a point (measured: ResNet18_AP at 16x16 is 80% off with a step of 1e-6
    and 2e-8 off with 3e-7). So steps 1e-6, 1e-7, 1e-8 are tried, then up to two more directions; the first
    agreement passes. A wrong second-order term (vmap through LayerNorm: 0.7-4% off) agrees at none: its error does
    not shrink with the step.
    """
    g = torch.Generator().manual_seed(seed)

    def f(t, direction):
        with torch.no_grad():
            x = syn + t * direction
        return float(loss_fn(x).detach())

    errors = []
    for _ in range(3):
        direction = torch.randn(syn.shape, dtype=syn.dtype, generator=g)
        analytic = float((grad * direction).sum())
        for h in (1e-6, 1e-7, 1e-8):
            fd = (8 * (f(h, direction) - f(-h, direction)) - (f(2 * h, direction) - f(-2 * h, direction))) / (12 * h)
            errors.append(abs(fd - analytic) / abs(analytic))
            if errors[-1] < tol:
                return
    raise AssertionError(f"finite differences disagree: relative errors {errors}")


# ---------------------------------------------------------------------------------------------------------------------
# Task: vmap path == loop == finite differences, on every network DC accepts


def test_every_accepted_network_is_covered():
    refused = {"ConvNetBN", "VGG11BN", "ResNet18BN", "ResNet18BN_AP"}
    assert set(ACCEPTED) == set(NETWORK_NAMES) - refused
    assert {"ConvNetLN", "ConvNetIN", "ConvNetGN", "ConvNetNN", "MLP", "LeNet", "AlexNet", "VGG11", "ResNet18"} <= set(
        ACCEPTED
    )


@pytest.mark.parametrize("name,size", NETWORK_CASES)
def test_gradient_wrt_synthetic_auto_equals_loop_and_finite_differences(name, size):
    net, real, real_y, syn, syn_y = _problem(name, size)
    grads = {}
    for batched in ("auto", False):
        loss, g = _grad_syn(lambda x, b=batched: gradient_match_loss(net, real, real_y, x, syn_y, batched=b), syn)
        grads[batched] = (loss, g)
    assert torch.allclose(grads["auto"][0], grads[False][0], rtol=1e-12, atol=0)
    assert _rel(grads["auto"][1], grads[False][1]) < 1e-10
    if size >= FD_MAX_SIZE:
        return
    _check_fd(lambda x: gradient_match_loss(net, real, real_y, x, syn_y, batched=False), syn, grads[False][1])


def test_layernorm_network_refuses_explicit_vmap_and_auto_loops():
    net, real, real_y, syn, syn_y = _problem("ConvNetLN", 8)
    assert vmap_unsafe_modules(net) == ["features.1 (LayerNorm)", "features.5 (LayerNorm)", "features.9 (LayerNorm)"]
    with pytest.raises(ValueError, match="LayerNorm.*batched=False"):
        gradient_match_loss(net, real, real_y, syn.requires_grad_(), syn_y, batched=True)
    with pytest.raises(ValueError, match="wrong double backward"):
        class_gradients(net, syn, syn_y, create_graph=True, batched=True)
    # Without a graph (the real side) vmap's first-order gradients are right and allowed.
    vm = class_gradients(net, real, real_y, create_graph=False, batched=True)
    lp = class_gradients(net, real, real_y, create_graph=False, batched=False)
    for a, b in zip(vm, lp):
        assert _rel(a, b) < 1e-12


def _probe_net(norm: nn.Module, train: bool) -> nn.Module:
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), norm, nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    net = net.to(D)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():  # non-trivial norm affine parameters
            p.add_(0.3 * torch.randn(p.shape, dtype=D, generator=g))
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
                m.running_mean.normal_(generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return net.train(train)


NORM_CASES = [
    # (module, train mode, flagged by vmap_unsafe_modules)
    (lambda: nn.LayerNorm([4, 5, 5]), True, True),
    (lambda: nn.LayerNorm(5), True, True),
    (lambda: nn.LayerNorm([4, 5, 5], bias=False), True, True),
    (lambda: nn.LayerNorm([4, 5, 5], elementwise_affine=False), True, False),
    (lambda: nn.InstanceNorm2d(4, affine=True), True, True),
    (lambda: nn.InstanceNorm2d(4, affine=True, track_running_stats=True), False, False),
    (lambda: nn.InstanceNorm2d(4), True, False),
    (lambda: nn.BatchNorm2d(4, track_running_stats=False), True, True),
    (lambda: nn.BatchNorm2d(4), False, False),
    (lambda: nn.BatchNorm2d(4, affine=False, track_running_stats=False), True, False),
    (lambda: nn.GroupNorm(4, 4), True, False),
    (lambda: nn.GroupNorm(2, 4), True, False),
    (lambda: nn.RMSNorm([4, 5, 5]), True, False),
]


@pytest.mark.parametrize("case", range(len(NORM_CASES)))
def test_norm_layers_flagged_exactly_where_vmap_double_backward_is_wrong_auto_always_right(case):
    make, train, flagged = NORM_CASES[case]
    net = _probe_net(make(), train)
    assert bool(vmap_unsafe_modules(net)) == flagged
    g = torch.Generator().manual_seed(2)
    K, S, R = 2, 3, 2
    real = torch.randn(K, R, 2, 5, 5, dtype=D, generator=g)
    real_y = torch.randint(0, 3, (K, R), generator=g)
    syn = torch.randn(K, S, 2, 5, 5, dtype=D, generator=g)
    syn_y = torch.randint(0, 3, (K, S), generator=g)

    # 'mse': every parameter's gradient counts ('ours' gives 1-D norm weights 0, hiding their wrong terms).
    def loss(x, batched):
        return gradient_match_loss(net, real, real_y, x, syn_y, batched=batched, metric="mse")

    _, g_loop = _grad_syn(lambda x: loss(x, False), syn)
    _, g_auto = _grad_syn(lambda x: loss(x, "auto"), syn)
    assert _rel(g_auto, g_loop) < 1e-10
    if not flagged:  # the claim that vmap is safe for the unflagged norms, checked (True: vmap on both sides)
        _, g_vmap = _grad_syn(lambda x: loss(x, True), syn)
        assert _rel(g_vmap, g_loop) < 1e-10


# ---------------------------------------------------------------------------------------------------------------------
# DC's --dis_metric: oracles


def oracle_distance(gr, gs, metric):
    """DC's match_loss for ONE class: gr, gs lists of per-parameter gradients (utils.py, written out)."""
    if metric == "ours":
        total = gr[0].new_zeros(())
        for a, b in zip(gr, gs):
            if a.dim() == 1:  # biases / norm parameters: 0
                continue
            a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
            for i in range(a.shape[0]):
                total = total + 1 - torch.dot(a[i], b[i]) / (a[i].norm() * b[i].norm() + 0.000001)
        return total
    r = torch.cat([a.reshape(-1) for a in gr])
    s = torch.cat([b.reshape(-1) for b in gs])
    if metric == "mse":
        return torch.sum((s - r) ** 2)
    return 1 - torch.dot(r, s) / (r.norm() * s.norm() + 0.000001)


def oracle_match_loss(net, real, syn, syn_target, metric):
    """sum over classes of match_loss(grad CE(syn_c), grad CE(real_c)), one class at a time."""
    params = list(net.parameters())
    total = syn.new_zeros(())
    for c in range(real.shape[0]):
        yr = torch.full((real.shape[1],), c, dtype=torch.long)
        gr = [g.detach() for g in torch.autograd.grad(F.cross_entropy(net(real[c]), yr), params)]
        out, t = net(syn[c]), syn_target[c]
        ls = F.cross_entropy(out, t) if t.dim() == 1 else -(t * torch.log_softmax(out, 1)).sum(1).mean()
        gs = torch.autograd.grad(ls, params, create_graph=True)
        total = total + oracle_distance(gr, gs, metric)
    return total


@pytest.mark.parametrize("metric", DIS_METRICS)
@pytest.mark.parametrize("batch_dims", [0, 1, 2])
def test_match_distance_matches_formula(metric, batch_dims):
    g = torch.Generator().manual_seed(batch_dims)
    shapes = [(6, 3, 3, 3), (6,), (4, 5, 5), (3, 7), (3,)]
    batch = (3, 2)[:batch_dims]
    gr = [torch.randn(*batch, *s, dtype=D, generator=g) for s in shapes]
    gs = [torch.randn(*batch, *s, dtype=D, generator=g) for s in shapes]
    got = match_distance(gr, gs, batch_dims=batch_dims, metric=metric)
    want = gr[0].new_zeros(())
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in batch]).reshape(-1, batch_dims) if batch else [()]:
        i = tuple(int(v) for v in idx)
        want = want + oracle_distance([a[i] for a in gr], [b[i] for b in gs], metric)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_match_distance_edge_cases():
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(4, 3, dtype=D, generator=g), torch.randn(4, dtype=D, generator=g)]
    sq = float(sum((t**2).sum() for t in a))  # |r|^2 of the concatenation
    assert float(match_distance(a, a, metric="mse")) == 0.0
    # The public code's + 1e-6 in the denominator: identical gradients give 1e-6 / (|r|^2 + 1e-6), not 0.
    assert float(match_distance(a, a, metric="cos")) == pytest.approx(1e-6 / (sq + 1e-6), rel=1e-6)
    assert float(match_distance(a, [-t for t in a], metric="cos")) == pytest.approx(2 - 1e-6 / (sq + 1e-6), rel=1e-12)
    # 'mse' and 'cos' see the 1-D parameters that 'ours' ignores.
    b = [a[0], a[1] + 1]
    assert float(match_distance(a, b, metric="ours")) == float(match_distance(a, a, metric="ours"))
    assert float(match_distance(a, b, metric="mse")) == pytest.approx(4.0, rel=1e-12)
    with pytest.raises(ValueError, match="unknown metric 'l2'"):
        match_distance(a, a, metric="l2")
    with pytest.raises(ValueError, match="1 real gradients but 2"):
        match_distance(a[:1], a, metric="mse")
    with pytest.raises(ValueError, match="no gradients"):
        match_distance([], [], metric="cos")


SHAPES = [(2, 1, 2, 6), (3, 2, 3, 7), (5, 3, 1, 5)]  # (K, S, R, H)


@pytest.mark.parametrize("metric", DIS_METRICS)
@pytest.mark.parametrize("shape", SHAPES)
def test_gradient_match_loss_metric_matches_oracle(metric, shape):
    K, S, R, H = shape
    net, real, real_y, syn, syn_y = _problem("ConvNetW32", H, K=K, S=S, R=R, seed=sum(shape))
    want, g_want = _grad_syn(lambda x: oracle_match_loss(net, real, x, syn_y, metric), syn)
    for batched in ("auto", True, False):
        got, g_got = _grad_syn(
            lambda x, b=batched: gradient_match_loss(net, real, real_y, x, syn_y, batched=b, metric=metric), syn
        )
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert _rel(g_got, g_want) < 1e-9, batched


@pytest.mark.parametrize("metric", ["mse", "cos"])
def test_gradient_match_loss_metric_soft_labels_and_layernorm(metric):
    K, S, R, H = 3, 2, 2, 6
    net, real, real_y, syn, _ = _problem("ConvNetLN", H, K=K, S=S, R=R, seed=4)
    soft = torch.softmax(torch.randn(K, S, K, dtype=D, generator=torch.Generator().manual_seed(5)), -1)
    want, g_want = _grad_syn(lambda x: oracle_match_loss(net, real, x, soft, metric), syn)
    for batched in ("auto", False):
        got, g_got = _grad_syn(
            lambda x, b=batched: gradient_match_loss(net, real, real_y, x, soft, batched=b, metric=metric), syn
        )
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert _rel(g_got, g_want) < 1e-9, batched
    _check_fd(lambda x: gradient_match_loss(net, real, real_y, x, soft, batched=False, metric=metric), syn, g_want)


def test_gradient_match_loss_unknown_metric():
    net, real, real_y, syn, syn_y = _problem("ConvNetW32", 6)
    with pytest.raises(ValueError, match="unknown metric 'l1'"):
        gradient_match_loss(net, real, real_y, syn, syn_y, metric="l1")


# ---------------------------------------------------------------------------------------------------------------------
# The objective reads cfg.dis_metric


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", subset_per_class=20, generator=torch.Generator().manual_seed(0))


def _distiller(digits, **kw):
    cfg = apply_objective(DistillConfig(), "dc")
    cfg = dataclasses.replace(
        cfg,
        dataset="digits",
        model="ConvNetW32",
        ipc=1,
        device="cpu",
        num_eval=0,
        iterations=1,
        batch_real=8,
        parameterization="pixels",
        seed=0,
        outer_loop=1,
        inner_loop=1,
        **kw,
    )
    return Distiller(cfg, digits)


def test_dc_objective_uses_dis_metric(digits):
    losses, nets = {}, {}
    for metric in DIS_METRICS:
        d = _distiller(digits, dis_metric=metric)
        assert d.objective.metric == metric
        text = d.objective.describe()
        assert ("gradient distance" in text) == (metric != "ours") and (metric in text or metric == "ours")
        state = d.objective.generator.get_state()
        out = d.objective.loss(d.synthetic, d.syn_lr)
        assert math.isfinite(float(out.loss.detach()))
        losses[metric], nets[metric] = float(out.loss.detach()), d.objective.net
        # The same network and real batch, replayed from the generator: the objective's loss is match_loss's.
        g = torch.Generator().manual_seed(0)
        g.set_state(state)
        net = fresh_network(d.cfg, digits, g, d.device, what="dc")
        real = RealSampler(digits, d.device).sample(8, g)
        x, y, _ = synthetic_classes(d.synthetic)
        want = oracle_match_loss(net, real, x.detach(), y, metric)
        assert losses[metric] == pytest.approx(float(want.detach()), rel=1e-5)
    for p, q in zip(nets["ours"].parameters(), nets["mse"].parameters()):  # same draws, only the metric differs
        assert torch.equal(p, q)
    assert losses["mse"] != pytest.approx(losses["ours"], rel=1e-3)
    assert losses["cos"] != pytest.approx(losses["ours"], rel=1e-3)
