"""Engines and the step plan: naive engine vs a hand-written unroll, gradcheck, replay, index stream."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from utils import assert_close

from haba_fast import augment
from haba_fast.engines import ENGINES, NaiveEngine, get_engine, normalized_distance
from haba_fast.plan import IndexStream, sample_plan


class TinyMLP(nn.Module):
    """x [B, C, H, W] -> flatten -> Linear(D, h) -> tanh -> Linear(h, K)."""

    def __init__(self, d: int, h: int, k: int):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(d, h), nn.Tanh(), nn.Linear(h, k))

    def forward(self, x):
        return self.net(x)


def hand_unroll(w_start, w_target, X, Y, lr, shapes):
    """The unroll written out: explicit parameter views, explicit tanh-MLP forward, autograd.grad per step."""
    w = w_start.detach().clone().requires_grad_(True)
    for t in range(X.shape[0]):
        params, off = [], 0
        for s in shapes:
            n = int(torch.tensor(s).prod())
            params.append(w[off : off + n].view(s))
            off += n
        W1, b1, W2, b2 = params
        logits = torch.tanh(X[t].flatten(1) @ W1.t() + b1) @ W2.t() + b2
        loss = -torch.log_softmax(logits, 1).gather(1, Y[t][:, None]).mean()
        (g,) = torch.autograd.grad(loss, w, create_graph=True)
        w = w - lr * g
    return ((w - w_target) ** 2).sum() / ((w_start - w_target) ** 2).sum()


def _problem(N, B, C, H, W, K, hidden, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = TinyMLP(C * H * W, hidden, K).to(dtype)
    P = sum(p.numel() for p in model.parameters())
    X = torch.randn(N, B, C, H, W, generator=g, dtype=dtype)
    Y = torch.randint(K, (N, B), generator=g)
    w_start = torch.randn(P, generator=g, dtype=dtype) * 0.3
    w_target = w_start + torch.randn(P, generator=g, dtype=dtype) * 0.1
    return model, X, Y, w_start, w_target


@pytest.mark.parametrize("N,B,C,H,W,K", [(1, 2, 1, 3, 3, 2), (3, 5, 2, 3, 2, 3), (7, 3, 1, 5, 1, 5)])
def test_naive_matches_hand_unroll(N, B, C, H, W, K):
    model, X, Y, w_start, w_target = _problem(N, B, C, H, W, K, hidden=7, dtype=torch.float64)
    shapes = [p.shape for p in model.parameters()]
    lr = torch.tensor(0.37, dtype=torch.float64)

    X1, lr1 = X.clone().requires_grad_(True), lr.clone().requires_grad_(True)
    loss1 = NaiveEngine()(model, X1, Y, w_start, w_target, lr1)
    gx1, glr1 = torch.autograd.grad(loss1, [X1, lr1])

    X2, lr2 = X.clone().requires_grad_(True), lr.clone().requires_grad_(True)
    loss2 = hand_unroll(w_start, w_target, X2, Y, lr2, shapes)
    gx2, glr2 = torch.autograd.grad(loss2, [X2, lr2])

    assert_close(loss1, loss2)
    assert_close(gx1, gx2)
    assert_close(glr1, glr2)
    assert gx1.abs().sum() > 0 and glr1.abs() > 0


def test_naive_zero_steps_of_lr_is_one():
    # lr = 0: the student never moves, so the loss is exactly 1.
    model, X, Y, w_start, w_target = _problem(2, 3, 1, 2, 2, 3, hidden=4, dtype=torch.float64)
    loss = NaiveEngine()(model, X, Y, w_start, w_target, torch.tensor(0.0, dtype=torch.float64))
    assert loss.item() == pytest.approx(1.0, abs=1e-12)


def test_naive_gradcheck():
    model, X, Y, w_start, w_target = _problem(2, 2, 1, 2, 2, 3, hidden=3, dtype=torch.float64, seed=3)
    X = X.requires_grad_(True)
    lr = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

    def f(X, lr):
        return NaiveEngine()(model, X, Y, w_start, w_target, lr)

    assert torch.autograd.gradcheck(f, (X, lr), eps=1e-6, atol=1e-6)


def test_naive_on_convnet_runs_and_is_differentiable():
    from haba_fast.models import flatten_params, get_network

    g = torch.Generator().manual_seed(0)
    net = get_network("ConvNetW32", 1, 3, (8, 8), generator=g)
    w0 = flatten_params(net)
    X = torch.randn(2, 4, 1, 8, 8, generator=g, requires_grad=True)
    Y = torch.randint(3, (2, 4), generator=g)
    lr = torch.tensor(0.01, requires_grad=True)
    loss = NaiveEngine()(net, X, Y, w0, w0 + 0.01 * torch.randn(w0.shape, generator=g), lr)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(X.grad).all() and X.grad.abs().sum() > 0 and lr.grad != 0


def test_zero_distance_is_a_clear_error():
    model, X, Y, w_start, _ = _problem(2, 2, 1, 2, 2, 2, hidden=3, dtype=torch.float32)
    with pytest.raises(ValueError, match="identical"):
        NaiveEngine()(model, X, Y, w_start, w_start.clone(), torch.tensor(0.1))
    with pytest.raises(ValueError, match="identical"):
        normalized_distance(w_start, w_start)


@pytest.mark.parametrize(
    "bad,exc,match",
    [
        ("X4d", ValueError, "X must be"),
        ("Yshape", ValueError, "Y must be"),
        ("Ydtype", TypeError, "int64"),
        ("wshape", ValueError, "flat parameter vector"),
        ("lrshape", ValueError, "0-dim"),
    ],
)
def test_engine_rejects_bad_inputs(bad, exc, match):
    model, X, Y, w_start, w_target = _problem(2, 3, 1, 2, 2, 2, hidden=3, dtype=torch.float32)
    lr = torch.tensor(0.1)
    if bad == "X4d":
        X = X[0]
    elif bad == "Yshape":
        Y = Y[:, :2]
    elif bad == "Ydtype":
        Y = Y.float()
    elif bad == "wshape":
        w_start = w_start[:-1]
    elif bad == "lrshape":
        lr = lr.reshape(1)
    with pytest.raises(exc, match=match):
        NaiveEngine()(model, X, Y, w_start, w_target, lr)


def test_get_engine_names():
    assert ENGINES == ("exact", "naive", "first-order")
    assert isinstance(get_engine("naive"), NaiveEngine)
    with pytest.raises(ValueError, match="unknown engine"):
        get_engine("fast")


@pytest.mark.parametrize(
    "name,cls,first_order",
    [("exact", "ExactEngine", False), ("first-order", "FirstOrderEngine", True), (None, "ExactEngine", False),
     ("auto", "ExactEngine", False)],
)
def test_adjoint_engines_resolve(name, cls, first_order):
    """get_engine builds the adjoint engine of that name (None / auto: exact, the default), first-order flagged as
    the approximation it is, with the memory settings it was given (and none by default)."""
    from haba_fast.engines import adjoint

    eng = get_engine(name, memory_budget="2MB", offload_weights=True)
    assert type(eng) is getattr(adjoint, cls)
    assert eng.name == ("first-order" if first_order else "exact")
    assert eng.first_order is first_order and eng.approximate is first_order
    assert eng.memory_budget == 2 * 2**20 and eng.offload_weights is True
    plain = get_engine(name)
    assert plain.memory_budget == 0 and plain.offload_weights is False


def test_exact_engine_matches_naive():
    model, X, Y, w_start, w_target = _problem(4, 3, 1, 3, 3, 3, hidden=5, dtype=torch.float64)
    grads = []
    for name in ("naive", "exact"):
        Xr = X.clone().requires_grad_(True)
        lr = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
        loss = get_engine(name)(model, Xr, Y, w_start, w_target, lr)
        grads.append((loss.detach(), *torch.autograd.grad(loss, [Xr, lr])))
    for a, b in zip(*grads):
        assert_close(a, b, rtol=1e-7, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------------------
# Index stream and step plan


def _reference_chunks(n, b, g, draws, iterations):
    """The reference's --batch_syn draws: per iteration an emptied chunk list; a permutation split into chunks of b
    when it is empty; the last chunk popped."""
    out = []
    for _ in range(iterations):
        chunks = []
        for _ in range(draws):
            if not chunks:
                chunks = list(torch.split(torch.randperm(n, generator=g), b))
            out.append(chunks.pop())
    return out


@pytest.mark.parametrize("n,b", [(10, 10), (10, 5), (12, 3), (13, 13), (5, 1)])
@pytest.mark.parametrize("draws", [1, 3, 7])
def test_index_stream_draws_the_references_chunks(n, b, draws):
    s, g = IndexStream(n, b), torch.Generator().manual_seed(1)
    ours = []
    for _ in range(4):
        s.start_iteration()
        ours += [s.next(g) for _ in range(draws)]
    oracle = _reference_chunks(n, b, torch.Generator().manual_seed(1), draws, 4)
    assert len(ours) == len(oracle) and all(torch.equal(x, y) for x, y in zip(ours, oracle))
    assert all(x.shape == (b,) and x.dtype == torch.long for x in ours)


def test_index_stream_refuses_a_batch_that_does_not_divide():
    with pytest.raises(ValueError, match="--batch_syn 3 does not divide the 7 synthetic samples.*e.g. 1 or 7"):
        IndexStream(7, 3)
    with pytest.raises(ValueError, match="--batch_syn 256 does not divide the 500 .*e.g. 250 or 500"):
        IndexStream(500, 256)


def test_index_stream_state_roundtrip_and_errors():
    g = torch.Generator().manual_seed(2)
    s = IndexStream(12, 3)
    s.next(g)
    state, gstate = s.state_dict(), g.get_state()
    a = [s.next(g) for _ in range(6)]
    s2 = IndexStream(12, 3)
    s2.load_state_dict(state)
    g.set_state(gstate)
    b = [s2.next(g) for _ in range(6)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # A checkpoint written before the chunks were kept: its unused indices in order, taken from the front.
    old = IndexStream(12, 3)
    old.load_state_dict({"n": 12, "batch": 3, "pending": torch.arange(6)})
    assert [old.next(g).tolist() for _ in range(2)] == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="batch"):
        IndexStream(7, 8)
    with pytest.raises(ValueError, match="n=12"):
        IndexStream(6, 3).load_state_dict(state)


def _plans_equal(p, q):
    assert torch.equal(p.base_idx, q.base_idx) and torch.equal(p.hall_idx, q.hall_idx)
    for a, b in zip(p.aug, q.aug):
        assert a.family == b.family
        assert all(torch.equal(a.values[k], b.values[k]) for k in a.values)
    for pa, pb in ((p.club, q.club), (p.adversary, q.adversary)):
        assert torch.equal(pa.base_idx, pb.base_idx) and torch.equal(pa.hall_pair, pb.hall_pair)
        assert pa.aug.family == pb.aug.family


def test_plan_is_reproducible_from_the_generator():
    plans = []
    for _ in range(2):
        g = torch.Generator().manual_seed(5)
        plans.append(sample_plan(IndexStream(12, 4), 6, 3, (8, 8), adversarial=True, generator=g))
    _plans_equal(*plans)
    p = plans[0]
    assert p.base_idx.shape == (6, 4) and p.hall_idx.shape == (6,)
    assert len(p.aug) == 6 and all(a.n == 4 for a in p.aug)
    assert p.club.aug.n == 8 and p.club.hall_pair[0] != p.club.hall_pair[1]
    assert p.hall_idx.min() >= 0 and p.hall_idx.max() < 3


def test_plan_without_augmentation_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    p = sample_plan(IndexStream(4, 4), 2, 1, (4, 4), strategy="none", generator=torch.Generator().manual_seed(0))
    assert torch.equal(before, torch.get_rng_state())
    assert p.aug is None and p.club is None and torch.equal(p.hall_idx, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="syn_steps"):
        sample_plan(IndexStream(4, 4), 0, 1, (4, 4))


def test_augment_groups_equals_per_step_apply():
    from haba_fast.objectives.mtt import augment_groups

    g = torch.Generator().manual_seed(0)
    G, B = 9, 3
    params = [augment.sample("color_crop_cutout_flip_scale_rotate", B, (7, 5), generator=g) for _ in range(G)]
    assert len({p.family for p in params}) > 1  # the test needs mixed families
    x = torch.randn(G * B, 2, 7, 5, generator=g, requires_grad=True)
    out = augment_groups(x, params, B)
    ref = torch.cat([augment.apply(x[i * B : (i + 1) * B], params[i]) for i in range(G)])
    assert_close(out, ref)
    w = torch.randn(out.shape, generator=g)
    (ga,) = torch.autograd.grad((out * w).sum(), x)
    (gb,) = torch.autograd.grad((ref * w).sum(), x)
    assert_close(ga, gb)
    with pytest.raises(ValueError, match="groups"):
        augment_groups(x[:-1], params, B)
