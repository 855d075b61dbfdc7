"""The distillation iteration, the run loop (checkpoints, resume, divergence) and `haba-fast distill` flags."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from haba_fast import data
from haba_fast.distill import (
    PRESETS,
    DistillConfig,
    Distiller,
    DivergenceError,
    distill,
    eval_iterations,
)

MODEL = "ConvNetW32"




class ToyBuffer:
    """Expert trajectories computed here by plain SGD (no augmentation): the in-memory buffer interface."""

    def __init__(self, snaps):
        self.snaps = snaps  # [T, E+1, P]
        self.num_trajectories, self.num_epochs = snaps.shape[0], snaps.shape[1] - 1

    def snapshot(self, traj, epoch):
        return self.snaps[traj, epoch].clone()


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", subset_per_class=30, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def buffer(digits):
    from haba_fast.models import flatten_params, functional_forward, get_network

    g = torch.Generator().manual_seed(0)
    net = get_network(MODEL, digits.channels, digits.num_classes, digits.im_size, generator=g)
    trajs = []
    for _ in range(2):
        w = flatten_params(net) + 0.01 * torch.randn(flatten_params(net).shape, generator=g)
        snaps = [w.clone()]
        for _epoch in range(4):
            for _ in range(4):
                idx = torch.randint(digits.train_labels.numel(), (64,), generator=g)
                w = w.requires_grad_(True)
                loss = F.cross_entropy(functional_forward(net, w, digits.train_images[idx]), digits.train_labels[idx])
                (grad,) = torch.autograd.grad(loss, w)
                w = (w - 0.05 * grad).detach()
            snaps.append(w.clone())
        trajs.append(torch.stack(snaps))
    return ToyBuffer(torch.stack(trajs))


def _cfg(**kw):
    base = dict(
        dataset="digits",
        model=MODEL,
        ipc=1,
        n_hallucinators=3,
        syn_steps=4,
        expert_epochs=1,
        max_start_epoch=2,
        iterations=3,
        engine="naive",
        device="cpu",
        num_eval=0,
        lr_img=100.0,
        lr_style=100.0,
        lr_lr=1e-5,
        seed=0,
    )
    base.update(kw)
    return DistillConfig(**base)


# ---------------------------------------------------------------------------------------------------------------------
# The iteration


def test_step_updates_every_parameter(digits, buffer):
    d = Distiller(_cfg(), digits, buffer)
    before = {n: p.detach().clone() for n, p in d.synthetic.named_parameters()}
    adv_before = [p.detach().clone() for p in d.adversary.parameters()]
    lr_before = d.syn_lr.item()
    m = d.step()
    for key in ("loss", "club", "grand", "adv_loss", "adv_cls", "adv_likeli", "adv_contrast", "syn_lr", "start_epoch"):
        assert key in m and math.isfinite(m[key]), key
    assert m["grand"] == pytest.approx(m["loss"] + m["club"], rel=1e-5)
    for n, p in d.synthetic.named_parameters():
        assert torch.isfinite(p).all() and not torch.equal(p, before[n]), n
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    assert d.syn_lr.item() != lr_before and d.syn_lr.grad is not None and torch.isfinite(d.syn_lr.grad)
    assert any(not torch.equal(p, q) for p, q in zip(d.adversary.parameters(), adv_before))
    assert d.iteration == 1


def test_step_logs_the_hallucinators_weight_norms(digits, buffer):
    d = Distiller(_cfg(), digits, buffer)
    first = d.step()
    syn = d.synthetic
    # Oracle: the norm of every hallucinator's weights, summed in squares one hallucinator at a time, after the step.
    for key, weight in (("hall_enc_norm", syn.enc_weight), ("hall_dec_norm", syn.dec_weight)):
        want = math.sqrt(sum(float((weight[h].detach().double() ** 2).sum()) for h in range(syn.n_hallucinators)))
        assert first[key] == pytest.approx(want, rel=1e-6), key
    with torch.no_grad():
        syn.dec_weight.mul_(3.0)
    second = d.step()
    assert second["hall_dec_norm"] > 2.5 * first["hall_dec_norm"]  # logged from the current weights, not a cache


def test_pixels_step_has_no_adversary(digits, buffer):
    d = Distiller(_cfg(parameterization="pixels", ipc=2), digits, buffer)
    before = d.synthetic.images.detach().clone()
    m = d.step()
    assert d.adversary is None and "club" not in m and "hall_enc_norm" not in m
    assert not torch.equal(before, d.synthetic.images)


@pytest.mark.parametrize("parameterization", ["pixels", "haba"])
def test_loss_decreases_on_a_fixed_toy_problem(digits, buffer, parameterization):
    # One trajectory, one start epoch, no augmentation, all bases in every step: the objective is deterministic
    # up to the hallucinator draws, so distillation must lower it.
    cfg = _cfg(
        parameterization=parameterization,
        ipc=2,
        max_start_epoch=1,
        dsa=False,
        syn_steps=4,
        lr_img=1000.0,
        lr_style=1000.0,
        lr_lr=0.0,
        lambda_club_content=0.0,
        n_hallucinators=2,
    )
    one = ToyBuffer(buffer.snaps[:1])
    d = Distiller(cfg, digits, one)
    losses = [d.step()["loss"] for _ in range(12)]
    assert sum(losses[-3:]) / 3 < 0.97 * sum(losses[:3]) / 3, losses


def test_min_lr_floor(digits, buffer):
    d = Distiller(_cfg(lr_teacher=0.002, min_lr=0.0015, lr_lr=1e3), digits, buffer)
    for _ in range(2):
        d.step()
        assert d.syn_lr.item() >= 0.0015 - 1e-9


def test_budget_ipc_chooses_bpc(digits, buffer):
    from haba_fast.factorization import budget_bpc

    d = Distiller(_cfg(budget_ipc=3, n_hallucinators=2), digits, buffer)
    assert d.synthetic.bpc == budget_bpc(3, 2, 3, 1, 1, (8, 8), num_classes=10) == 2
    s = d.synthetic.storage(digits.train_labels.numel())
    assert s.floats <= 10 * 3 * 64


def test_plan_replays_exactly(digits, buffer):
    # Two distillers with the same seed draw the same plans, so they produce identical iterations.
    a, b = Distiller(_cfg(), digits, buffer), Distiller(_cfg(), digits, buffer)
    for _ in range(2):
        ma, mb = a.step(), b.step()
        assert ma == mb
    assert torch.equal(a.synthetic.bases, b.synthetic.bases)


def test_identical_snapshots_are_reported(digits, buffer):
    aliased = ToyBuffer(buffer.snaps[:, -1:].expand(-1, 5, -1).clone())  # the reference's CPU aliasing bug
    d = Distiller(_cfg(), digits, aliased)
    with pytest.raises(ValueError, match="identical"):
        d.step()


def test_buffer_for_another_model_is_reported(digits, buffer):
    with pytest.raises(ValueError, match="parameters per snapshot"):
        Distiller(_cfg(model="ConvNetW64"), digits, buffer)
    with pytest.raises(ValueError, match="max_start_epoch"):
        Distiller(_cfg(max_start_epoch=4, expert_epochs=2), digits, buffer)


def test_divergence_stops_before_updating(digits, buffer):
    d = Distiller(_cfg(), digits, buffer)
    with torch.no_grad():
        d.syn_lr.fill_(1e9)
    before = d.synthetic.bases.detach().clone()
    with pytest.raises(DivergenceError, match="lower --lr_img"):
        d.step()
    assert torch.equal(before, d.synthetic.bases) and d.iteration == 0


def test_state_dict_roundtrip(digits, buffer):
    a = Distiller(_cfg(), digits, buffer)
    a.step()
    state = a.state_dict()
    b = Distiller(_cfg(seed=5), digits, buffer)
    b.load_state_dict(state)
    assert a.step() == b.step()
    with pytest.raises(ValueError, match="n_hallucinators"):
        Distiller(_cfg(n_hallucinators=2), digits, buffer).load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------------------
# The run loop


class Kill(Exception):
    pass


def test_batch_syn_that_does_not_divide_the_set_is_refused(digits, buffer):
    """--batch_syn chunks a permutation of the synthetic rows (the reference's draws); a size that does not divide
    them would need a smaller last batch, so it is a clear error naming divisors, before anything runs."""
    with pytest.raises(ValueError, match="--batch_syn 3 does not divide the 10 synthetic samples.*e.g. 2 or 5"):
        Distiller(_cfg(batch_syn=3), digits, buffer, device="cpu")
    assert Distiller(_cfg(batch_syn=5), digits, buffer, device="cpu").stream.batch == 5


def test_checkpoint_kill_and_resume(digits, buffer, tmp_path):
    from haba_fast.factorization import HaBa, load_synthetic

    cfg = _cfg(iterations=4, checkpoint_every=2)
    full = distill(cfg, digits, buffer, tmp_path / "full", progress=False, log=lambda s: None)

    def killer(distiller, metrics):
        if distiller.iteration == 3:
            raise Kill()

    run = tmp_path / "run"
    with pytest.raises(Kill):
        distill(cfg, digits, buffer, run, progress=False, log=lambda s: None, on_iteration=killer)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["iteration"] == 2
    with pytest.raises(ValueError, match="--resume"):
        distill(cfg, digits, buffer, run, progress=False, log=lambda s: None)
    logs = []
    res = distill(cfg, digits, buffer, run, resume=True, progress=False, log=logs.append)
    assert any("resuming" in s and "iteration 2" in s for s in logs)
    assert res.iterations == 4
    # the resumed run continues exactly where the saved one stopped
    torch.testing.assert_close(res.synthetic.bases, full.synthetic.bases)
    assert res.syn_lr == pytest.approx(full.syn_lr)
    hist = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["iteration"] for h in hist] == [0, 1, 2, 3]
    # our format and the reference format are both there and agree
    ours = load_synthetic(run / "synthetic_4.pt")
    ref = HaBa.load_reference_dir(run / "reference", it=4, num_classes=10)
    torch.testing.assert_close(ours.bases, res.synthetic.bases.detach())
    torch.testing.assert_close(ref.bases, res.synthetic.bases.detach())
    assert (run / "reference" / "syn_lr_2.pt").exists() and (run / "synthetic.png").stat().st_size > 0


def test_a_finished_run_resumed_rewrites_nothing(digits, buffer, tmp_path):
    """Resuming a finished run returns its set and leaves every file as it was (a results table records the set's
    bytes; rewriting it under a newer config schema would orphan that record). A missing final file is written."""
    cfg = _cfg(iterations=2, checkpoint_every=1)
    first = distill(cfg, digits, buffer, tmp_path, progress=False, log=lambda s: None)
    def files():
        return {p.name: (p.read_bytes(), p.stat().st_mtime_ns if p.suffix == ".pt" else None)
                for p in tmp_path.iterdir() if p.is_file()}

    before = files()
    again = distill(cfg, digits, buffer, tmp_path, resume=True, progress=False, log=lambda s: None)
    assert files() == before
    torch.testing.assert_close(again.synthetic.bases, first.synthetic.bases)
    assert again.iterations == 2 and again.checkpoint == tmp_path / "checkpoint.pt"
    (tmp_path / "synthetic.pt").unlink()  # a run killed after its last checkpoint, before the final set
    distill(cfg, digits, buffer, tmp_path, resume=True, progress=False, log=lambda s: None)
    from haba_fast.factorization import load_synthetic

    torch.testing.assert_close(load_synthetic(tmp_path / "synthetic.pt").bases, first.synthetic.bases.detach())


def test_divergence_keeps_last_good_checkpoint(digits, buffer, tmp_path):
    def blow_up(distiller, metrics):
        if distiller.iteration == 1:
            with torch.no_grad():
                distiller.syn_lr.fill_(1e9)

    # Bad steps are skipped; the second in a row stops the run (max_bad_steps=2), and no checkpoint is written
    # while they last.
    cfg = _cfg(iterations=3, checkpoint_every=1, max_bad_steps=2)
    with pytest.raises(DivergenceError, match="last good checkpoint"):
        distill(cfg, digits, buffer, tmp_path, progress=False, log=lambda s: None, on_iteration=blow_up)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["iteration"] == 1 and math.isfinite(float(state["syn_lr"]))


def test_periodic_evaluation(digits, buffer, tmp_path):
    cfg = _cfg(iterations=2, eval_it=1, num_eval=1, epoch_eval_train=2)
    res = distill(cfg, digits, buffer, tmp_path, progress=False, log=lambda s: None)
    assert [e["iteration"] for e in res.evaluations] == [0, 1, 2]  # distill_fac.py's pool: arange(0, 3, 1)
    assert 0.0 <= res.evaluations[-1][MODEL]["mean"] <= 1.0
    assert (tmp_path / "synthetic_best.pt").exists() and (tmp_path / "reference" / "weights_best.pt").exists()


# Each evaluation's mean per network: A and B as under --eval_mode M. Iteration 2 beats neither network's best;
# iteration 3 beats B's only (0.52 > 0.50) though it is below the best of all networks (0.60).
SCRIPTED_MEANS = {0: (0.50, 0.50), 1: (0.60, 0.40), 2: (0.55, 0.45), 3: (0.50, 0.52)}


def _scripted_evaluate(distiller, dataset, cfg, generator):
    a, b = SCRIPTED_MEANS[distiller.iteration]
    return {"iteration": distiller.iteration, "A": {"mean": a, "std": 0.0, "accs": [a]},
            "B": {"mean": b, "std": 0.0, "accs": [b]}}


def test_best_set_is_saved_when_any_network_beats_its_own_best(digits, buffer, tmp_path, monkeypatch):
    """The reference keeps a best per evaluated network (best_acc[model_eval]) and saves images_best.pt when any
    of them improves; the initialization (iteration 0) is evaluated and can be the best."""
    import haba_fast.distill as distill_mod

    monkeypatch.setattr(distill_mod, "_evaluate", _scripted_evaluate)
    saved = []

    def best_iteration():
        return torch.load(tmp_path / "synthetic_best.pt", weights_only=True)["meta"]["iteration"]

    def record(d, m):
        if (tmp_path / "synthetic_best.pt").exists():
            saved.append(best_iteration())

    cfg = _cfg(iterations=3, eval_it=1, num_eval=1, epoch_eval_train=1, checkpoint_every=1)
    res = distill(cfg, digits, buffer, tmp_path, progress=False, log=lambda s: None, on_iteration=record)
    assert [e["iteration"] for e in res.evaluations] == [0, 1, 2, 3]
    assert saved == [1, 1, 3]  # after iterations 1, 2, 3: iteration 0's best was replaced at 1, kept at 2
    meta = torch.load(tmp_path / "synthetic_best.pt", weights_only=True)["meta"]
    assert meta["best_accuracy"] == {"A": 0.60, "B": 0.52} and meta["accuracy"] == 0.52


def test_resumed_run_keeps_each_networks_best(digits, buffer, tmp_path, monkeypatch):
    import haba_fast.distill as distill_mod

    monkeypatch.setattr(distill_mod, "_evaluate", _scripted_evaluate)
    kw = dict(eval_it=1, num_eval=1, epoch_eval_train=1, checkpoint_every=1)
    distill(_cfg(iterations=2, **kw), digits, buffer, tmp_path, progress=False, log=lambda s: None)
    best = torch.load(tmp_path / "synthetic_best.pt", weights_only=True)["meta"]
    assert best["iteration"] == 1 and best["best_accuracy"] == {"A": 0.60, "B": 0.50}
    distill(_cfg(iterations=3, **kw), digits, buffer, tmp_path, resume=True, allow_changed=["iterations"],
            progress=False, log=lambda s: None)
    meta = torch.load(tmp_path / "synthetic_best.pt", weights_only=True)["meta"]
    assert meta["iteration"] == 3 and meta["best_accuracy"] == {"A": 0.60, "B": 0.52}


def test_eval_iterations_follow_the_reference():
    assert eval_iterations(DistillConfig(iterations=1000, eval_it=50)) == [900, 950, 1000]
    assert eval_iterations(DistillConfig(iterations=10, eval_it=100)) == [9, 10]  # np.arange(9, 11, 100) + the end
    assert eval_iterations(DistillConfig(iterations=10, num_eval=0)) == []
    # Fewer than 10 iterations: distill_fac.py's pool starts at (Iteration // 10) * 9 = 0, the initialization.
    assert eval_iterations(DistillConfig(iterations=5, eval_it=100)) == [0, 5]
    assert eval_iterations(DistillConfig(iterations=0, eval_it=100)) == [0]
    assert eval_iterations(DistillConfig(parameterization="pixels", iterations=250, eval_it=100)) == [0, 100, 200, 250]


# ---------------------------------------------------------------------------------------------------------------------
# Flags


def _parse(argv):
    from haba_fast.cli import build_parser
    from haba_fast.commands.distill import config_from_args

    args = build_parser().parse_args(["distill", *argv])
    return args, config_from_args(args)


REF = [
    "--dataset=CIFAR10",
    "--ipc=10",
    "--n_style=5",
    "--syn_steps=30",
    "--expert_epochs=2",
    "--max_start_epoch=20",
    "--zca",
    "--lr_img=100",
    "--lr_lr=1e-05",
    "--pix_init",
    "real",
    "--lr_teacher=0.001",
    "--buffer_path=/b",
    "--data_path=/d",
    "--lr_style",
    "100",
    "--lambda_club_content",
    "0.1",
    "--lambda_contrast_content",
    "0.1",
    "--lambda_cls_content",
    "1.",
    "--lambda_likeli_content",
    "0.1",
    "--batch_syn",
    "50",
    "--Iteration",
    "7",
    "--eval_it",
    "3",
    "--num_eval",
    "2",
    "--epoch_eval_train",
    "9",
    "--single_channel",
    "--dsa_strategy",
    "color_crop",
    "--dsa",
    "False",
    "--no_aug",
    "True",
    "--eval_mode",
    "S",
    "--batch_train",
    "64",
    "--max_files",
    "1",
    "--max_experts",
    "2",
]
OURS = [
    "--dataset",
    "cifar10",
    "--bpc",
    "10",
    "--n-style",
    "5",
    "--syn-steps",
    "30",
    "--expert-epochs",
    "2",
    "--max-start-epoch",
    "20",
    "--zca",
    "--lr-img",
    "100",
    "--lr-lr",
    "1e-5",
    "--pix-init",
    "real",
    "--lr-teacher",
    "0.001",
    "--buffer-path",
    "/b",
    "--data-path",
    "/d",
    "--lr-style",
    "100",
    "--lambda-club-content",
    "0.1",
    "--lambda-contrast-content",
    "0.1",
    "--lambda-cls-content",
    "1",
    "--lambda-likeli-content",
    "0.1",
    "--batch-syn",
    "50",
    "--iterations",
    "7",
    "--eval-it",
    "3",
    "--num-eval",
    "2",
    "--epoch-eval-train",
    "9",
    "--single-channel",
    "--dsa-strategy",
    "color_crop",
    "--dsa",
    "false",
    "--no-aug",
    "--eval-mode",
    "S",
    "--batch-train",
    "64",
    "--max-files",
    "1",
    "--max-experts",
    "2",
]


def test_pixels_take_mtt_distill_py_defaults_and_flags_still_win():
    """--parameterization pixels is a drop-in for MTT's distill.py: its defaults (--Iteration 5000, --lr_img 1000,
    --syn_steps 20), where HaBa keeps distill_fac.py's (15000, 100, 64); both initialize from real images."""
    _, px = _parse(["--dataset", "CIFAR10", "--parameterization", "pixels"])
    assert (px.iterations, px.lr_img, px.syn_steps, px.pix_init) == (5000, 1000.0, 20, "real")
    assert (px.lr_lr, px.lr_teacher, px.expert_epochs, px.max_start_epoch) == (1e-5, 0.01, 3, 25)  # shared
    _, hb = _parse(["--dataset", "CIFAR10"])
    assert (hb.parameterization, hb.iterations, hb.lr_img, hb.syn_steps, hb.pix_init) == (
        "haba", 15000, 100.0, 64, "real")
    _, given = _parse(["--dataset", "CIFAR10", "--parameterization", "pixels", "--Iteration", "7",
                       "--lr_img", "5", "--syn_steps", "3", "--pix_init", "noise"])
    assert (given.iterations, given.lr_img, given.syn_steps, given.pix_init) == (7, 5.0, 3, "noise")
    _, dm = _parse(["--dataset", "CIFAR10", "--parameterization", "pixels", "--objective", "dm"])
    assert dm.lr_img == 1.0 and dm.syn_steps == 64  # DM's public code, not MTT's script


def test_both_spellings_give_the_same_config():
    _, a = _parse(REF)
    _, b = _parse(OURS)
    assert a == b
    assert (a.dataset, a.ipc, a.n_hallucinators, a.iterations, a.zca, a.single_channel, a.dsa, a.no_aug) == (
        "cifar10",
        10,
        5,
        7,
        True,
        True,
        False,
        True,
    )
    assert a.lr_lr == 1e-5 and a.batch_syn == 50 and a.dsa_strategy == "color_crop"


def test_defaults_are_the_reference_ones():
    _, cfg = _parse(["--dataset", "cifar10"])
    assert dataclasses.replace(cfg, dataset="cifar10") == DistillConfig()
    d = DistillConfig()
    assert (d.syn_steps, d.expert_epochs, d.max_start_epoch, d.lr_img, d.lr_lr, d.lr_teacher, d.lr_style) == (
        64,
        3,
        25,
        100.0,
        1e-5,
        0.01,
        100.0,
    )
    assert (d.lambda_club_content, d.lambda_likeli_content, d.lambda_cls_content, d.lambda_contrast_content) == (
        0.1,
        1.0,
        1.0,
        1.0,
    )
    assert d.min_lr is None and d.lr_floor == 0.001
    assert d.iterations == 15000 and d.num_eval == 5 and d.epoch_eval_train == 1000


def test_presets_and_overrides():
    _, cfg = _parse(["--preset", "cifar10-ipc1"])
    assert (cfg.dataset, cfg.ipc, cfg.syn_steps, cfg.max_start_epoch, cfg.lr_lr, cfg.zca) == (
        "cifar10",
        1,
        50,
        2,
        1e-7,
        True,
    )
    assert cfg.lambda_likeli_content == 0.1 and cfg.lambda_contrast_content == 0.1
    _, cfg = _parse(["--preset", "cifar10-ipc10", "--syn_steps", "12"])
    assert cfg.syn_steps == 12 and cfg.lr_teacher == 0.001 and cfg.ipc == 10
    assert PRESETS["cifar10-ipc50"]["ipc"] == 50 and PRESETS["cifar10-ipc50"]["lr_teacher"] == 0.01


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--dataset", "imagenet1k"], "unknown --dataset"),
        (["--dataset", "digits", "--dsa_strategy", "color_bogus"], "bogus"),
        (["--dataset", "digits", "--ipc", "0"], "--ipc"),
        (["--dataset", "digits", "--lr_img", "-1"], "lr_img"),
    ],
)
def test_bad_values_raise_value_error(argv, match):
    with pytest.raises(ValueError, match=match):
        _parse(argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["--pix_init", "zeros"],
        ["--engine", "fast"],
        ["--dsa", "maybe"],
        ["--parameterization", "dct"],
        ["--preset", "cifar100-ipc1"],
        ["--ipc", "two"],
    ],
)
def test_bad_choices_are_argparse_errors(argv, capsys):
    from haba_fast.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["distill", *argv])
    assert "error" in capsys.readouterr().err


def test_no_dataset_runs_the_demo(monkeypatch, capsys):
    import haba_fast.demo as demo_mod
    from haba_fast.cli import main

    seen = {}
    monkeypatch.setattr(demo_mod, "run_demo", lambda demo: seen.setdefault("demo", demo))
    assert main(["distill", "--out", "x/y", "--Iteration", "5", "--lr_img", "7", "--no-progress"]) == 0
    d = seen["demo"]
    assert (d.out, d.iterations, d.haba_lr_img, d.progress) == ("x/y", 5, 7.0, False)
    # reference flags without --dataset: the reference would run CIFAR10, so the demo says what it runs
    err = capsys.readouterr().err
    assert "runs the digits demo with --Iteration, --lr_img;" in err and "CIFAR10" in err  # as the user spelled them
    assert main(["distill", "--out", "x/z", "--n-hallucinators", "3", "--no-progress"]) == 0
    assert "demo with --n_style;" in capsys.readouterr().err  # the reference's spelling of a dash flag
    assert main(["distill", "--out", "x/z", "--seed", "3", "--engine", "exact", "--no-progress"]) == 0
    assert "digits demo" not in capsys.readouterr().err  # only our own flags given: no note
    assert main(["distill", "--zca"]) == 2  # a flag the demo cannot honour: a clear error, exit 2


def test_resume_keeps_the_best_checkpoint(digits, buffer, tmp_path):
    """After --resume, synthetic_best.pt is replaced only by a better evaluation than the one it records."""

    def killer(distiller, metrics):
        if distiller.iteration == 1:
            raise Kill()

    cfg = _cfg(iterations=2, eval_it=1, num_eval=1, epoch_eval_train=2, checkpoint_every=1)
    with pytest.raises(Kill):
        distill(cfg, digits, buffer, tmp_path, progress=False, log=lambda s: None, on_iteration=killer)
    best_path = tmp_path / "synthetic_best.pt"
    payload = torch.load(best_path, weights_only=True)
    payload["meta"]["accuracy"] = 1.0  # an unbeatable record: the resumed run must not overwrite it
    torch.save(payload, best_path)
    distill(cfg, digits, buffer, tmp_path, resume=True, progress=False, log=lambda s: None)
    assert torch.load(best_path, weights_only=True)["meta"]["accuracy"] == 1.0


def test_demo_without_evaluation_networks_is_a_clear_error(tmp_path):
    from haba_fast.demo import DemoConfig, run_demo

    with pytest.raises(ValueError, match="--num_eval >= 1"):
        run_demo(DemoConfig(out=str(tmp_path / "demo"), num_eval=0), log=lambda s: None)


def test_demo_storage_note_explains_a_loss_and_only_a_loss():
    from haba_fast.demo import storage_note
    from haba_fast.factorization import HaBa

    syn = HaBa(num_classes=10, bpc=1, channels=1, im_size=(8, 8), n_hallucinators=5, kernel_size=3)
    hall = sum(p.numel() for p in syn.hallucinator_parameters())
    assert hall == 5 * (9 + 1 + 36 + 36 + 9 + 1)  # enc, scale/shift maps 1×6×6, dec
    note = storage_note(syn, 0.85, 0.90, 2)
    assert note is not None and f"{hall:,} floats" in note and "1 basis per class" in note and "2 images" in note
    assert f"({100 * hall / syn.storage().floats:.0f}% of its storage" in note
    assert "which alone does not make HaBa win" in note and "docs/RESULTS-fashion-mnist.md" in note
    assert storage_note(syn, 0.91, 0.90, 2) is None


def test_checkpoint_interval_is_eval_it_capped_at_100():
    from haba_fast.distill import checkpoint_interval

    assert checkpoint_interval(DistillConfig()) == 100  # eval_it 100
    assert checkpoint_interval(DistillConfig(eval_it=20)) == 20
    assert checkpoint_interval(DistillConfig(eval_it=5000)) == 100  # DC's 500 x outer loop: a kill loses <= 100
    assert checkpoint_interval(DistillConfig(eval_it=5000, checkpoint_every=7)) == 7
    assert checkpoint_interval(DistillConfig(eval_it=0, iterations=40)) == 40  # the end of the run


def test_a_resumed_run_does_not_evaluate_its_initialization_again(digits, buffer, tmp_path, monkeypatch):
    """--Iteration 0 evaluates the initialization once; resumed (finished, or extended), it is not evaluated again
    and synthetic_best.pt is not rewritten."""
    import haba_fast.distill as distill_mod

    seen = []

    def evaluate(distiller, dataset, cfg, generator):
        seen.append(distiller.iteration)
        return {"iteration": distiller.iteration, "A": {"mean": 0.5, "std": 0.0, "accs": [0.5]}}

    monkeypatch.setattr(distill_mod, "_evaluate", evaluate)
    kw = dict(eval_it=1, num_eval=1, epoch_eval_train=1)
    distill(_cfg(iterations=0, **kw), digits, buffer, tmp_path, progress=False, log=lambda s: None)
    assert seen == [0]
    best = (tmp_path / "synthetic_best.pt").stat().st_mtime_ns
    distill(_cfg(iterations=0, **kw), digits, buffer, tmp_path, resume=True, progress=False, log=lambda s: None)
    assert seen == [0] and (tmp_path / "synthetic_best.pt").stat().st_mtime_ns == best
    distill(_cfg(iterations=2, **kw), digits, buffer, tmp_path, resume=True, allow_changed=["iterations"],
            progress=False, log=lambda s: None)
    assert seen == [0, 1, 2]
