"""DC/DSA/DM's own script flags and defaults (VICO-UoE/DatasetCondensation main.py, main_DM.py) mean here what they
mean there: ``--method``, ``--init``, ``--Iteration`` counted in main.py's iterations, ``--dis_metric``, the
scripts' defaults and evaluation pools; ``--num_exp`` and ``--save_path`` are refused with what to use instead."""

from __future__ import annotations

import pytest

from haba_fast.cli import build_parser
from haba_fast.commands.distill import config_from_args
from haba_fast.distill import DistillConfig, apply_objective, eval_iterations, objective_schedule


def _cfg(*argv):
    return config_from_args(build_parser().parse_args(["distill", "--dataset", "digits", *argv]))


# get_loops: IPC 1 -> outer 1, IPC 10 -> 10, IPC 50 -> 50.
@pytest.mark.parametrize("ipc,outer", [(1, 1), (10, 10), (50, 50)])
@pytest.mark.parametrize("objective", ["dc", "dsa"])
def test_dc_defaults_are_main_py_s(objective, ipc, outer):
    """main.py: --Iteration 1000 (each outer_loop updates on a fresh network), evaluation every 500 from it 0,
    --num_eval 20, --init noise, --lr_img 0.1."""
    cfg = _cfg("--objective", objective, "--ipc", str(ipc))
    assert (cfg.iterations, cfg.eval_it) == (1000 * outer, 500 * outer)
    assert (cfg.num_eval, cfg.pix_init, cfg.lr_img) == (20, "noise", 0.1)


def test_dc_iteration_counts_main_py_iterations_and_iterations_counts_updates():
    assert _cfg("--objective", "dsa", "--ipc", "10", "--Iteration", "7").iterations == 70
    assert _cfg("--objective", "dsa", "--ipc", "10", "--iterations", "7").iterations == 7
    # an explicit outer loop sizes main.py's iteration too
    assert _cfg("--objective", "dc", "--ipc", "10", "--outer-loop", "3", "--inner-loop", "1",
                "--Iteration", "5").iterations == 15
    # DM's and MTT's iteration is one update whatever the spelling
    assert _cfg("--objective", "dm", "--Iteration", "7").iterations == 7
    assert _cfg("--Iteration", "7").iterations == 7


def test_dm_defaults_are_main_dm_py_s():
    cfg = _cfg("--objective", "dm")
    assert (cfg.ipc, cfg.iterations, cfg.eval_it, cfg.num_eval, cfg.pix_init, cfg.lr_img) == (
        50, 20000, 2000, 20, "real", 1.0)
    assert _cfg("--objective", "dm", "--ipc", "10", "--eval_it", "5", "--num_eval", "3").eval_it == 5


def test_mtt_defaults_are_untouched():
    cfg = _cfg()
    assert (cfg.ipc, cfg.iterations, cfg.eval_it, cfg.num_eval) == (1, 15000, 100, 5)
    assert objective_schedule(cfg) == {}


def test_dc_at_an_ipc_without_public_loops_needs_them():
    with pytest.raises(ValueError, match="DC defines outer/inner loops only for IPC"):
        _cfg("--objective", "dc", "--ipc", "3")
    assert _cfg("--objective", "dc", "--ipc", "3", "--outer-loop", "2", "--inner-loop", "1").iterations == 2000


def test_apply_objective_sizes_the_run_in_the_python_api():
    cfg = apply_objective(DistillConfig(ipc=10), "dc")
    assert (cfg.objective, cfg.iterations, cfg.eval_it, cfg.pix_init) == ("dc", 10000, 5000, "noise")
    # an IPC without public loops: the objective names the problem when it is built, not apply_objective
    assert apply_objective(DistillConfig(ipc=3), "dc").iterations == DistillConfig().iterations


@pytest.mark.parametrize("method,objective", [("DC", "dc"), ("DSA", "dsa"), ("DM", "dm")])
def test_method_names_the_objective(method, objective):
    assert _cfg("--method", method, "--ipc", "1").objective == objective
    assert _cfg("--method", method, "--objective", objective, "--ipc", "1").objective == objective


@pytest.mark.parametrize("method", ["dsa", "Dsa", "dSA"])
def test_dsa_in_another_case_is_refused_as_main_py_would_run_dc(method):
    """main.py tests ``args.method == 'DSA'``: 'dsa' runs DC there. Refused, naming the spelling that works; DC and
    DM in any case mean what they mean there ('dc' runs DC; main_DM.py never reads --method)."""
    with pytest.raises(ValueError, match=f"'{method}' runs DC there; write --method DSA"):
        _cfg("--method", method, "--ipc", "1")
    assert _cfg("--method", "dc", "--ipc", "1").objective == "dc"
    assert _cfg("--method", "Dm", "--ipc", "1").objective == "dm"


def test_method_dsa_without_a_strategy_augments_nothing_as_main_py(capsys):
    """main.py's --dsa_strategy default is 'None' (DiffAugment returns its input): --method DSA alone matches and
    evaluates unaugmented there, with a warning here; --objective dsa and an explicit strategy keep DSA's."""
    cfg = _cfg("--method", "DSA", "--ipc", "1")
    assert (cfg.objective, cfg.dsa, cfg.dsa_strategy, cfg.epoch_eval_train) == ("dsa", True, "none", 1000)
    assert "--method DSA without --dsa_strategy" in capsys.readouterr().err
    full = "color_crop_cutout_flip_scale_rotate"
    assert _cfg("--method", "DSA", "--ipc", "1", "--dsa_strategy", full).dsa_strategy == full
    assert _cfg("--objective", "dsa", "--ipc", "1").dsa_strategy == full
    assert _cfg("--method", "DC", "--ipc", "1").dsa_strategy == full  # unread: DC does not augment
    assert "without --dsa_strategy" not in capsys.readouterr().err
    for off in (["--dsa", "False"], ["--no_aug", "True"]):  # the strategy is never read: no warning about it
        assert _cfg("--method", "DSA", "--ipc", "1", *off).dsa_strategy == full
        assert "without --dsa_strategy" not in capsys.readouterr().err


def test_method_dsa_without_a_strategy_runs_unaugmented(tmp_path, monkeypatch, capsys):
    """The whole run: no augmentation reaches the distillation's real or synthetic batches, the network updates or
    the evaluation (main.py: DiffAugment('None') everywhere), and the evaluation still trains 1000 epochs."""
    from haba_fast import augment, evaluate
    from haba_fast.cli import main

    def refuse(*args, **kwargs):
        raise AssertionError("augmented although main.py's strategy 'None' augments nothing")

    monkeypatch.setattr(augment, "sample", refuse)
    epochs = []
    real_train = evaluate.train_network
    monkeypatch.setattr(evaluate, "train_network",
                        lambda *a, **k: (epochs.append(k.get("epochs")), real_train(*a, **k))[1])
    assert main(["distill", "--dataset", "digits", "--method", "DSA", "--ipc", "1", "--Iteration", "1",
                 "--num_eval", "1", "--out", str(tmp_path / "run"), "--no-progress", "--eval_it", "1",
                 "--model", "ConvNetW32"]) == 0
    assert "DSA strategy none (no augmentation)" in capsys.readouterr().out
    assert epochs == [1001, 1001]  # iterations 0 and 1; evaluate_synset trains Epoch + 1 epochs, as there


@pytest.mark.parametrize("method", ["DC", "DSA", "DM"])
def test_method_without_parameterization_says_it_distills_a_haba_set(capsys, method):
    """main.py / main_DM.py distill images; --method alone runs the objective on HaBa's bases (the default
    parameterization), and says so once; --parameterization given (either) says nothing."""
    assert _cfg("--method", method, "--ipc", "1").parameterization == "haba"
    err = capsys.readouterr().err
    assert f"note: --method {method} distills a HaBa set here" in err and "add --parameterization pixels" in err
    for parameterization in ("pixels", "haba"):
        assert _cfg("--method", method, "--ipc", "1", "--parameterization", parameterization).parameterization \
            == parameterization
        assert "note: --method" not in capsys.readouterr().err
    assert _cfg("--objective", method.lower(), "--ipc", "1").objective == method.lower()
    assert "note: --method" not in capsys.readouterr().err


def test_epoch_eval_train_with_method_warns_that_main_py_overwrites_it(capsys):
    """A value other than the script's default is used as given, on every network (DC's augmented ones too), with a
    warning under --method; at the default, main.py's 300 / 1000 (augmented) hold."""
    from haba_fast.distill import eval_config

    cfg = _cfg("--method", "DC", "--ipc", "1", "--epoch_eval_train", "50", "--eval_models", "ConvNet,ConvNetBN")
    assert "main.py overwrites --epoch_eval_train" in capsys.readouterr().err
    ev = eval_config(cfg, dataset_name="mnist")
    assert [ev.epochs_for(m) for m in ev.models] == [50, 50]
    cfg = _cfg("--method", "DC", "--ipc", "1", "--epoch_eval_train", "300", "--eval_models", "ConvNet,ConvNetBN")
    assert "overwrites" not in capsys.readouterr().err  # the default: nothing differs from main.py
    ev = eval_config(cfg, dataset_name="mnist")
    assert [ev.epochs_for(m) for m in ev.models] == [1000, 1000]
    ev = eval_config(cfg, dataset_name="fashion-mnist")
    assert [ev.epochs_for(m) for m in ev.models] == [300, 1000]
    assert _cfg("--objective", "dc", "--ipc", "1", "--epoch_eval_train", "50").epoch_eval_train == 50
    assert "overwrites" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--method", "KIP"], r"unknown --method 'KIP': DC, DSA or DM"),
        (["--method", "DC", "--objective", "dm"], r"--method DC means --objective dc, not --objective dm"),
        (["--num_exp", "5"], r"--num_exp is not supported: .* own --seed and --out"),
        (["--save_path", "result"], r"--save_path is not supported: .* use --out"),
        (["--objective", "dc", "--dis_metric", "l1"], r"invalid choice: 'l1'"),
    ],
)
def test_dc_flags_refused_with_the_reason(argv, message, capsys):
    if "--dis_metric" in argv:  # an argparse choice: the parser exits with the reason
        with pytest.raises(SystemExit):
            _cfg(*argv)
        assert "invalid choice: 'l1'" in capsys.readouterr().err
        return
    with pytest.raises(ValueError, match=message):
        _cfg(*argv)


def test_init_is_pix_init_and_dis_metric_reaches_the_config():
    assert _cfg("--objective", "dm", "--init", "noise").pix_init == "noise"
    assert _cfg("--objective", "dc", "--init", "real").pix_init == "real"
    assert _cfg("--objective", "dsa", "--dis_metric", "cos").dis_metric == "cos"
    with pytest.raises(ValueError, match="--dis_metric"):  # MTT does not match gradients
        _cfg("--dis_metric", "mse")


def test_method_without_dataset_is_refused_not_ignored():
    from haba_fast.commands.distill import run

    with pytest.raises(ValueError, match="--method needs --dataset"):
        run(build_parser().parse_args(["distill", "--method", "DC"]))


def test_dc_pool_is_every_500_iterations_from_0_and_the_end_only_for_other_eval_modes():
    cfg = _cfg("--objective", "dc", "--ipc", "10", "--Iteration", "1000")
    assert eval_iterations(cfg) == list(range(0, 10001, 5000))
    multi = _cfg("--objective", "dc", "--ipc", "10", "--Iteration", "1000", "--eval_mode", "M")
    assert eval_iterations(multi) == [10000]
    mtt_multi = _cfg("--parameterization", "pixels", "--Iteration", "200", "--eval_mode", "M")
    assert eval_iterations(mtt_multi) == [0, 100, 200]  # MTT's distill.py keeps its pool for every eval_mode


# VICO-UoE/DatasetCondensation main.py and main_DM.py (the same flags; DM's --method is DM)
DC_MAIN = [
    "--method", "--dataset", "--model", "--ipc", "--eval_mode", "--num_exp", "--num_eval", "--epoch_eval_train",
    "--Iteration", "--lr_img", "--lr_net", "--batch_real", "--batch_train", "--init", "--dsa_strategy",
    "--data_path", "--save_path", "--dis_metric",
]  # fmt: skip


def test_every_dc_script_flag_is_known_to_distill():
    """None is an argparse "unrecognized argument": each is read with its meaning or refused with a reason."""
    parser = build_parser()
    distill = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "distill")[1]
    known = set(distill._option_string_actions)
    assert [f for f in DC_MAIN if f not in known] == []


def test_a_preset_keeps_its_values_under_an_objectives_defaults():
    cfg = _cfg("--preset", "cifar10-ipc10", "--objective", "dm")
    assert (cfg.ipc, cfg.objective, cfg.lr_img) == (10, "dm", 1.0)  # the preset's IPC, DM's lr_img (not HaBa's 100)
    dc = _cfg("--preset", "cifar10-ipc10", "--objective", "dc")
    assert (dc.ipc, dc.iterations, dc.pix_init) == (10, 10000, "noise")  # main.py's run at the preset's IPC


def test_budget_ipc_leaves_ipc_unset_in_the_record():
    """DM's --ipc 50 is not recorded beside --budget-ipc (ipc is a structural key of the resume check)."""
    cfg = _cfg("--objective", "dm", "--budget-ipc", "10")
    assert (cfg.ipc, cfg.budget_ipc) == (DistillConfig.ipc, 10)
    assert apply_objective(DistillConfig(budget_ipc=10), "dm").ipc == DistillConfig.ipc
    assert apply_objective(DistillConfig(), "dm").ipc == 50


def test_dis_metric_is_refused_where_no_gradients_are_matched():
    with pytest.raises(ValueError, match="--dis_metric"):
        DistillConfig(objective="dm", dis_metric="mse").validate()
    assert DistillConfig(objective="dc", dis_metric="mse").validate().dis_metric == "mse"


def test_dm_on_cifar100_is_normalized_as_dms_code_and_evaluated_so(tmp_path, monkeypatch):
    """distill --objective dm normalizes CIFAR-100 with its own statistics (DC/DSA/DM's get_dataset), records them,
    and eval of that set loads the data the same way."""
    import numpy as np
    from data_fixtures import random_uint8, write_cifar100

    from haba_fast import data
    from haba_fast.cli import main
    from haba_fast.factorization import load_synthetic

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(100), 2)
    write_cifar100(tmp_path / "data", (random_uint8(rng, 200, 3, 32, 32), labels),
                   (random_uint8(rng, 100, 3, 32, 32), np.arange(100)))
    out = tmp_path / "run"
    assert main(["distill", "--dataset", "CIFAR100", "--data_path", str(tmp_path / "data"), "--method", "DM",
                 "--parameterization", "pixels", "--ipc", "1", "--Iteration", "1", "--num_eval", "0",
                 "--model", "ConvNetW32", "--batch_real", "2", "--out", str(out), "--no-progress"]) == 0
    meta = load_synthetic(out / "synthetic.pt").meta
    assert tuple(meta["mean"]) == data.DC_REFERENCE_STATS["cifar100"][0]
    seen = []

    def spy(*a, **kw):
        seen.append(kw.get("statistics"))
        raise SystemExit(0)  # the statistics are what this test is about; no evaluation needed

    monkeypatch.setattr(data, "load", spy)
    with pytest.raises(SystemExit):
        main(["eval", str(out / "synthetic.pt"), "--data_path", str(tmp_path / "data"), "--num-eval", "1"])
    assert seen == ["dc"]


def test_lr_style_help_states_each_objectives_default(capsys):
    """The hallucinators' rate per objective, as ``--help`` states it and as a run gets it (HaBa + dc/dsa: 0.002,
    at every IPC; an explicit --lr_style wins)."""
    for ipc in ("1", "10", "50"):
        for objective, rate in (("mtt", 100.0), ("dc", 0.002), ("dsa", 0.002), ("dm", 1.0)):
            assert _cfg("--objective", objective, "--ipc", ipc).lr_style == rate
            assert apply_objective(DistillConfig(ipc=int(ipc)), objective).lr_style == rate
        assert _cfg("--objective", "dc", "--budget-ipc", ipc).lr_style == 0.002
        assert _cfg("--objective", "dsa", "--ipc", ipc, "--lr_style", "0.3").lr_style == 0.3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["distill", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: mtt 100, the reference's; dc/dsa 0.002; dm 1.0)" in text


def test_a_preset_under_gradient_matching_takes_its_hallucinator_rate():
    """A preset's IPC stays under --objective dc (its name says it); its HaBa rates do not (MTT's lr_style 100)."""
    cfg = config_from_args(build_parser().parse_args(["distill", "--preset", "cifar10-ipc50", "--objective", "dc"]))
    assert (cfg.ipc, cfg.lr_style) == (50, 0.002)
