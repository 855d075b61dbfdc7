"""Every flag of the reference scripts means here what it means there, or is refused with a reason.

The flag lists below are taken from the reference code's argparse definitions:
* HABA_DISTILL_FAC: Huage001/DatasetFactorization ``distill_fac.py``;
* MTT_DISTILL: GeorgeCazenavette/mtt-distillation ``distill.py`` (its latest version, with ``--texture``);
* MTT_BUFFER: GeorgeCazenavette/mtt-distillation ``buffer.py`` (with ``--mom`` and ``--l2``).
HaBa's repository has no buffer.py of its own; it uses MTT's.

Besides the walk over every flag, the semantics behind the flags are pinned against plain re-statements of the
reference's code: the evaluation pool (``get_eval_pool``), the evaluation's epoch count and lr decay
(``evaluate_synset``) and the experts' (``buffer.py``), the trajectory walk of ``--load_all`` / ``--max_files`` /
``--max_experts``, hallucinators that an iteration does not use (one module per hallucinator there), batch
standardization for HaBa, and the k-center coreset.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from haba_fast import data
from haba_fast.benchmarks.genaug import Hallucinator
from haba_fast.distill import PRESETS, DistillConfig, Distiller, eval_config, step_used_hallucinators
from haba_fast.evaluate import EVAL_MODES, EvalConfig, _kcenter, coreset, eval_pool, evaluate_synthetic
from haba_fast.experts import TrajectorySampler, load_buffer
from haba_fast.factorization import HaBa
from haba_fast.models import NETWORK_NAMES, get_network
from haba_fast.training import train_network

# Huage001/DatasetFactorization distill_fac.py
HABA_DISTILL_FAC = [
    "--dataset", "--subset", "--model", "--ipc", "--eval_mode", "--num_eval", "--eval_it", "--epoch_eval_train",
    "--Iteration", "--lr_img", "--lr_lr", "--lr_teacher", "--lr_style", "--batch_real", "--batch_syn",
    "--batch_train", "--pix_init", "--dsa", "--dsa_strategy", "--data_path", "--buffer_path", "--pretrained_ckpt",
    "--expert_epochs", "--syn_steps", "--max_start_epoch", "--zca", "--load_all", "--no_aug", "--max_files",
    "--max_experts", "--force_save", "--n_style", "--single_channel", "--lambda_club_content",
    "--lambda_likeli_content", "--lambda_cls_content", "--lambda_contrast_content",
]  # fmt: skip
# GeorgeCazenavette/mtt-distillation distill.py
MTT_DISTILL = [
    "--dataset", "--subset", "--model", "--ipc", "--eval_mode", "--num_eval", "--eval_it", "--epoch_eval_train",
    "--Iteration", "--lr_img", "--lr_lr", "--lr_teacher", "--lr_init", "--batch_real", "--batch_syn", "--batch_train",
    "--pix_init", "--dsa", "--dsa_strategy", "--data_path", "--buffer_path", "--expert_epochs", "--syn_steps",
    "--max_start_epoch", "--zca", "--load_all", "--no_aug", "--texture", "--canvas_size", "--canvas_samples",
    "--max_files", "--max_experts", "--force_save",
]  # fmt: skip
# GeorgeCazenavette/mtt-distillation buffer.py
MTT_BUFFER = [
    "--dataset", "--subset", "--model", "--num_experts", "--lr_teacher", "--batch_train", "--batch_real", "--dsa",
    "--dsa_strategy", "--data_path", "--buffer_path", "--train_epochs", "--zca", "--decay", "--mom", "--l2",
    "--save_interval",
]  # fmt: skip

REFUSED = "refused"


def _pool_is(models):
    return lambda cfg: eval_config(cfg).models == tuple(models)


# flag -> (its arguments, then either (DistillConfig field, value), a predicate on the config, or (REFUSED, words
# the message must contain)).
DISTILL_CASES = {
    "--dataset": (["CIFAR100"], ("dataset", "cifar100")),
    "--subset": (["imagewoof"], (REFUSED, "ImageNet")),
    "--model": (["ConvNetD4"], ("model", "ConvNetD4")),
    "--ipc": (["10"], ("ipc", 10)),
    "--eval_mode": (["M"], _pool_is(["ConvNet", "AlexNet", "VGG11", "ResNet18"])),
    "--num_eval": (["3"], lambda cfg: cfg.num_eval == 3 and eval_config(cfg).num_eval == 3),
    "--eval_it": (["50"], ("eval_it", 50)),
    "--epoch_eval_train": (["300"], lambda cfg: eval_config(cfg).epochs == 300),
    "--Iteration": (["500"], ("iterations", 500)),
    "--lr_img": (["1000"], ("lr_img", 1000.0)),
    "--lr_lr": (["1e-7"], ("lr_lr", 1e-7)),
    "--lr_teacher": (["0.02"], ("lr_teacher", 0.02)),
    "--lr_init": (["0.01"], (REFUSED, "--lr_teacher")),
    "--lr_style": (["10"], ("lr_style", 10.0)),
    "--batch_real": (["128"], (REFUSED, "ImageNet")),
    "--batch_syn": (["20"], ("batch_syn", 20)),
    "--batch_train": (["128"], lambda cfg: eval_config(cfg).batch_size == 128),
    "--pix_init": (["noise"], ("pix_init", "noise")),
    "--dsa": (["False"], lambda cfg: cfg.dsa is False and eval_config(cfg).dsa is False),
    "--dsa_strategy": (["color_crop"], lambda cfg: cfg.dsa_strategy == eval_config(cfg).dsa_strategy == "color_crop"),
    "--data_path": (["/d"], ("data_path", "/d")),
    "--buffer_path": (["/b"], ("buffer_path", "/b")),
    "--pretrained_ckpt": (["x.pt"], (REFUSED, "--resume")),
    "--expert_epochs": (["2"], ("expert_epochs", 2)),
    "--syn_steps": (["30"], ("syn_steps", 30)),
    "--max_start_epoch": (["20"], ("max_start_epoch", 20)),
    "--zca": ([], ("zca", True)),
    "--load_all": ([], ("load_all", True)),
    "--no_aug": (["True"], ("no_aug", True)),
    "--texture": ([], (REFUSED, "texture")),
    "--canvas_size": (["2"], (REFUSED, "texture")),
    "--canvas_samples": (["1"], (REFUSED, "texture")),
    "--max_files": (["2"], ("max_files", 2)),
    "--max_experts": (["3"], ("max_experts", 3)),
    "--force_save": ([], (REFUSED, "synthetic.png")),
    "--n_style": (["3"], ("n_hallucinators", 3)),
    "--single_channel": ([], ("single_channel", True)),
    "--lambda_club_content": (["0.3"], ("lambda_club_content", 0.3)),
    "--lambda_likeli_content": (["0.4"], ("lambda_likeli_content", 0.4)),
    "--lambda_cls_content": (["0.5"], ("lambda_cls_content", 0.5)),
    "--lambda_contrast_content": (["0.6"], ("lambda_contrast_content", 0.6)),
}

# flag -> (its arguments, then a predicate on (parsed args, ExpertConfig) or (REFUSED, words)).
BUFFER_CASES = {
    "--dataset": (["CIFAR100"], lambda a, c: a.dataset == "CIFAR100"),  # default CIFAR10, as buffer.py
    "--subset": (["imagenette"], (REFUSED, "ImageNet")),
    "--model": (["ConvNetW64"], lambda a, c: c.model == "ConvNetW64"),
    "--num_experts": (["7"], lambda a, c: c.num_experts == 7),
    "--lr_teacher": (["0.05"], lambda a, c: c.lr == 0.05),
    "--batch_train": (["64"], lambda a, c: c.batch_size == 64),
    "--batch_real": (["64"], (REFUSED, "ImageNet")),
    "--dsa": (["True"], lambda a, c: c.dsa is True),
    "--dsa_strategy": (["crop_flip"], lambda a, c: c.dsa_strategy == "crop_flip"),
    "--data_path": (["/d"], lambda a, c: a.data_path == "/d"),
    "--buffer_path": (["/b"], lambda a, c: a.buffer_path == "/b"),
    "--train_epochs": (["7"], lambda a, c: c.epochs == 7),
    "--zca": ([], lambda a, c: a.zca is True),
    "--decay": ([], lambda a, c: c.decay is True),
    "--mom": (["0.5"], lambda a, c: c.momentum == 0.5),
    "--l2": (["1e-4"], lambda a, c: c.weight_decay == 1e-4),
    "--save_interval": (["4"], lambda a, c: c.save_interval == 4),
}


def _distill_config(argv):
    from haba_fast.cli import build_parser
    from haba_fast.commands.distill import config_from_args

    return config_from_args(build_parser().parse_args(["distill", "--dataset", "cifar10", *argv]))


def _expert_config(argv):
    from haba_fast.cli import build_parser
    from haba_fast.commands.buffer import expert_config_from_args

    args = build_parser().parse_args(["buffer", *argv])
    return args, expert_config_from_args(args)


def _refusal(build, flag, argv, expect):
    """A REFUSED case's error message, after checking that ``build`` raises a ValueError naming the flag and the
    reason; None for any other case."""
    if not (isinstance(expect, tuple) and expect[0] == REFUSED):
        return None
    with pytest.raises(ValueError, match=flag) as err:
        build([flag, *argv])
    assert expect[1] in str(err.value)
    return str(err.value)


def test_every_reference_flag_has_a_case():
    assert set(HABA_DISTILL_FAC) | set(MTT_DISTILL) == set(DISTILL_CASES)
    assert set(MTT_BUFFER) == set(BUFFER_CASES)


@pytest.mark.parametrize("flag", sorted(DISTILL_CASES))
def test_distill_flag_means_the_reference_or_is_refused(flag):
    argv, expect = DISTILL_CASES[flag]
    refused = _refusal(_distill_config, flag, argv, expect)
    if refused is not None:
        assert "not supported" in refused
        return
    cfg = _distill_config([flag, *argv])
    default = DistillConfig()
    if callable(expect):
        assert expect(cfg)
        assert not expect(default)  # the flag changed something
    else:
        field, value = expect
        assert getattr(cfg, field) == value
        assert getattr(default, field) != value  # the flag changed something


@pytest.mark.parametrize("flag", sorted(BUFFER_CASES))
def test_buffer_flag_means_the_reference_or_is_refused(flag):
    argv, expect = BUFFER_CASES[flag]
    if _refusal(_expert_config, flag, argv, expect) is not None:
        return
    args, cfg = _expert_config([flag, *argv])
    base_args, base_cfg = _expert_config([])
    assert expect(args, cfg)
    if flag != "--dsa":  # --dsa True is the default; --dsa False is refused (below)
        assert not expect(base_args, base_cfg)  # the flag changed something


def test_value_spellings_that_the_reference_reads_otherwise_are_refused():
    # argparse type=bool: the reference reads "--no_aug False" as True.
    with pytest.raises(ValueError, match="no_aug False"):
        _distill_config(["--no_aug", "False"])
    # buffer.py --dsa False trains with DC augmentation there.
    with pytest.raises(ValueError, match="DC augmentation"):
        _expert_config(["--dsa", "False"])
    # --load_all ignores --max_files/--max_experts in the reference.
    with pytest.raises(ValueError, match="load_all"):
        _distill_config(["--load_all", "--max_files", "2"])
    with pytest.raises(ValueError, match="unknown --eval_mode"):
        _distill_config(["--eval_mode", "X"])


def test_no_help_says_accepted_for_compatibility():
    from haba_fast.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a.choices, dict))
    for name in ("distill", "buffer", "eval"):
        text = sub.choices[name].format_help()
        assert "compatibility" not in text and "unused" not in text.replace("refused", "")


def test_refused_flags_are_refused_by_the_demo_too(capsys):
    from haba_fast.cli import main

    # Without --dataset, `distill` runs the digits demo: a refused flag is refused before anything runs.
    assert main(["distill", "--texture"]) == 2
    assert "--texture is not supported" in capsys.readouterr().err


# The reference's command lines: HaBa's run_cifar10_ipc1_style5.sh and MTT's README example for distill.py (with
# --parameterization pixels, our drop-in for that script); the last two add flags the references accept there and
# ignore (augmentation off), which must keep running, with a warning.
REFERENCE_COMMAND_LINES = {
    "haba": "--dataset=CIFAR10 --ipc=1 --n_style=5 --syn_steps=50 --expert_epochs=2 --max_start_epoch=2 --zca "
    "--lr_img=100 --lr_lr=1e-07 --lr_teacher=0.01 --pix_init real --buffer_path=/b --data_path=/d --lr_style 100 "
    "--lambda_club_content 0.1 --lambda_contrast_content 0.1 --lambda_cls_content 1. --lambda_likeli_content 0.1",
    "mtt": "--dataset=CIFAR10 --ipc=1 --syn_steps=50 --expert_epochs=2 --max_start_epoch=2 --zca --lr_img=1000 "
    "--lr_lr=1e-07 --lr_teacher=0.01 --buffer_path=/b --data_path=/d --parameterization pixels",
    "haba, no augmentation": "--dataset=CIFAR10 --ipc=1 --n_style=5 --dsa False --dsa_strategy color_crop",
    "mtt, no augmentation": "--dataset=CIFAR10 --ipc=1 --no_aug --num_eval 0 --dsa_strategy color_crop "
    "--parameterization pixels",
}


@pytest.mark.parametrize("name", sorted(REFERENCE_COMMAND_LINES))
def test_reference_command_lines_still_run(name, capsys):
    cfg = _distill_config(REFERENCE_COMMAND_LINES[name].split())
    assert cfg.dataset == "cifar10" and cfg.ipc == 1 and cfg.objective == "mtt"
    err = capsys.readouterr().err
    if "no augmentation" in name:
        assert "warning: --dsa_strategy has no effect here" in err and "the reference ignores it too" in err
    else:
        assert err == ""


# ---------------------------------------------------------------------------------------------------------------------
# --eval_mode: the reference's get_eval_pool


REFERENCE_POOLS = {  # HaBa utils.py get_eval_pool, with model = "ConvNet"
    "M": ["ConvNet", "AlexNet", "VGG11", "ResNet18"],
    "W": ["ConvNetW32", "ConvNetW64", "ConvNetW128", "ConvNetW256"],
    "D": ["ConvNetD1", "ConvNetD2", "ConvNetD3", "ConvNetD4"],
    "A": ["ConvNetAS", "ConvNetAR", "ConvNetAL"],
    "P": ["ConvNetNP", "ConvNetMP", "ConvNetAP"],
    "N": ["ConvNetNN", "ConvNetBN", "ConvNetLN", "ConvNetIN", "ConvNetGN"],
    "S": ["ConvNet"],
    "C": ["ConvNet", "ConvNet"],
}


@pytest.mark.parametrize("mode", sorted(REFERENCE_POOLS))
def test_eval_pool_is_the_reference_pool(mode):
    assert list(eval_pool(mode, "ConvNet")) == REFERENCE_POOLS[mode]
    for name in eval_pool(mode, "ConvNet"):  # every network of the pool builds here
        get_network(name, 3, 10, (32, 32), device="meta")


def test_eval_pool_depends_on_the_training_model_as_the_reference():
    assert eval_pool("S", "ConvNetBN") == ("ConvNet",)  # the reference drops a BN suffix for "S"
    assert eval_pool("S", "VGG11BN") == ("VGG11",)
    assert eval_pool("S", "ConvNetW64") == ("ConvNetW64",)
    assert eval_pool("C", "AlexNet") == ("AlexNet", "ConvNet")
    assert eval_pool("M", "AlexNet") == tuple(REFERENCE_POOLS["M"])
    assert set(EVAL_MODES) == set(REFERENCE_POOLS)


def test_pixel_mtt_evaluates_mtt_s_pool():
    """MTT's utils.py get_eval_pool "M" adds ResNet18_AP (its other modes equal HaBa's); a pixel MTT run uses it."""
    from haba_fast.distill import DistillConfig, eval_config

    assert eval_pool("M", "ConvNet", "mtt") == ("ConvNet", "AlexNet", "VGG11", "ResNet18_AP", "ResNet18")
    for mode in sorted(set(REFERENCE_POOLS) - {"M"}):
        assert eval_pool(mode, "ConvNet", "mtt") == eval_pool(mode, "ConvNet")
    pixels = DistillConfig(parameterization="pixels", eval_mode="M")
    assert eval_config(pixels).models == eval_pool("M", "ConvNet", "mtt")
    for objective in ("mtt", "dm"):
        assert eval_config(DistillConfig(eval_mode="M", objective=objective)).models == tuple(REFERENCE_POOLS["M"])
    with pytest.raises(ValueError, match="reference must be"):
        eval_pool("M", "ConvNet", "distill_fac")


# VICO-UoE/DatasetCondensation utils.py get_eval_pool (its DM commit 306245d), transcribed: the modes that differ
# from HaBa's. "SS" evaluates the training model itself (BN kept); there is no "C" (unknown modes fall back to the
# training model there).
DC_REFERENCE = {
    "M": ["MLP", "ConvNet", "LeNet", "AlexNet", "VGG11", "ResNet18"],
    "A": ["ConvNetAS", "ConvNetAR", "ConvNetAL", "ConvNetASwish"],
    "B": ["ConvNetBN", "ConvNetASwishBN", "AlexNetBN", "VGG11BN", "ResNet18BN"],
}


@pytest.mark.parametrize("objective", ["dc", "dsa", "dm"])
def test_pixel_dc_dsa_dm_evaluate_the_dc_code_s_pool(objective):
    """A pixel DC/DSA/DM run's --eval_mode means what it means in the DC/DSA/DM code (MLP and LeNet in "M", swish in
    "A", "B", "SS", no "C"); the same objective under HaBa keeps HaBa's pools."""
    from haba_fast.distill import DistillConfig, eval_config

    assert eval_pool("M", "ConvNet", "dc") == tuple(DC_REFERENCE["M"])
    for mode in ("A", "B"):  # networks haba_fast does not build: named, never silently dropped
        missing = [m for m in DC_REFERENCE[mode] if m not in NETWORK_NAMES]
        assert missing
        with pytest.raises(ValueError, match=f"--eval_mode {mode} evaluates {', '.join(missing)}"):
            eval_pool(mode, "ConvNet", "dc")
    for mode in sorted(set(REFERENCE_POOLS) - {"M", "A", "C"}):
        assert eval_pool(mode, "ConvNet", "dc") == eval_pool(mode, "ConvNet")
    assert eval_pool("SS", "ConvNetBN", "dc") == ("ConvNetBN",) and eval_pool("S", "ConvNetBN", "dc") == ("ConvNet",)
    pixels = DistillConfig(parameterization="pixels", eval_mode="M", objective=objective)
    assert pixels.pool_reference == "dc" and eval_config(pixels).models == tuple(DC_REFERENCE["M"])
    haba = DistillConfig(eval_mode="M", objective=objective)
    assert haba.pool_reference == "haba" and eval_config(haba).models == tuple(REFERENCE_POOLS["M"])
    with pytest.raises(ValueError, match="unknown --eval_mode 'C': choose one of the DC/DSA/DM code's"):
        eval_pool("C", "ConvNet", "dc")
    with pytest.raises(ValueError, match="unknown --eval_mode 'C'"):
        DistillConfig(parameterization="pixels", eval_mode="C", objective=objective).validate()
    for mode in ("B", "SS"):
        with pytest.raises(ValueError, match=f"unknown --eval_mode '{mode}'"):
            eval_pool(mode, "ConvNet", "haba")
    assert eval_pool("C", "ConvNetW32", "haba") == ("ConvNetW32", "ConvNet")


def test_eval_pool_refuses_unknown_modes_and_missing_networks(monkeypatch):
    with pytest.raises(ValueError, match="unknown --eval_mode 'I'"):
        eval_pool("I", "ConvNet")
    monkeypatch.setitem(EVAL_MODES, "M", ("ConvNet", "ViT"))
    with pytest.raises(ValueError, match="ViT"):
        eval_pool("M", "ConvNet")


def test_distill_run_and_eval_command_use_the_pool(monkeypatch, capsys):
    cfg = DistillConfig(eval_mode="W")
    assert eval_config(cfg).models == tuple(REFERENCE_POOLS["W"])
    assert eval_config(DistillConfig(eval_models=("AlexNet",))).models == ("AlexNet",)
    with pytest.raises(ValueError, match="not both"):
        DistillConfig(eval_mode="M", eval_models=("AlexNet",)).validate()

    seen = {}

    def fake(syn, ds, cfg, **kw):
        seen["models"] = cfg.models
        from haba_fast.evaluate import EvalResult

        return EvalResult({m: [0.5] for m in cfg.models}, lr=0.01, num_samples=10, epochs=cfg.epochs)

    monkeypatch.setattr("haba_fast.evaluate.evaluate_synthetic", fake)
    from haba_fast.cli import main

    assert main(["eval", "--baseline", "random", "--ipc", "1", "--eval_mode", "D", "--epochs", "1"]) == 0
    assert seen["models"] == tuple(REFERENCE_POOLS["D"])
    assert main(["eval", "--baseline", "random", "--ipc", "1", "--eval_mode", "C", "--model", "AlexNet"]) == 0
    assert seen["models"] == ("AlexNet", "ConvNet")
    assert main(["eval", "--baseline", "random", "--ipc", "1", "--models", "ConvNet,MLP"]) == 0
    assert seen["models"] == ("ConvNet", "MLP")
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------------------------------
# Epoch counts and lr decay: evaluate_synset (Epoch + 1 epochs, decay after Epoch // 2 + 1) and buffer.py


def _reference_lrs(loops, decay_after, lr):
    """The lr of every epoch of the reference's loops: ``if ep in [decay_after]: lr *= 0.1`` after each epoch."""
    out = []
    for ep in range(loops):
        out.append(lr)
        if ep == decay_after:
            lr *= 0.1
    return out


def _tiny():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 1, 8, 8, generator=g)  # float32: train_network trains in float32
    y = torch.arange(12) % 3
    return x, y


class _TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("epoch_eval_train", [0, 1, 2, 3, 4, 7, 10])
def test_evaluation_trains_epoch_plus_one_epochs_and_decays_after_half_plus_one(epoch_eval_train, monkeypatch):
    import haba_fast.evaluate as ev

    seen = []
    real = ev.train_network

    def spy(net, source, **kw):
        hist = real(net, source, **kw)
        seen.append([e.lr for e in hist.epochs])
        return hist

    monkeypatch.setattr(ev, "train_network", spy)
    ds = data.load("digits", subset_per_class=3, generator=torch.Generator().manual_seed(0))
    x, y = coreset(ds, 1, "random", torch.Generator().manual_seed(0))
    cfg = EvalConfig(models=("ConvNetW32",), num_eval=1, epochs=epoch_eval_train, lr=0.1, device="cpu", dsa=False)
    res = evaluate_synthetic((x, y), ds, cfg, generator=torch.Generator().manual_seed(0))
    E = epoch_eval_train
    assert seen == [pytest.approx(_reference_lrs(E + 1, E // 2 + 1, 0.1))]
    assert res.epochs == E
    from haba_fast.distill import DistillConfig, eval_config

    assert eval_config(DistillConfig(epoch_eval_train=E)).epochs == E  # --epoch_eval_train 0 trains one epoch


@pytest.mark.parametrize("epochs", [3, 5, 8])
def test_decayed_training_matches_the_reference_loop(epochs):
    # Full batches and no augmentation: train_network must equal the reference's loop step for step (SGD momentum
    # 0.9, weight decay 5e-4, lr x0.1 after epoch E // 2 + 1 with a NEW optimizer, so momentum restarts).
    x, y = _tiny()
    E = epochs
    torch.manual_seed(0)
    ours = _TinyNet()
    oracle = _TinyNet()
    oracle.load_state_dict(ours.state_dict())
    train_network(
        ours, x, y, epochs=E + 1, decay_epoch=E // 2 + 2, lr=0.1, batch_size=len(y), momentum=0.9,
        weight_decay=5e-4, dsa=False, lr_schedule="half", generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    lr = 0.1
    opt = torch.optim.SGD(oracle.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    for ep in range(E + 1):
        loss = F.cross_entropy(oracle(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ep in [E // 2 + 1]:
            lr *= 0.1
            opt = torch.optim.SGD(oracle.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    for a, b in zip(ours.parameters(), oracle.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("train_epochs", [2, 4, 5, 50])
def test_expert_decay_is_buffer_py(train_epochs, monkeypatch, tmp_path):
    import haba_fast.experts as ex

    kwargs = {}

    class Enough(Exception):
        pass

    def spy(net, source, **kw):
        kwargs.update(kw)
        raise Enough  # we only want the schedule it asks for

    monkeypatch.setattr(ex, "train_network", spy)
    ds = data.load("digits", subset_per_class=3, generator=torch.Generator().manual_seed(0))
    cfg = ex.ExpertConfig(model="ConvNetW32", num_experts=1, epochs=train_epochs, decay=True, device="cpu")
    with pytest.raises(Enough):
        ex.train_experts(ds, cfg, tmp_path, progress=False)
    assert kwargs["lr_schedule"] == "half" and kwargs["epochs"] == train_epochs
    x, y = _tiny()
    hist = train_network(
        _TinyNet(), x, y, epochs=train_epochs, lr=0.01, batch_size=len(y), dsa=False, lr_schedule="half",
        decay_epoch=kwargs.get("decay_epoch"), generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert [e.lr for e in hist.epochs] == pytest.approx(_reference_lrs(train_epochs, train_epochs // 2 + 1, 0.01))


# ---------------------------------------------------------------------------------------------------------------------
# Batch standardization: HaBa's evaluation (utils.epoch) standardizes every train and test batch


def test_haba_reproduction_standardizes_batches():
    for name in PRESETS:
        assert PRESETS[name]["batch_standardize"] is True
        assert eval_config(_distill_config(["--preset", name])).batch_standardize is True
    assert eval_config(DistillConfig(parameterization="haba")).batch_standardize is True  # default: on for haba
    assert eval_config(DistillConfig(parameterization="pixels")).batch_standardize is False  # MTT's does not
    assert eval_config(_distill_config(["--batch-standardize", "False"])).batch_standardize is False
    assert eval_config(_distill_config(["--parameterization", "pixels", "--batch-standardize"])).batch_standardize


def test_standardized_evaluation_trains_on_standardized_batches(monkeypatch):
    # What the flag does downstream: every training batch the network sees has mean 0 and std 1.
    import haba_fast.training as tr

    seen = []
    real = tr.standardize_batch

    def spy(x):
        out = real(x)
        seen.append((float(out.mean()), float(out.std())))
        return out

    monkeypatch.setattr(tr, "standardize_batch", spy)
    x, y = _tiny()
    train_network(_TinyNet(), 5 * x + 3, y, epochs=2, lr=0.01, batch_size=5, dsa=False, batch_standardize=True)
    assert len(seen) == 2 * 3
    assert all(abs(m) < 1e-5 and abs(s - 1) < 1e-5 for m, s in seen)


# ---------------------------------------------------------------------------------------------------------------------
# --load_all / --max_files / --max_experts: which trajectories the reference samples


class _FileBuffer:
    """An in-memory buffer of ``files`` (lists of trajectory ids): the sampler's view of replay_buffer files."""

    def __init__(self, files):
        self.files = files
        self.num_trajectories = sum(len(f) for f in files)

    def file_groups(self):
        return [list(f) for f in self.files]


def _reference_walk(files, max_files, max_experts, generator, n):
    """distill_fac.py's expert loop without --load_all, with random.shuffle drawn from ``generator`` (same order)."""

    def shuffle(seq):
        return [seq[i] for i in torch.randperm(len(seq), generator=generator).tolist()]

    expert_files = shuffle(list(range(len(files))))
    if max_files is not None:
        expert_files = expert_files[:max_files]
    file_idx, expert_idx = 0, 0
    buffer = list(files[expert_files[file_idx]])
    if max_experts is not None:
        buffer = buffer[:max_experts]
    buffer = shuffle(buffer)
    out = []
    for _ in range(n):
        out.append(buffer[expert_idx])
        expert_idx += 1
        if expert_idx == len(buffer):
            expert_idx = 0
            file_idx += 1
            if file_idx == len(expert_files):
                file_idx = 0
                expert_files = shuffle(expert_files)
            if max_files != 1:
                buffer = list(files[expert_files[file_idx]])
            if max_experts is not None:
                buffer = buffer[:max_experts]
            buffer = shuffle(buffer)
    return out


FILES = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


@pytest.mark.parametrize(
    "max_files,max_experts", [(None, None), (2, None), (None, 3), (2, 3), (1, None), (1, 2), (5, 1), (9, 9)]
)
def test_trajectory_walk_matches_the_reference(max_files, max_experts):
    sampler = TrajectorySampler(
        _FileBuffer(FILES), max_files=max_files, max_experts=max_experts, generator=torch.Generator().manual_seed(3)
    )
    ours = [sampler.next() for _ in range(60)]
    ref = _reference_walk(FILES, max_files, max_experts, torch.Generator().manual_seed(3), 60)
    assert ours == ref
    # and what the flags mean, stated directly: only the first max_experts of max_files files are ever used
    pool = set(sampler.pool())
    assert set(ours) == pool
    n_files = min(max_files or len(FILES), len(FILES))
    assert len({next(i for i, f in enumerate(FILES) if t in f) for t in pool}) == n_files
    assert all(FILES[i].index(t) < (max_experts or 99) for t in pool for i in range(len(FILES)) if t in FILES[i])


def test_load_all_draws_uniformly_from_every_trajectory():
    sampler = TrajectorySampler(_FileBuffer(FILES), load_all=True, generator=torch.Generator().manual_seed(0))
    draws = [sampler.next() for _ in range(2000)]
    counts = np.bincount(draws, minlength=18)
    assert counts.min() > 70 and sorted(set(draws)) == list(range(18))  # 2000 / 18 = 111 expected each
    g = torch.Generator().manual_seed(0)
    assert draws[:20] == [int(torch.randint(18, (1,), generator=g)) for _ in range(20)]  # np.random.randint(len)
    with pytest.raises(ValueError, match="load_all"):
        TrajectorySampler(_FileBuffer(FILES), load_all=True, max_files=2)
    with pytest.raises(ValueError, match="max_experts"):
        TrajectorySampler(_FileBuffer(FILES), max_experts=0)


def test_sampler_state_round_trip():
    a = TrajectorySampler(_FileBuffer(FILES), max_files=3, generator=torch.Generator().manual_seed(1))
    [a.next() for _ in range(7)]
    state, gstate = a.state_dict(), a.generator.get_state()
    rest = [a.next() for _ in range(20)]
    g = torch.Generator()
    g.set_state(gstate)
    b = TrajectorySampler(_FileBuffer(FILES), max_files=3, generator=g)
    b.load_state_dict(json.loads(json.dumps(state)))
    assert [b.next() for _ in range(20)] == rest
    with pytest.raises(ValueError, match="another buffer"):
        TrajectorySampler(_FileBuffer([[0, 1]]), generator=g).load_state_dict(state)


def _traj(v, epochs=3):
    return [[torch.full((2, 3), float(v + e)), torch.full((4,), -float(v + e))] for e in range(epochs + 1)]


def test_buffer_files_are_the_reference_files(tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    torch.save([_traj(0), _traj(10), _traj(20)], ref / "replay_buffer_0.pt")
    torch.save([_traj(30)], ref / "replay_buffer_1.pt")
    torch.save([_traj(40), _traj(50)], ref / "replay_buffer_2.pt")
    assert load_buffer(ref).file_groups() == [[0, 1, 2], [3], [4, 5]]
    # our format: runs of save_interval trajectories, the files the reference format would hold
    ours = tmp_path / "ours"
    ours.mkdir()
    trajs = []
    for i in range(5):
        np.full((4, 10), float(i), dtype=np.float32).tofile(ours / f"expert_{i}.bin")
        trajs.append({"file": f"expert_{i}.bin"})
    header = {
        "format": "haba_fast-experts",
        "version": 1,
        "num_params": 10,
        "num_epochs": 3,
        "dtype": "float32",
        "param_shapes": [[2, 3], [4]],
        "config": {"save_interval": 2},
        "trajectories": trajs,
    }
    (ours / "experts.json").write_text(json.dumps(header))
    buf = load_buffer(ours)
    assert buf.file_groups() == [[0, 1], [2, 3], [4]]
    sampler = TrajectorySampler(buf, max_files=1, max_experts=1, generator=torch.Generator().manual_seed(0))
    first = sampler.next()
    assert first in (0, 2, 4) and all(sampler.next() == first for _ in range(5))


MODEL = "ConvNetW32"


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", subset_per_class=10, generator=torch.Generator().manual_seed(0))


class _SnapBuffer(_FileBuffer):
    """Trajectories of random flat weights, in files."""

    def __init__(self, files, num_params, epochs=4):
        super().__init__(files)
        g = torch.Generator().manual_seed(0)
        self.num_epochs = epochs
        self.snaps = torch.randn(self.num_trajectories, epochs + 1, num_params, generator=g) * 0.05

    def snapshot(self, traj, epoch):
        return self.snaps[traj, epoch].clone()


def _distiller(digits, **kw):
    net = get_network(MODEL, digits.channels, digits.num_classes, digits.im_size, device="meta")
    P = sum(p.numel() for p in net.parameters())
    base = dict(
        dataset="digits", model=MODEL, ipc=1, n_hallucinators=5, syn_steps=1, expert_epochs=1, max_start_epoch=2,
        iterations=3, engine="naive", device="cpu", num_eval=0, seed=0,
    )  # fmt: skip
    base.update(kw)
    return Distiller(DistillConfig(**base), digits, _SnapBuffer(FILES, P))


def test_distiller_samples_trajectories_as_the_reference(digits):
    d = _distiller(digits, max_files=2, max_experts=1)
    trajs = [d.sample_trajectory()[0] for _ in range(8)]
    pool = d.objective.trajectories.pool()
    assert len(pool) == 2 and set(trajs) == set(pool)
    assert all(FILES[[t in f for f in FILES].index(True)][0] == t for t in pool)  # the first expert of its file
    # resume continues the walk where it was
    d2 = _distiller(digits, max_files=2, max_experts=1)
    [d2.sample_trajectory() for _ in range(3)]
    state = d2.state_dict()
    rest = [d2.sample_trajectory()[0] for _ in range(5)]
    d3 = _distiller(digits, max_files=2, max_experts=1)
    d3.load_state_dict(state)
    assert [d3.sample_trajectory()[0] for _ in range(5)] == rest


# ---------------------------------------------------------------------------------------------------------------------
# Unused hallucinators do not move (one module per hallucinator in the reference)


def _oracle_modules(syn):
    """The research code's one hallucinator module per hallucinator (float64), holding copies of syn's rows."""
    mods = nn.ModuleList()
    for h in range(syn.n_hallucinators):
        m = Hallucinator(syn.bases.shape[1], syn.channels, syn.kernel_size, *syn.im_size).double()
        with torch.no_grad():
            m.enc.weight.copy_(syn.enc_weight[h])
            m.enc.bias.copy_(syn.enc_bias[h])
            m.scale.copy_(syn.scale[h : h + 1])
            m.shift.copy_(syn.shift[h : h + 1])
            m.dec.weight.copy_(syn.dec_weight[h])
            m.dec.bias.copy_(syn.dec_bias[h])
        mods.append(m)
    return mods


def _assert_same(syn, mods, opt, ref_opt):
    for h, m in enumerate(mods):
        pairs = [
            (syn.enc_weight, m.enc.weight),
            (syn.enc_bias, m.enc.bias),
            (syn.scale, m.scale),
            (syn.shift, m.shift),
            (syn.dec_weight, m.dec.weight),
            (syn.dec_bias, m.dec.bias),
        ]
        for stacked, p in pairs:
            row = stacked[h] if p.shape == stacked.shape[1:] else stacked[h : h + 1]
            torch.testing.assert_close(row, p, rtol=1e-12, atol=1e-12)
            buf = opt.state.get(stacked, {}).get("momentum_buffer")
            ref_buf = ref_opt.state.get(p, {}).get("momentum_buffer")
            mine = torch.zeros_like(row)
            if buf is not None:
                mine = buf[h] if p.shape == stacked.shape[1:] else buf[h : h + 1]
            theirs = torch.zeros_like(p) if ref_buf is None else ref_buf
            torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels,c_b,size,k", [(3, 3, 8, 3), (1, 1, 7, 3), (3, 1, 9, 2)])
def test_unused_hallucinators_match_one_sgd_module_per_hallucinator(channels, c_b, size, k):
    g = torch.Generator().manual_seed(channels * 10 + size)
    syn = HaBa(
        num_classes=2, bpc=2, channels=channels, im_size=(size, size), n_hallucinators=4, kernel_size=k,
        base_channels=c_b, generator=g,
    ).double()  # fmt: skip
    with torch.no_grad():
        syn.bases.normal_(generator=g)
        syn.scale.add_(0.1 * torch.randn(syn.scale.shape, generator=g, dtype=torch.float64))
    mods = _oracle_modules(syn)
    opt = torch.optim.SGD(syn.hallucinator_parameters(), lr=0.01, momentum=0.95)
    ref_opt = torch.optim.SGD(mods.parameters(), lr=0.01, momentum=0.95)
    target = torch.randn(4, channels, size, size, generator=g, dtype=torch.float64)
    base_idx = torch.tensor([0, 1, 2, 3])
    # hallucinators used per iteration; some never, some only later, some idle after use
    schedule = [[1], [1, 2], [2], [0, 2], [2], [], [1, 2], [2]]
    for used in schedule:
        loss = sum(((syn.generate(base_idx, h) - target) ** 2).mean() for h in used) if used else None
        ref_loss = sum(((mods[h](syn.bases.detach()[base_idx]) - target) ** 2).mean() for h in used) if used else None
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
        if used:
            loss.backward()
            ref_loss.backward()
        step_used_hallucinators(opt)
        ref_opt.step()
        _assert_same(syn, mods, opt, ref_opt)
    # hallucinator 3 was never used: exactly its initial values, no momentum buffer
    torch.testing.assert_close(syn.dec_bias[3], _oracle_modules(syn)[3].dec.bias)


def test_plain_sgd_on_stacked_rows_would_move_unused_hallucinators():
    # The defect the function removes: a zero-gradient row still moves under momentum.
    p = nn.Parameter(torch.ones(2, 3))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.95)
    p.grad = torch.ones(2, 3)
    opt.step()
    p.grad = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    before = p.detach()[1].clone()
    opt.step()
    assert not torch.equal(p.detach()[1], before)  # plain SGD moved the unused row
    q = nn.Parameter(torch.ones(2, 3))
    opt = torch.optim.SGD([q], lr=0.1, momentum=0.95)
    q.grad = torch.ones(2, 3)
    step_used_hallucinators(opt)
    buf = opt.state[q]["momentum_buffer"][1].clone()
    q.grad = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    before = q.detach()[1].clone()
    step_used_hallucinators(opt)
    assert torch.equal(q.detach()[1], before) and torch.equal(opt.state[q]["momentum_buffer"][1], buf)


def test_distiller_step_leaves_unused_hallucinators_alone(digits):
    d = _distiller(digits)
    plans = []
    real_plan = d.objective.sample_plan

    def spy():
        plans.append(real_plan())
        return plans[-1]

    d.objective.sample_plan = spy
    for _ in range(3):
        before = [p.detach().clone() for p in d.synthetic.hallucinator_parameters()]
        bufs = [d.opt_style.state.get(p, {}).get("momentum_buffer") for p in d.synthetic.hallucinator_parameters()]
        bufs = [None if b is None else b.clone() for b in bufs]
        d.step()
        plan_used = set(plans[-1].hall_idx.tolist() + plans[-1].club.hall_pair.tolist())
        unused = sorted(set(range(5)) - plan_used)
        assert unused  # syn_steps 1 + a pair: at most 3 of 5 used
        for p, b0, buf0 in zip(d.synthetic.hallucinator_parameters(), before, bufs):
            assert torch.equal(p.detach()[unused], b0[unused])
            buf = d.opt_style.state[p]["momentum_buffer"]
            assert torch.equal(buf[unused], torch.zeros_like(buf[unused]) if buf0 is None else buf0[unused])
        assert not torch.equal(d.synthetic.dec_bias.detach()[sorted(plan_used)], before[-1][sorted(plan_used)])


# ---------------------------------------------------------------------------------------------------------------------
# k-center coreset


def _brute_kcenter(feats, k):
    n = feats.shape[0]
    mu = feats.mean(dim=0)
    first = min(range(n), key=lambda i: (float(torch.linalg.norm(feats[i] - mu)), i))
    chosen = [first]
    while len(chosen) < k:
        best, best_d = None, -1.0
        for i in range(n):
            d = min(float(torch.linalg.norm(feats[i] - feats[j])) for j in chosen)
            if d > best_d:  # strict: ties keep the lowest index
                best, best_d = i, d
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("n,d,k", [(7, 3, 3), (13, 5, 6), (31, 2, 9), (5, 11, 5)])
def test_kcenter_matches_brute_force_farthest_point(n, d, k):
    feats = torch.randn(n, d, generator=torch.Generator().manual_seed(n * d), dtype=torch.float64)
    assert _kcenter(feats, k) == _brute_kcenter(feats, k)


def test_kcenter_coreset_per_class(digits):
    x, y = coreset(digits, 3, "kcenter", torch.Generator().manual_seed(0), features="pixels")
    assert x.shape == (30, *digits.train_images.shape[1:]) and y.tolist() == [c for c in range(10) for _ in range(3)]
    for c in range(10):
        idx = torch.nonzero(digits.train_labels == c).flatten()
        feats = digits.train_images[idx].reshape(len(idx), -1).double()
        want = idx[torch.tensor(_brute_kcenter(feats, 3))]
        torch.testing.assert_close(x[3 * c : 3 * c + 3], digits.train_images[want].float())
    # the embedding features are the herding ones: same network for the same generator
    xe, _ = coreset(digits, 2, "kcenter", torch.Generator().manual_seed(5))
    assert xe.shape[0] == 20


def test_eval_command_kcenter_baseline(monkeypatch, capsys):
    seen = {}

    def fake(syn, ds, cfg, **kw):
        seen["syn"], seen["label"] = syn, kw.get("label")
        from haba_fast.evaluate import EvalResult

        return EvalResult({m: [0.5] for m in cfg.models}, lr=0.01, num_samples=10, epochs=cfg.epochs)

    monkeypatch.setattr("haba_fast.evaluate.evaluate_synthetic", fake)
    from haba_fast.cli import main

    argv = ["eval", "--baseline", "kcenter", "--ipc", "2", "--herding-features", "pixels", "--seed", "0"]
    assert main(argv) == 0
    ds = data.load("digits", generator=torch.Generator().manual_seed(0))
    want, _ = coreset(ds, 2, "kcenter", torch.Generator().manual_seed(0), features="pixels")
    torch.testing.assert_close(seen["syn"][0], want)
    assert seen["label"] == "kcenter coreset ipc 2"
    capsys.readouterr()


def test_eval_command_standardizes_haba_sets_by_default(monkeypatch, tmp_path, capsys):
    seen = []

    def fake(syn, ds, cfg, **kw):
        seen.append(cfg.batch_standardize)
        from haba_fast.evaluate import EvalResult

        return EvalResult({m: [0.5] for m in cfg.models}, lr=0.01, num_samples=10, epochs=cfg.epochs)

    monkeypatch.setattr("haba_fast.evaluate.evaluate_synthetic", fake)
    from haba_fast.cli import main
    from haba_fast.factorization import Pixels

    g = torch.Generator().manual_seed(0)
    HaBa(num_classes=10, bpc=1, channels=1, im_size=(8, 8), n_hallucinators=2, generator=g).save(
        tmp_path / "haba.pt", {"dataset": "digits"}
    )
    pix = Pixels(num_classes=10, ipc=1, channels=1, im_size=(8, 8), generator=g)
    pix.save(tmp_path / "pix.pt", {"dataset": "digits"})
    assert main(["eval", str(tmp_path / "haba.pt")]) == 0
    assert main(["eval", str(tmp_path / "pix.pt")]) == 0
    assert main(["eval", "--baseline", "random", "--ipc", "1"]) == 0
    assert main(["eval", str(tmp_path / "haba.pt"), "--batch-standardize", "False"]) == 0
    assert main(["eval", str(tmp_path / "pix.pt"), "--batch_standardize"]) == 0
    assert seen == [True, False, False, False, True]
    capsys.readouterr()


# --- pixel MTT as mtt-distillation's distill.py, HaBa as distill_fac.py -------------------------------------------
# distill.py: SGD momentum 0.5 for the images and for syn_lr, no clip of syn_lr, evaluation every eval_it from the
# start. distill_fac.py: momentum 0.95 (images, styles) and 0.9 (syn_lr), syn_lr clipped to >= 0.001 after each
# step, evaluation in the last tenth of the run.


@pytest.mark.parametrize("param, mom, lr_mom", [("pixels", 0.5, 0.5), ("haba", 0.95, 0.9)])
def test_optimizer_momenta_follow_the_reference(digits, param, mom, lr_mom):
    d = _distiller(digits, parameterization=param)
    assert d.opt_img.param_groups[0]["momentum"] == mom
    assert d.opt_lr.param_groups[0]["momentum"] == lr_mom
    if param == "haba":
        assert d.opt_style.param_groups[0]["momentum"] == mom


def test_learned_lr_floor_is_the_references():
    from haba_fast.distill import DistillConfig

    assert DistillConfig(parameterization="haba").lr_floor == 0.001
    assert DistillConfig(parameterization="pixels").lr_floor is None
    assert DistillConfig(parameterization="pixels", min_lr=0.01).lr_floor == 0.01


def test_pixel_lr_is_not_clipped(digits):
    # A step that drives syn_lr below 0.001 (and below zero) keeps it there for pixels, as distill.py does.
    d = _distiller(digits, parameterization="pixels", lr_teacher=0.002)
    with torch.no_grad():
        d.syn_lr.fill_(0.0005)
    d.step()
    assert float(d.syn_lr) != 0.001
    h = _distiller(digits, parameterization="haba", lr_teacher=0.002)
    with torch.no_grad():
        h.syn_lr.fill_(0.0005)
    h.step()
    assert float(h.syn_lr) >= 0.001


def test_eval_pool_per_reference():
    from haba_fast.distill import DistillConfig, eval_iterations

    kw = dict(iterations=100, eval_it=20, num_eval=1)
    assert eval_iterations(DistillConfig(parameterization="pixels", **kw)) == [0, 20, 40, 60, 80, 100]  # from it 0
    assert eval_iterations(DistillConfig(parameterization="haba", **kw)) == [90, 100]
    assert eval_iterations(DistillConfig(parameterization="haba", iterations=100, eval_it=5, num_eval=1)) == [
        90, 95, 100,
    ]  # fmt: skip


def test_readme_reference_flags_example_is_the_preset():
    """README's "reference script's own flags" command runs what ``--preset cifar10-ipc10`` runs (the same run as
    run_cifar10_ipc10_style5.sh), so a user copying either gets the reference's settings."""
    import dataclasses
    import pathlib
    import shlex

    from haba_fast.cli import build_parser
    from haba_fast.commands.distill import config_from_args

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("# or the reference script's own flags", 1)[1].split("\n", 1)[1]
    lines = []
    for line in block.splitlines():
        lines.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            break
    argv = shlex.split(" ".join(lines))
    assert argv[:2] == ["haba-fast", "distill"]
    parse = build_parser().parse_args
    mine = dataclasses.asdict(config_from_args(parse(argv[1:])))
    preset = dataclasses.asdict(config_from_args(parse(["distill", "--preset", "cifar10-ipc10", *argv[-6:]])))
    diff = {k: (mine[k], preset[k]) for k in mine if mine[k] != preset[k]}
    assert diff == {"batch_standardize": (None, True)}  # None: on for haba (eval_config)
    assert eval_config(config_from_args(parse(argv[1:]))).batch_standardize is True
