"""Bad input to `haba-fast table`, `eval`, `export` and `buffer` (and the folder dataset): exit code 2 and a one-line
error naming the file or the flag and, where there is one, what to do; never a traceback, a hang or a silent NaN.

Every command here is refused before it trains or evaluates anything, so these run in seconds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from haba_fast import data
from haba_fast.cli import main
from haba_fast.factorization import HaBa, Pixels


def _error(capsys, command: str, argv) -> str:
    """Run ``haba-fast ARGV`` in-process; assert exit code 2 and one error line; return that line."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith(f"haba-fast {command}: error: ") and "\n" not in err, err
    return err


# ------------------------------------------------------------------------------------------------------------- table
def _table(tmp_path, *extra, out=None):
    """A table command line whose every output lies under tmp_path (nothing is written into the checkout)."""
    return ["table", "--dataset", "digits", "--out", out or tmp_path / "out", "--doc", tmp_path / "doc.md",
            "--cells-json", tmp_path / "cells.json", "--images", tmp_path / "img",
            "--tuning-json", tmp_path / "tuning.json", *extra]


RANDOM_BYTES = bytes(np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8))


@pytest.mark.parametrize("content, why", [(b"[1]", "it holds a JSON list, not an object"),
                                          (RANDOM_BYTES, "not UTF-8 text"),
                                          (b"{nope", "Expecting property name")])
@pytest.mark.parametrize("where, what, advice", [
    ("cells.json", "table cells", "pass another --cells-json, or delete it"),
    ("tuning.json", "tuning log", "pass another --tuning-json, or delete it"),
    ("out/cells/quick/ipc1-random.json", "table cell", "delete it to recompute the cell"),
])
def test_table_names_a_json_file_it_cannot_read(tmp_path, capsys, content, why, where, what, advice):
    path = tmp_path / where
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    err = _error(capsys, "table", _table(tmp_path))
    assert f"{path}: not a {what} JSON file (" in err and why in err and advice in err


def test_table_refuses_a_cells_json_that_is_a_folder_or_has_no_cell_list(tmp_path, capsys):
    (tmp_path / "cells.json").mkdir()
    err = _error(capsys, "table", _table(tmp_path))
    assert f"--cells-json {tmp_path / 'cells.json'} is a folder: give the path of a file" in err
    (tmp_path / "cells.json").rmdir()
    (tmp_path / "cells.json").write_text(json.dumps({"dataset": "digits", "cells": 3}))
    err = _error(capsys, "table", _table(tmp_path))
    assert "not a table cells JSON file (its 'cells' entry is a JSON number, not a list)" in err


def test_table_refuses_an_unwritable_out_naming_the_flag(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = _error(capsys, "table", _table(tmp_path, out=tmp_path / "file" / "out"))
    assert f"cannot write to the work folder (--out) {tmp_path / 'file' / 'out'}" in err


@pytest.mark.parametrize("extra, message", [
    (["--threads", "-1"], "threads (--threads) must be >= 0 (0 leaves torch's setting), got -1"),
    (["--no-cross", "--cross-models", "ResNet18"], "which this run does not compute: --no-cross skips them"),
    (["--ipc", "1", "--cross-models", "ResNet18"], "the sets of IPC 10 (protocol quick), which --ipc leaves out"),
    (["--render-only", "--cross-models", "MLP"], "--render-only computes nothing"),
])
def test_table_refuses_bad_or_idle_options(tmp_path, capsys, extra, message):
    assert message in _error(capsys, "table", _table(tmp_path, *extra))
    assert not (tmp_path / "out").exists()  # refused before anything was created


def test_table_threads_zero_still_leaves_torch_s_setting(tmp_path, monkeypatch):
    from haba_fast import table

    seen = {}
    monkeypatch.setattr(table, "run_table", lambda *a, **k: seen.update(k))
    assert main([str(a) for a in _table(tmp_path, "--threads", "0")]) == 0
    assert seen["threads"] is None


# -------------------------------------------------------------------------------------------------------------- eval
@pytest.fixture
def sets(tmp_path):
    """Our pixel .pt, our HaBa .pt, a reference HaBa run folder and a reference pixel folder with a labels file."""
    px = Pixels(10, 1, 1, (8, 8), generator=torch.Generator().manual_seed(0))
    px.save(tmp_path / "px.pt", meta={"dataset": "digits"})
    HaBa(10, 1, 1, (8, 8), n_hallucinators=2, generator=torch.Generator().manual_seed(0)).to_reference(
        tmp_path / "run", it=5)
    px.to_reference(tmp_path / "pixrun", it=3)
    return tmp_path


EVAL = ["--models", "MLP", "--num-eval", "1", "--epochs", "0", "--quiet", "--device", "cpu"]


@pytest.mark.parametrize("flag, value, message", [
    ("--momentum", "nan", "momentum (--momentum) must be a number in [0, 1), got nan"),
    ("--momentum", "-1", "momentum (--momentum) must be a number in [0, 1), got -1.0"),
    ("--weight-decay", "-1", "weight_decay (--weight-decay) must be a number >= 0, got -1.0"),
    ("--weight-decay", "nan", "weight_decay (--weight-decay) must be a number >= 0, got nan"),
    ("--lr", "inf", "lr (--lr) must be a positive number, got inf"),
])
def test_eval_checks_every_float_flag(sets, capsys, flag, value, message):
    assert message in _error(capsys, "eval", ["eval", sets / "px.pt", *EVAL, f"{flag}={value}"])


@pytest.mark.parametrize("extra, message", [
    (["--it", "5"], "--it picks the iteration in a reference run folder, and {tmp}/px.pt is a file (a haba-fast "
                    "synthetic set holds one iteration): drop --it"),
    (["--num-classes", "3"], "--num-classes is for reference checkpoints, which do not record their classes; "
                             "{tmp}/px.pt is a haba-fast synthetic set, which does: drop --num-classes"),
    (["--ipc", "2"], "--ipc sizes a --baseline coreset; a CHECKPOINT has its own size: drop --ipc"),
    (["--herding-features", "pixels"], "--herding-features chooses how a --baseline herding / kcenter coreset is "
                                       "picked; it does nothing for a CHECKPOINT"),
    (["--no-dsa", "--dsa-strategy", "color"], "--dsa-strategy color chooses the augmentation that --no-dsa "
                                              "(--dsa False) turns off: drop one of them"),
])
def test_eval_refuses_flags_our_set_ignores(sets, capsys, extra, message):
    err = _error(capsys, "eval", ["eval", sets / "px.pt", *EVAL, *extra])
    assert message.format(tmp=sets) in err


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/run/images_5.pt", "--it", "5"], "is a file (its name gives the iteration): drop --it"),
    (["{tmp}/pixrun", "--it", "3", "--num-classes", "5"],
     "--num-classes 5 does not apply: {tmp}/pixrun records 10 classes (its labels file)"),
    (["{tmp}/run", "--it", "5", "--num-classes", "0"], "--num-classes must be >= 1, got 0"),
    (["--baseline", "random", "--ipc", "1", "--herding-features", "pixels"], "--baseline random uses no features"),
    (["--baseline", "herding", "--ipc", "1", "--it", "3"], "--it reads a reference checkpoint; --baseline "
                                                           "evaluates a coreset: drop --it"),
    (["--baseline", "herding", "--ipc", "1", "--num-classes", "10"], "drop --num-classes"),
])
def test_eval_refuses_reference_and_coreset_flags_where_idle(sets, capsys, argv, message):
    err = _error(capsys, "eval", ["eval", *[a.format(tmp=sets) for a in argv], *EVAL])
    assert message.format(tmp=sets) in err


# ------------------------------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("argv, message", [
    (["{tmp}/px.pt", "--it", "5"], "--it picks the iteration in a reference run folder, and {tmp}/px.pt is a file"),
    (["{tmp}/px.pt", "--num-classes", "10"], "{tmp}/px.pt is a haba-fast synthetic set, which does: drop "
                                             "--num-classes"),
    (["--reference-images", "{tmp}/run/images_5.pt", "--reference-styles", "{tmp}/run/styles_5.pt",
      "--num-classes", "0"], "--num-classes must be >= 1, got 0"),
    (["--reference-images", "{tmp}/run/images_5.pt", "--num-classes", "0"], "--num-classes must be >= 1, got 0"),
    (["--reference-images", "{tmp}/run/images_5.pt", "--reference-styles", "{tmp}/run/styles_5.pt", "--it", "4"],
     "--reference-images names the files of one iteration: drop --it"),
    (["{tmp}/pixrun", "--it", "3", "--num-classes", "5"], "--num-classes 5 does not apply"),
])
def test_export_refuses_idle_or_bad_reference_flags(sets, capsys, argv, message):
    err = _error(capsys, "export", ["export", *[a.format(tmp=sets) for a in argv], "--out", sets / "o"])
    assert message.format(tmp=sets) in err
    assert not (sets / "o").exists()


def test_export_probes_out_before_writing(sets, capsys):
    (sets / "file").write_text("x")
    err = _error(capsys, "export", ["export", sets / "px.pt", "--out", sets / "file" / "o"])
    assert f"cannot write to the --out folder {sets / 'file' / 'o'}" in err


def test_export_reference_num_classes_still_applies(sets):
    out = sets / "ok"
    assert main(["export", str(sets / "run"), "--it", "5", "--num-classes", "5", "--out", str(out)]) == 0
    assert torch.load(out / "samples.pt", weights_only=True)["labels"].max().item() == 4


# ------------------------------------------------------------------------------------------------------------ buffer
BUFFER = ["buffer", "--dataset", "digits", "--model", "MLP", "--num_experts", "1", "--train_epochs", "1",
          "--subset-per-class", "2", "--quiet", "--device", "cpu"]


@pytest.mark.parametrize("flag, value, message", [
    ("--mom", "nan", "momentum (--mom) must be a number in [0, 1), got nan"),
    ("--mom", "-1", "momentum (--mom) must be a number in [0, 1), got -1.0"),
    ("--l2", "nan", "weight_decay (--l2) must be a number >= 0, got nan"),
    ("--l2", "-1", "weight_decay (--l2) must be a number >= 0, got -1.0"),
    ("--lr_teacher", "nan", "lr (--lr_teacher) must be a positive number, got nan"),
])
def test_buffer_checks_every_float_flag_before_creating_anything(tmp_path, capsys, flag, value, message):
    assert message in _error(capsys, "buffer", [*BUFFER, "--out", tmp_path / "b", f"{flag}={value}"])
    assert not (tmp_path / "b").exists()


def test_buffer_save_interval_groups_our_format_and_is_never_ignored_on_resume(tmp_path, capsys):
    from haba_fast.experts import load_buffer

    out = tmp_path / "b"
    assert main([str(a) for a in [*BUFFER, "--num_experts", "3", "--save_interval", "2", "--out", out]]) == 0
    buf = load_buffer(out)
    assert buf.header["config"]["save_interval"] == 2 and buf.file_groups() == [[0, 1], [2]]
    capsys.readouterr()
    for argv in (["--save_interval", "5"], []):  # another value, or the default 10: refused, not ignored
        err = _error(capsys, "buffer", [*BUFFER, "--num_experts", "4", *argv, "--out", out])
        assert "its experts are grouped in runs of 2 (what --max_files counts as files)" in err
        assert "pass --save_interval 2" in err
    assert load_buffer(out).num_trajectories == 3
    assert main([str(a) for a in [*BUFFER, "--num_experts", "4", "--save_interval", "2", "--out", out]]) == 0
    assert load_buffer(out).file_groups() == [[0, 1], [2, 3]]


# ---------------------------------------------------------------------------------------------------- folder dataset
def _folder(root, per_class):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, n in per_class.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_a_folder_too_small_to_split_says_why(tmp_path, capsys):
    root = _folder(tmp_path / "imgs", {"a": 1, "b": 2})
    err = _error(capsys, "eval", ["eval", "--baseline", "random", "--ipc", "1", "--dataset", "folder",
                                  "--data-path", root, *EVAL])
    assert f"the folder dataset {root} has no test images: without train/ and test/ folders" in err
    assert "round(n / 4) held out for testing" in err and "a class needs 3 images or more" in err
    assert "(images per class here: a 1, b 2)" in err
    err = _error(capsys, "buffer", ["buffer", "--dataset", "folder", "--data_path", root, "--model", "MLP",
                                    "--train_epochs", "1", "--out", tmp_path / "b", "--quiet"])
    assert "has no test images" in err and not (tmp_path / "b").exists()
    ds = data.load("folder", root)
    with pytest.raises(ValueError, match="a class needs 3 images or more"):
        data.check_test_images(ds)
    data.check_test_images(data.load("folder", _folder(tmp_path / "big", {"a": 3, "b": 3})))  # one tested each


def test_a_test_folder_without_class_folders_is_named(tmp_path):
    _folder(tmp_path / "imgs" / "train", {"a": 2})
    (tmp_path / "imgs" / "test").mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders in .*test"):
        data.load("folder", tmp_path / "imgs")


def test_buffer_refuses_an_unwritable_out_before_loading_the_data(tmp_path, capsys, monkeypatch):
    from haba_fast import data

    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(data, "load", lambda *a, **k: pytest.fail("the data were loaded before --out was checked"))
    err = _error(capsys, "buffer", ["buffer", "--dataset", "digits", "--out", tmp_path / "file" / "buf"])
    assert f"cannot write to the --out folder {tmp_path / 'file' / 'buf'}" in err
