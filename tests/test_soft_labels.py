"""Soft labels: learnable label logits in Pixels / HaBa, the soft cross-entropy, storage, checkpoints, training and
evaluation with them, and MTT's soft-label unroll against an independent float64 oracle."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from haba_fast.factorization import SOFT_LABEL_INIT_P, HaBa, Pixels, load_synthetic
from haba_fast.models import functional_forward, get_network
from haba_fast.training import soft_cross_entropy, train_network

D = torch.float64


@pytest.mark.parametrize("B,K", [(1, 2), (5, 3), (7, 10)])
def test_soft_cross_entropy_matches_oracle(B, K):
    g = torch.Generator().manual_seed(B * K)
    logits = torch.randn(B, K, generator=g, dtype=D, requires_grad=True)
    t_logits = torch.randn(B, K, generator=g, dtype=D, requires_grad=True)
    targets = torch.softmax(t_logits, 1)
    loss = soft_cross_entropy(logits, targets)
    # Oracle: -sum_k p_k log(exp(z_k) / sum_j exp(z_j)), averaged over the batch, sample by sample.
    ref = sum(-(targets[i] * (logits[i] - torch.log(torch.exp(logits[i]).sum()))).sum() for i in range(B)) / B
    assert torch.allclose(loss, ref, rtol=1e-12)
    got = torch.autograd.grad(loss, [logits, t_logits], retain_graph=True)  # the softmax is shared with ref
    for a, b in zip(got, torch.autograd.grad(ref, [logits, t_logits])):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    hard = torch.randint(K, (B,), generator=g)
    assert torch.equal(soft_cross_entropy(logits, hard), F.cross_entropy(logits, hard))
    with pytest.raises(ValueError, match="soft targets"):
        soft_cross_entropy(logits, targets[:, :1])


def _sets(soft):
    g = torch.Generator().manual_seed(0)
    return (
        Pixels(4, 3, 1, (8, 8), generator=g, soft_labels=soft),
        HaBa(4, 2, 1, (8, 8), n_hallucinators=3, generator=g, soft_labels=soft),
    )


def test_init_storage_and_targets():
    for hard, soft in zip(_sets(False), _sets(True)):
        assert hard.label_targets() is None and hard.label_logits is None
        M = soft.label_logits.shape[0]
        assert soft.label_logits.shape == (M, 4)
        p = soft.label_targets()
        own = torch.arange(4).repeat_interleave(M // 4)
        assert torch.allclose(p[torch.arange(M), own], torch.full((M,), SOFT_LABEL_INIT_P))
        assert torch.allclose(p.sum(1), torch.ones(M))
        # Storage counts the logits: M*K floats more.
        assert soft.storage(100).floats - hard.storage(100).floats == M * 4
        assert soft.storage(100).image_equivalents == pytest.approx(hard.storage(100).image_equivalents + M * 4 / 64)
        # The data parameter stays first (checkpoints take the dtype from it).
        assert next(iter(soft.parameters())) is (soft.images if isinstance(soft, Pixels) else soft.bases)


def test_checkpoint_round_trip_own_and_reference_format(tmp_path):
    for syn in _sets(True):
        with torch.no_grad():
            syn.label_logits.add_(torch.randn(syn.label_logits.shape, generator=torch.Generator().manual_seed(1)))
        path = syn.save(tmp_path / f"{syn.kind}.pt", {"lr": 0.01})
        back = load_synthetic(path)
        assert back.soft_labels and torch.equal(back.label_logits, syn.label_logits.detach())
        ref = tmp_path / f"ref_{syn.kind}"
        written = syn.to_reference(ref, it=7)
        assert ref / "label_logits_7.pt" in written
        again = load_synthetic(ref, it=7, num_classes=4)
        assert type(again) is type(syn) and torch.equal(again.label_logits, syn.label_logits.detach())
    # A hard-label set writes no logits file and loads back without soft labels.
    hard = _sets(False)[1]
    hard.to_reference(tmp_path / "hard", it=1)
    assert not (tmp_path / "hard" / "label_logits_1.pt").exists()
    assert load_synthetic(tmp_path / "hard", it=1, num_classes=4).label_logits is None


def test_bad_soft_label_file_is_a_clear_error(tmp_path):
    syn = _sets(True)[0]
    syn.to_reference(tmp_path, it=2)
    torch.save(torch.zeros(3, 3), tmp_path / "label_logits_2.pt")
    with pytest.raises(ValueError, match="soft label logits must be"):
        load_synthetic(tmp_path, it=2, num_classes=4)


def test_training_on_one_hot_soft_targets_equals_hard_labels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 1, 8, 8, generator=g)
    y = torch.arange(4).repeat(3)
    runs = []
    for labels in (y, F.one_hot(y, 4).float()):
        net = get_network("ConvNetW32", 1, 4, (8, 8), generator=torch.Generator().manual_seed(1))
        h = train_network(
            net, x, labels, epochs=3, lr=0.05, batch_size=5, dsa=False, generator=torch.Generator().manual_seed(2)
        )
        runs.append((h.losses, [p.detach().clone() for p in net.parameters()], h.accuracies))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-6)
    assert runs[0][2] == runs[1][2]
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", [0, 1])
def test_evaluation_trains_on_the_soft_targets(monkeypatch, kind):
    import haba_fast.evaluate as ev
    from haba_fast import data

    digits = data.load("digits", subset_per_class=10, generator=torch.Generator().manual_seed(0))
    syn = (
        Pixels(10, 1, 1, (8, 8), generator=torch.Generator().manual_seed(0), soft_labels=True),
        HaBa(10, 1, 1, (8, 8), n_hallucinators=2, generator=torch.Generator().manual_seed(0), soft_labels=True),
    )[kind]
    seen = []
    real_train = ev.train_network

    def spy(net, source, **kw):
        x, y = source(0, torch.Generator().manual_seed(0)) if callable(source) else source
        seen.append(y)
        return real_train(net, source, **kw)

    monkeypatch.setattr(ev, "train_network", spy)
    res = ev.evaluate_synthetic(syn, digits, ev.EvalConfig(models=("ConvNetW32",), num_eval=1, epochs=1, device="cpu"))
    assert math.isfinite(res.mean())
    assert seen[0].shape == (10, 10) and torch.allclose(seen[0], syn.label_targets().detach())


def test_mtt_soft_label_unroll_matches_oracle():
    from haba_fast.objectives.mtt import soft_label_trajectory_loss
    from haba_fast.plan import IndexStream, sample_plan

    K, bpc, Hn, N = 3, 2, 2, 3
    h = HaBa(K, bpc, 1, (6, 6), n_hallucinators=Hn, generator=torch.Generator().manual_seed(0), soft_labels=True)
    h = h.double()
    with torch.no_grad():
        h.label_logits.add_(torch.randn(h.label_logits.shape, generator=torch.Generator().manual_seed(1), dtype=D))
    net = get_network("ConvNetW32", 1, K, (6, 6), generator=torch.Generator().manual_seed(2), dtype=D)
    P = sum(p.numel() for p in net.parameters())
    g = torch.Generator().manual_seed(3)
    w_start = torch.randn(P, generator=g, dtype=D) * 0.1
    w_target = w_start + 0.01 * torch.randn(P, generator=g, dtype=D)
    lr = torch.tensor(0.05, dtype=D, requires_grad=True)
    plan = sample_plan(IndexStream(K * bpc, 3), N, Hn, (6, 6), strategy="none", generator=g)
    loss = soft_label_trajectory_loss(net, h, plan, w_start, w_target, lr)
    # Oracle: the same unroll written out, each sample generated by conv2d / conv_transpose2d directly.
    w = w_start.clone().requires_grad_(True)
    for t in range(N):
        k = int(plan.hall_idx[t])
        rows = plan.base_idx[t]
        z = F.conv2d(h.bases[rows], h.enc_weight[k], h.enc_bias[k]) * h.scale[k] + h.shift[k]
        x = F.conv_transpose2d(z, h.dec_weight[k], h.dec_bias[k])
        p = torch.softmax(h.label_logits, 1)[rows]
        ce = -(p * torch.log_softmax(functional_forward(net, w, x), 1)).sum(1).mean()
        (gw,) = torch.autograd.grad(ce, w, create_graph=True)
        w = w - lr * gw
    ref = ((w - w_target) ** 2).sum() / ((w_start - w_target) ** 2).sum()
    params = [lr, h.bases, h.label_logits] + h.hallucinator_parameters()
    assert torch.allclose(loss, ref, rtol=1e-10)
    for a, b in zip(torch.autograd.grad(loss, params), torch.autograd.grad(ref, params)):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12) and b.abs().sum() > 0


def test_distiller_trains_soft_labels_with_every_objective():
    from haba_fast import data
    from haba_fast.distill import DistillConfig, Distiller, apply_objective
    from haba_fast.models import flatten_params

    digits = data.load("digits", subset_per_class=20, generator=torch.Generator().manual_seed(0))

    class Buffer:  # two snapshots apart: enough for one MTT iteration
        num_trajectories, num_epochs = 1, 2

        def __init__(self, w0):
            self.w = [w0, w0 + 0.01, w0 + 0.02]

        def snapshot(self, traj, epoch):
            return self.w[epoch].clone()

    net = get_network("ConvNetW32", 1, 10, (8, 8), generator=torch.Generator().manual_seed(0))
    buf = Buffer(flatten_params(net))
    for objective in ("mtt", "dc", "dsa", "dm"):
        cfg = apply_objective(DistillConfig(), objective)
        cfg.__dict__.update(
            dataset="digits",
            model="ConvNetW32",
            ipc=1,
            n_hallucinators=2,
            device="cpu",
            num_eval=0,
            syn_steps=2,
            expert_epochs=1,
            max_start_epoch=1,
            outer_loop=2 if objective in ("dc", "dsa") else None,
            inner_loop=1 if objective in ("dc", "dsa") else None,
            batch_real=8,
            soft_labels=True,
            engine="naive",
        )
        d = Distiller(cfg, digits, buf if objective == "mtt" else None)
        before = d.synthetic.label_logits.detach().clone()
        d.step()
        assert d.synthetic.label_logits.grad is not None and d.synthetic.label_logits.grad.abs().sum() > 0, objective
        assert not torch.equal(before, d.synthetic.label_logits), objective
        assert "opt_label" in d.state_dict() and d.state_dict()["opt_label"] is not None
