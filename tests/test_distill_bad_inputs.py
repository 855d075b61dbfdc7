"""`haba-fast distill` refuses bad input with a one-line error (exit 2) before any work, and no flag is accepted and
ignored: a flag given explicitly that the chosen configuration never reads is refused, or (a combination the
reference scripts accept and ignore too) warned about.

Every check here fails before the expert buffer is read (the buffer path does not exist): none distills.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from haba_fast import distill as distill_mod
from haba_fast.cli import main
from haba_fast.distill import DistillConfig


def _mtt(tmp_path, *extra):
    """The audit's shorthand D: a small HaBa MTT run on digits (its buffer is never reached here)."""
    return ["distill", "--dataset", "digits", "--ipc", "1", "--n_style", "2", "--syn_steps", "2", "--expert_epochs",
            "1", "--max_start_epoch", "2", "--Iteration", "2", "--num_eval", "0", "--buffer_path",
            str(tmp_path / "no_buffer"), "--device", "cpu", "--no-progress", "--out", str(tmp_path / "R"),
            *extra]  # fmt: skip


def _plain(tmp_path, *extra):
    """The same run without the MTT and HaBa flags (for --objective dm and --parameterization pixels)."""
    return ["distill", "--dataset", "digits", "--ipc", "1", "--Iteration", "2", "--num_eval", "0", "--device", "cpu",
            "--no-progress", "--out", str(tmp_path / "R"), *extra]  # fmt: skip


def _error(argv, capsys) -> str:
    """The one-line error of a command that must exit 2 without a traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("haba-fast distill: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _config(argv):
    from haba_fast.cli import build_parser
    from haba_fast.commands.distill import config_from_args

    return config_from_args(build_parser().parse_args(argv))


# ---------------------------------------------------------------------------------------------------------------------
# 1. NaN, inf and negative floats


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--lr_lr", "nan"),
        ("--lambda_club_content", "nan"),
        ("--lambda_cls_content", "inf"),
        ("--lambda_club_content", "-5"),
        ("--lambda_likeli_content", "-5"),
        ("--lambda_cls_content", "-5"),
        ("--lambda_contrast_content", "-5"),
        ("--lr_lr", "-0.5"),
        ("--lr_teacher", "inf"),
        ("--lr_style", "nan"),
        ("--min-lr", "nan"),
        ("--max-loss", "nan"),
        ("--max-loss=-inf", None),
    ],
)
def test_non_finite_or_negative_floats_are_refused(tmp_path, capsys, flag, value):
    line = _error(_mtt(tmp_path, *([flag] if value is None else [flag, value])), capsys)
    if value is None:  # --flag=value (a value starting with "-")
        flag, value = flag.split("=")
    name = {"--min-lr": "--min_lr"}.get(flag, flag)
    bound = "> 0" if flag == "--max-loss" else ">= 0"
    assert f"{name} must be a finite number {bound}, got {float(value)}" in line


def test_every_float_setting_is_checked():
    floats = {f.name for f in dataclasses.fields(DistillConfig) if f.type in ("float", "Optional[float]")}
    assert floats == {name for name, _, _ in distill_mod.FLOAT_SETTINGS}
    for name in sorted(floats):
        for bad in (math.nan, -math.inf, -1.0) + (() if name == "max_loss" else (math.inf,)):  # max_loss: inf = off
            with pytest.raises(ValueError, match="must be a finite number"):
                DistillConfig(**{name: bad}).validate()


# ---------------------------------------------------------------------------------------------------------------------
# 2. Flags that the chosen configuration never reads

MTT_ONLY = [
    ("--engine", "exact"),
    ("--syn_steps", "3"),
    ("--buffer_path", "b"),
    ("--lr_lr", "1e-4"),
    ("--lr_teacher", "0.02"),
    ("--expert_epochs", "2"),
    ("--max_start_epoch", "3"),
    ("--min-lr", "0.01"),
    ("--lr-param", "log"),
    ("--load_all",),
    ("--max_files", "1"),
    ("--max_experts", "1"),
    ("--max-loss", "100"),
]


@pytest.mark.parametrize("objective", ["dm", "dc", "dsa"])
@pytest.mark.parametrize("flag", MTT_ONLY, ids=lambda f: f[0])
def test_mtt_flags_are_refused_with_other_objectives(tmp_path, capsys, objective, flag):
    extra = ["--outer-loop", "1", "--inner-loop", "1"] if objective in ("dc", "dsa") else []
    line = _error(_plain(tmp_path, "--objective", objective, *extra, *flag), capsys)
    assert f"{flag[0]} applies to --objective mtt" in line and "drop it" in line


@pytest.mark.parametrize("flag", MTT_ONLY, ids=lambda f: f[0])
def test_mtt_flags_are_taken_with_mtt(flag):
    _config(["distill", "--dataset", "digits", *flag])


HABA_ONLY = [
    ("--n_style", "2"),
    ("--lr_style", "1"),
    ("--kernel-size", "3"),
    ("--single_channel",),
    ("--hallucinator-init", "identity"),
    ("--lambda_club_content", "0.5"),
    ("--lambda_likeli_content", "0.5"),
    ("--lambda_cls_content", "0.5"),
    ("--lambda_contrast_content", "0.5"),
]


@pytest.mark.parametrize("flag", HABA_ONLY, ids=lambda f: f[0])
def test_haba_flags_are_refused_for_pixels(tmp_path, capsys, flag):
    line = _error(_plain(tmp_path, "--parameterization", "pixels", *flag), capsys)
    assert f"{flag[0]} applies to --parameterization haba" in line


@pytest.mark.parametrize("flag", HABA_ONLY, ids=lambda f: f[0])
def test_haba_flags_are_taken_for_haba(flag):
    _config(["distill", "--dataset", "digits", *flag])


def test_flags_set_by_a_preset_or_a_default_are_not_refused():
    # The preset sets syn_steps, lr_lr, lambdas...; --objective dm then ignores them, and no flag was given for them.
    cfg = _config(["distill", "--preset", "cifar10-ipc1", "--objective", "dm"])
    assert cfg.objective == "dm" and cfg.syn_steps == 50
    cfg = _config(["distill", "--dataset", "digits", "--parameterization", "pixels"])
    assert cfg.n_hallucinators == DistillConfig().n_hallucinators


def test_scopes_keep_the_existing_refusals(tmp_path, capsys):
    line = _error(_plain(tmp_path, "--objective", "dm", "--memory-budget", "1GB"), capsys)
    assert "--memory-budget 1GB applies to --objective mtt with the exact or first-order engine" in line
    line = _error(_plain(tmp_path, "--objective", "dm", "--outer-loop", "2"), capsys)
    assert "--outer-loop applies to --objective dc or dsa" in line
    line = _error(_mtt(tmp_path, "--lr-net", "0.1"), capsys)
    assert "--lr-net applies to --objective dc, dsa or dm" in line
    one_table = {"memory_budget", "offload_weights", "compile_step", "cuda_graphs", "outer_loop", "lr_net"}
    assert set(distill_mod.SCOPES) >= one_table


def test_batch_syn_is_refused_where_nothing_draws_batches(tmp_path, capsys):
    line = _error(_plain(tmp_path, "--objective", "dm", "--parameterization", "pixels", "--batch_syn", "5"), capsys)
    assert "--batch_syn applies to" in line
    assert _config(["distill", "--dataset", "digits", "--objective", "dm", "--batch_syn", "5"]).batch_syn == 5


def test_lr_label_needs_soft_labels(tmp_path, capsys):
    assert "--lr-label applies to --soft-labels" in _error(_mtt(tmp_path, "--lr-label", "0.1"), capsys)
    assert _config(["distill", "--dataset", "digits", "--soft-labels", "--lr-label", "0.1"]).lr_label == 0.1


def test_ipc_and_budget_ipc_together_are_refused(tmp_path, capsys):
    line = _error(_mtt(tmp_path, "--budget-ipc", "5"), capsys)  # D gives --ipc 1
    assert "give --ipc or --budget-ipc, not both" in line


def test_resume_with_overwrite_is_refused(tmp_path, capsys):
    line = _error(_mtt(tmp_path, "--resume", "--overwrite"), capsys)
    assert "--resume continues the run in --out and --overwrite starts it over" in line
    with pytest.raises(ValueError, match="give one of them"):
        distill_mod.check_out_dir(None, resume=True, overwrite=True)


@pytest.mark.parametrize(
    "extra,flag,why",
    [
        (["--dsa", "False", "--dsa_strategy", "color"], "--dsa_strategy", "--dsa False turns augmentation off"),
        (["--no_aug", "--dsa_strategy", "color"], "--dsa_strategy", "--no_aug turns augmentation off"),
        (["--dsa", "False", "--no_aug"], "--no_aug", "--dsa False turns augmentation off"),
        (
            ["--lambda_club_content", "0", "--lambda_cls_content", "2"],
            "--lambda_cls_content",
            "--lambda_club_content 0 cuts the adversary off",
        ),
    ],
)
def test_reference_combinations_that_do_nothing_are_warned_about(tmp_path, capsys, extra, flag, why):
    cfg = _config(_mtt(tmp_path, *extra))
    err = capsys.readouterr().err
    assert f"haba-fast distill: warning: {flag} has no effect here: {why}" in err
    assert "the reference ignores it too" in err and cfg.objective == "mtt"


@pytest.mark.parametrize("rank,printed", [("0", True), ("1", False)])
def test_reference_no_op_warning_prints_once_per_torchrun_job(tmp_path, capsys, monkeypatch, rank, printed):
    """Under torchrun the config is checked before the process group is joined: $RANK decides who warns."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    _config(_mtt(tmp_path, "--dsa", "False", "--dsa_strategy", "color"))
    assert ("warning: --dsa_strategy has no effect here" in capsys.readouterr().err) == printed


def test_augmentation_flags_that_evaluation_reads_are_not_warned_about(tmp_path, capsys):
    # --no_aug turns augmentation off while distilling only: the evaluation still uses the strategy.
    cfg = _config(_mtt(tmp_path, "--num_eval", "1", "--no_aug", "--dsa_strategy", "color"))
    assert cfg.dsa_strategy == "color" and "warning" not in capsys.readouterr().err


def test_augmentation_flags_that_our_objectives_ignore_are_refused(tmp_path, capsys):
    # --objective dc distills without augmentation and evaluates without it by default (--dsa False).
    line = _error(_plain(tmp_path, "--objective", "dc", "--outer-loop", "1", "--inner-loop", "1", "--dsa_strategy",
                         "color"), capsys)  # fmt: skip
    assert "--dsa_strategy has no effect here: --objective dc turns augmentation off" in line and "drop it" in line


@pytest.mark.parametrize("flag,value", [("--epoch_eval_train", "10"), ("--eval_mode", "M"), ("--batch_train", "64")])
def test_reference_evaluation_flags_without_evaluation_are_warned_about_or_refused(tmp_path, capsys, flag, value):
    """--num_eval 0 evaluates nothing: the evaluation's flags do nothing (the reference's scripts ignore them too)."""
    cfg = _config(_mtt(tmp_path, flag, value))  # a reference command line: it runs, with a warning
    err = capsys.readouterr().err
    assert f"warning: {flag} has no effect here: --num_eval 0 evaluates nothing" in err and cfg.num_eval == 0
    line = _error(_plain(tmp_path, "--objective", "dm", flag, value), capsys)  # our objectives: refused
    assert f"{flag} has no effect here: --num_eval 0 evaluates nothing; drop it" in line
    cfg = _config(_mtt(tmp_path, "--num_eval", "1", flag, value))  # read where the run evaluates
    assert "warning" not in capsys.readouterr().err and cfg.num_eval == 1


def test_batch_train_sizes_gradient_matching_batches_without_evaluation(tmp_path, capsys):
    # DC/DSA train their network on the synthetic set in batches of --batch_train between outer steps, as DC's
    # main.py does; with an outer loop of 1 there is no such step, and nothing reads it.
    cfg = _config(_plain(tmp_path, "--objective", "dc", "--outer-loop", "2", "--inner-loop", "1", "--batch_train",
                         "64"))  # fmt: skip
    assert cfg.batch_train == 64 and "warning" not in capsys.readouterr().err
    line = _error(_plain(tmp_path, "--objective", "dsa", "--outer-loop", "1", "--inner-loop", "1", "--batch_train",
                         "64"), capsys)  # fmt: skip
    assert "--batch_train has no effect here: --num_eval 0 evaluates nothing; drop it" in line


@pytest.mark.parametrize("extra", [["--batch-standardize"], ["--eval-models", "ConvNet"]])
def test_our_evaluation_flags_without_evaluation_are_refused(tmp_path, capsys, extra):
    line = _error(_mtt(tmp_path, *extra), capsys)
    assert f"{extra[0]} applies to the run's evaluations (--num_eval 0 evaluates nothing); drop it" in line
    assert _config(_mtt(tmp_path, "--num_eval", "1", *extra)).num_eval == 1


def test_main_py_epochs_warning_is_not_given_where_nothing_is_evaluated(tmp_path, capsys):
    """--method DC overwrites --epoch_eval_train in main.py (a warning says so), but with --num_eval 0 the flag does
    nothing at all: one message, the refusal."""
    argv = _plain(tmp_path, "--method", "DC", "--outer-loop", "2", "--inner-loop", "1", "--epoch_eval_train", "10")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--epoch_eval_train has no effect here: --num_eval 0 evaluates nothing" in err
    assert "main.py overwrites" not in err
    _config([a if a != "0" else "1" for a in argv])  # --num_eval 1: the warning stands
    assert "main.py overwrites --epoch_eval_train" in capsys.readouterr().err


def test_one_hallucinator_with_the_adversarial_term_is_warned_about(tmp_path, capsys):
    """distill_fac.py contrasts two different hallucinators (and fails with one); here the term compares the one
    hallucinator with itself, and the CLI says so; without the term nothing is said."""
    cfg = _config(_mtt(tmp_path, "--n_style", "1"))
    err = capsys.readouterr().err
    assert "warning: --n_style 1: the adversarial term contrasts two different hallucinators" in err
    assert cfg.n_hallucinators == 1 and cfg.lambda_club_content > 0
    _config(_mtt(tmp_path, "--n_style", "1", "--lambda_club_content", "0"))
    _config(_mtt(tmp_path))  # two hallucinators
    assert "--n_style 1" not in capsys.readouterr().err


def test_evaluation_values_are_checked_without_evaluation(tmp_path, capsys):
    assert "--batch_train must be >= 1, got 0" in _error(_mtt(tmp_path, "--batch_train", "0"), capsys)
    assert "unknown --eval-models network 'Foo'" in _error(_mtt(tmp_path, "--eval-models", "Foo"), capsys)


# ---------------------------------------------------------------------------------------------------------------------
# 3. --memory-budget sizes


@pytest.mark.parametrize("value", ["0.5", "1.5", "0.1B", "0.0001KB"])
def test_memory_budget_that_is_not_a_whole_number_of_bytes_is_refused(tmp_path, capsys, value):
    line = _error(_mtt(tmp_path, "--memory-budget", value), capsys)
    assert f"--memory-budget {value}: memory budget" in line and "is not a whole number of bytes" in line


def test_memory_budget_none_is_not_a_budget(tmp_path, capsys):  # not read as 0 (Python's None) nor unlimited
    assert "is not understood" in _error(_mtt(tmp_path, "--memory-budget", "none"), capsys)


@pytest.mark.parametrize("value", ["0", "0.0", "2048", "1.5KB", "0.5GiB", "auto", "unlimited", "inf", "min"])
def test_memory_budget_sizes_are_taken(value):
    assert DistillConfig(memory_budget=value).validate().memory_budget == value


# ---------------------------------------------------------------------------------------------------------------------
# 4. --checkpoint-every


@pytest.mark.parametrize("value", ["0", "-1"])
def test_checkpoint_every_below_one_is_refused(tmp_path, capsys, value):
    line = _error(_mtt(tmp_path, f"--checkpoint-every={value}"), capsys)
    assert f"--checkpoint-every must be >= 1, got {value}" in line


# ---------------------------------------------------------------------------------------------------------------------
# 5. An --out folder holding a finished run


def test_a_finished_run_without_checkpoint_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "R"
    out.mkdir()
    (out / "synthetic.pt").write_bytes(b"a finished run")
    line = _error(_mtt(tmp_path), capsys)
    assert "already holds a finished run (synthetic.pt" in line and "--overwrite" in line
    line = _error(_mtt(tmp_path, "--resume"), capsys)
    assert "nothing to resume in" in line and "no checkpoint.pt" in line and "--overwrite" in line
    assert (out / "synthetic.pt").read_bytes() == b"a finished run"
    # --overwrite passes the folder guard (and fails later, at the missing buffer).
    assert "holds a finished run" not in _error(_mtt(tmp_path, "--overwrite"), capsys)


def test_a_run_with_a_checkpoint_needs_resume_before_anything_loads(tmp_path, capsys):
    out = tmp_path / "R"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"a run's resume state")
    line = _error(_mtt(tmp_path), capsys)  # refused before the (missing) buffer is read
    assert "already holds a run (checkpoint.pt); pass --resume to continue it" in line
    assert "holds a run (checkpoint.pt)" not in _error(_mtt(tmp_path, "--resume"), capsys)  # on to the buffer
    assert "holds a run (checkpoint.pt)" not in _error(_mtt(tmp_path, "--overwrite"), capsys)


def test_distill_guards_the_folder_too(tmp_path):
    from haba_fast.distill import distill

    (tmp_path / "synthetic.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="already holds a finished run"):
        distill(DistillConfig(dataset="digits"), None, None, tmp_path, progress=False, log=lambda s: None)


# ---------------------------------------------------------------------------------------------------------------------
# 6. The demo checks its settings before training experts


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--iterations=-1"], "--iterations must be >= 0, got -1"),
        (["--lr_lr", "nan"], "--lr_lr must be a finite number >= 0"),
        (["--max_start_epoch", "20"], "the demo's experts train 8 epochs"),
        (["--n_style", "1000"], "cannot hold even 1 basis per class"),
    ],
)
def test_demo_settings_are_checked_before_the_experts_train(tmp_path, capsys, monkeypatch, argv, match):
    from haba_fast import experts

    def no_training(*args, **kwargs):
        raise AssertionError("the demo trained experts before checking its settings")

    monkeypatch.setattr(experts, "train_experts", no_training)
    assert match in _error(["distill", "--out", str(tmp_path / "demo"), *argv], capsys)


# ---------------------------------------------------------------------------------------------------------------------
# 7. Sizes that cannot fit the machine


def test_a_synthetic_set_larger_than_memory_is_refused(tmp_path, capsys):
    line = _error(_mtt(tmp_path, "--n_style", str(10**12)), capsys)
    assert "the synthetic set" in line and "does not fit this machine's memory" in line and "--n_style" in line
    line = _error(_plain(tmp_path, "--parameterization", "pixels", "--ipc", str(10**12), "--pix_init", "noise"), capsys)
    assert "the synthetic set" in line and "lower --ipc" in line


def test_a_weight_trajectory_larger_than_memory_is_refused(tmp_path, capsys):
    line = _error(_mtt(tmp_path, "--syn_steps", str(10**9)), capsys)
    assert "the weight trajectory of --syn_steps 1000000000" in line
    assert "--memory-budget min" in line and "--offload-weights" in line
    # With the trajectory checkpointed (min) the bound does not apply: the run goes on (to the missing buffer).
    line = _error(_mtt(tmp_path, "--syn_steps", str(10**9), "--memory-budget", "min"), capsys)
    assert "weight trajectory" not in line and "no_buffer" in line


def test_max_loss_inf_turns_the_exploded_guard_off():
    """+inf: no step counts as exploded (a non-finite loss still does); accepted, as before the float checks."""
    assert DistillConfig(max_loss=float("inf")).validate().max_loss == float("inf")
