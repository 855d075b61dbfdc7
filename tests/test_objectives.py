"""MTT objective (Pixels / HaBa inputs and gradients) and the adversarial contrastive term."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from utils import assert_close

from haba_fast import augment
from haba_fast.engines import NaiveEngine
from haba_fast.factorization import HaBa, Pixels
from haba_fast.objectives.contrastive import Adversary, AdversaryWeights, adversary_loss, club_loss, supcon_loss
from haba_fast.objectives.mtt import build_inputs, synthetic_labels, trajectory_loss
from haba_fast.plan import IndexStream, sample_plan


def supcon_loop(features, labels, tau=0.07):
    """SupCon written as the paper's sum, one anchor at a time (the oracle)."""
    B, V, _ = features.shape
    z = [features[b, v] for v in range(V) for b in range(B)]
    y = [int(labels[b]) for v in range(V) for b in range(B)]
    total = 0.0
    for i in range(len(z)):
        others = [k for k in range(len(z)) if k != i]
        denom = torch.logsumexp(torch.stack([z[i] @ z[k] / tau for k in others]), 0)
        pos = [k for k in others if y[k] == y[i]]
        total = total + sum((z[i] @ z[p] / tau - denom) for p in pos) / len(pos)
    return -total / len(z)


@pytest.mark.parametrize("B,V,D", [(4, 2, 3), (7, 2, 5), (3, 3, 2)])
def test_supcon_matches_loop(B, V, D):
    g = torch.Generator().manual_seed(B)
    f = F.normalize(torch.randn(B, V, D, generator=g, dtype=torch.float64), dim=2)
    y = torch.randint(2, (B,), generator=g)
    assert_close(supcon_loss(f, y), supcon_loop(f, y))
    f.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: supcon_loss(t, y), (f,))


def test_supcon_rejects_bad_shapes():
    with pytest.raises(ValueError, match="B, V, D"):
        supcon_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        supcon_loss(torch.randn(4, 2, 3), torch.zeros(3, dtype=torch.long))


def test_club_loss_values():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert club_loss(a, a).item() == pytest.approx(1.0)  # identical features: cos = 1
    assert club_loss(a, -a).item() == pytest.approx(0.0)  # opposite: cos = -1
    b = torch.tensor([[0.0, 1.0], [3.0, 0.0]])
    assert club_loss(a, b).item() == pytest.approx(0.5)  # orthogonal


@pytest.mark.parametrize("C,H,W,dim", [(3, 32, 32, 2048), (1, 28, 28, 2048), (1, 8, 8, 128), (3, 13, 17, 128 * 1 * 2)])
def test_adversary_shapes(C, H, W, dim):
    net = Adversary(C, 10, (H, W), generator=torch.Generator().manual_seed(0))
    logits, feat = net(torch.randn(2, C, H, W))
    assert logits.shape == (2, 10) and feat.shape == (2, dim) and net.feature_dim == dim
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 3 and all(m.num_groups == m.num_channels == 128 for m in norms)


def test_adversary_init_is_reproducible_and_too_small_input_is_an_error():
    a = Adversary(1, 3, (8, 8), generator=torch.Generator().manual_seed(1))
    b = Adversary(1, 3, (8, 8), generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="too small"):
        Adversary(3, 10, (4, 4))


def test_adversary_loss_terms():
    g = torch.Generator().manual_seed(0)
    net = Adversary(1, 4, (8, 8), generator=g)
    x = torch.randn(10, 1, 8, 8, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0])
    w = AdversaryWeights(club=0.1, cls=1.0, likeli=0.5, contrast=0.25)
    out = adversary_loss(net, x, y, w)
    logits, feat = net(x)
    cls = F.cross_entropy(logits, torch.cat([y, y]))
    likeli = ((1 - F.cosine_similarity(feat[:5], feat[5:])) / 2).mean() * 0.5
    contrast = supcon_loop(torch.stack([F.normalize(feat[:5], dim=1), F.normalize(feat[5:], dim=1)], 1), y) * 0.25
    assert_close(out["cls"], cls)
    assert_close(out["likeli"], likeli)
    assert_close(out["contrast"], contrast, rtol=1e-4, atol=1e-5)
    assert_close(out["total"], cls + likeli + contrast, rtol=1e-4, atol=1e-5)
    out["total"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    with pytest.raises(ValueError, match="2 ×"):
        adversary_loss(net, x[:9], y, w)


# ---------------------------------------------------------------------------------------------------------------------
# MTT on both parameterizations


def _tiny_student(C, K, size):
    from haba_fast.models import flatten_params, get_network

    g = torch.Generator().manual_seed(3)
    net = get_network("ConvNetW32", C, K, size, generator=g)
    w0 = flatten_params(net)
    w1 = w0 + 0.05 * torch.randn(w0.shape, generator=g)
    return net, w0, w1


def _haba(K=3, bpc=2, C=1, size=(8, 8), Hn=3):
    return HaBa(K, bpc, C, size, n_hallucinators=Hn, generator=torch.Generator().manual_seed(1))


def test_build_inputs_haba_matches_per_step_generate_and_augment():
    syn = _haba()
    g = torch.Generator().manual_seed(4)
    plan = sample_plan(IndexStream(syn.num_bases, 3), 5, syn.n_hallucinators, syn.im_size, generator=g)
    X, Y = build_inputs(syn, plan)
    assert X.shape == (5, 3, 1, 8, 8) and Y.shape == (5, 3)
    for t in range(5):
        b = plan.base_idx[t]
        x = syn.generate(b, plan.hall_idx[t].repeat(3))
        assert_close(X[t], augment.apply(x, plan.aug[t]))
        assert torch.equal(Y[t], syn.base_labels[b])
    # replay: the same plan gives the same inputs
    X2, _ = build_inputs(syn, plan)
    assert torch.equal(X, X2)


@pytest.mark.parametrize("mode", ["S", "M"])
def test_step_plan_to_moves_every_tensor_and_keeps_the_draws(mode):
    """StepPlan.to (once per iteration, so that a GPU step copies nothing from the host): every tensor of the plan,
    of the per-step augmentation ("M": a chain per step) and of the adversarial draws goes to the device with its
    shape and dtype; the augmentations' families, sizes and cutout ratios stay."""
    syn = _haba()
    g = torch.Generator().manual_seed(4)
    plan = sample_plan(
        IndexStream(syn.num_bases, 3), 4, syn.n_hallucinators, syn.im_size, mode=mode, adversarial=True, generator=g
    )
    moved = plan.to("meta")

    def chains(p):
        steps = [a for step in p.aug for a in (step if isinstance(step, list) else [step])]
        pairs = [a for pair in (p.club, p.adversary) for a in (pair.aug if isinstance(pair.aug, list) else [pair.aug])]
        return steps + pairs

    assert [(a.family, a.n, a.cutout_ratio) for a in chains(moved)] == [
        (a.family, a.n, a.cutout_ratio) for a in chains(plan)
    ]

    def aug_tensors(aug):
        chain = aug if isinstance(aug, list) else [aug]  # "M": a chain of AugParams
        return [v for a in chain for v in a.values.values()]

    def tensors(p):
        out = [p.base_idx, p.hall_idx] + [v for step in p.aug for v in aug_tensors(step)]
        for pair in (p.club, p.adversary):
            out += [pair.base_idx, pair.hall_pair] + aug_tensors(pair.aug)
        return out

    before, after = tensors(plan), tensors(moved)
    assert len(after) == len(before) > 10
    assert all(t.device.type == "meta" for t in after) and all(t.device.type == "cpu" for t in before)
    assert all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(after, before))
    assert all(a is b for a, b in zip(tensors(plan.to("cpu")), before))  # already there: the same tensors
    assert moved.num_steps == 4 and moved.batch == 3


def test_build_inputs_pixels():
    syn = Pixels(3, 2, 1, (8, 8), generator=torch.Generator().manual_seed(0))
    plan = sample_plan(IndexStream(6, 6), 2, 1, (8, 8), strategy="none", generator=torch.Generator().manual_seed(0))
    X, Y = build_inputs(syn, plan)
    assert torch.equal(X[1], syn.images[plan.base_idx[1]])
    assert torch.equal(Y, synthetic_labels(syn)[plan.base_idx])


@pytest.mark.parametrize("kind", ["haba", "pixels"])
def test_trajectory_loss_gradients_finite_and_nonzero(kind):
    syn = _haba() if kind == "haba" else Pixels(3, 2, 1, (8, 8), generator=torch.Generator().manual_seed(0))
    net, w0, w1 = _tiny_student(1, 3, (8, 8))
    M = syn.num_bases if kind == "haba" else 6
    plan = sample_plan(
        IndexStream(M, 3), 3, getattr(syn, "n_hallucinators", 1), (8, 8), generator=torch.Generator().manual_seed(2)
    )
    lr = torch.tensor(0.01, requires_grad=True)
    loss = trajectory_loss(NaiveEngine(), net, syn, plan, w0, w1, lr)
    assert math.isfinite(loss.item())
    loss.backward()
    params = [syn.bases, *syn.hallucinator_parameters()] if kind == "haba" else [syn.images]
    used_halls = set(plan.hall_idx.tolist())
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    if kind == "haba":
        for p in syn.hallucinator_parameters():
            # every hallucinator that an unrolled step used gets a gradient, the others none
            for h in range(syn.n_hallucinators):
                assert (p.grad[h].abs().sum() > 0) == (h in used_halls)
        used_bases = set(plan.base_idx.flatten().tolist())
        for b in range(syn.num_bases):
            assert (syn.bases.grad[b].abs().sum() > 0) == (b in used_bases)
    else:
        assert syn.images.grad.abs().sum() > 0
    assert lr.grad is not None and lr.grad != 0 and torch.isfinite(lr.grad)
