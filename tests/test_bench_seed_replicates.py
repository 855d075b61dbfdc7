"""bench/seed_replicates.py on made-up cell JSONs: seeds paired by IPC and row, differences and their spread."""

from __future__ import annotations

import json

import pytest
from utils import load_bench_script


def _script():
    return load_bench_script("seed_replicates")


def _cells(path, **means):
    cells = [{"key": f"ipc10-{row}", "mean": m, "accuracies": [m] * 3} for row, m in means.items()]
    path.write_text(json.dumps({"cells": cells}))


def test_pairs_each_seed_and_summarizes_the_differences(tmp_path, monkeypatch, capsys):
    module = _script()
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    _cells(tmp_path / "ds_cells.json", mtt=0.70, **{"haba-mtt": 0.72})
    _cells(tmp_path / "ds-quick-seed1_cells.json", mtt=0.71, **{"haba-mtt": 0.70})
    _cells(tmp_path / "ds-quick-seed2_cells.json", mtt=0.69, **{"haba-mtt": 0.73})
    _cells(tmp_path / "ds-quick-seed3_cells.json", mtt=0.70)  # no HaBa cell: left out
    (tmp_path / "ds-quick-seedx_cells.json").write_text("{}")  # not a seed file name: ignored
    out = tmp_path / "rep.json"
    assert module.main(["--dataset", "ds", "--pairs", "mtt:haba-mtt", "--out", str(out)]) == 0
    pair = json.loads(out.read_text())["pairs"][0]
    assert [s["seed"] for s in pair["seeds"]] == [0, 1, 2]
    assert [round(s["difference"], 6) for s in pair["seeds"]] == [0.02, -0.01, 0.04]
    assert pair["difference_mean"] == pytest.approx(0.05 / 3)
    assert pair["difference_std"] == pytest.approx(0.025166, abs=1e-6)  # sample std (ddof 1)
    assert pair["haba_ahead"] == 2 and pair["n"] == 3
    assert "HaBa ahead in 2 of 3" in capsys.readouterr().out


def test_haba_settings_pair_their_haba_cells_with_the_protocols_pixel_cells(tmp_path, monkeypatch, capsys):
    module = _script()
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    _cells(tmp_path / "ds_cells.json", dc=0.77, **{"haba-dc": 0.74})
    _cells(tmp_path / "ds-quick-seed2_cells.json", dc=0.78, **{"haba-dc": 0.66})
    _cells(tmp_path / "ds-quick-seed3_cells.json", dc=0.75)  # no tuned HaBa cell of seed 3: left out
    _cells(tmp_path / "ds-quick-dc.lr_style=0.01_cells.json", **{"haba-dc": 0.75})
    _cells(tmp_path / "ds-quick-seed2-dc.lr_style=0.01_cells.json", **{"haba-dc": 0.76})
    _cells(tmp_path / "ds-quick-seed1-dc.lr_style=0.1_cells.json", **{"haba-dc": 0.10})  # another setting: ignored
    assert module.main(["--dataset", "ds", "--pairs", "dc:haba-dc", "--haba-set", "dc.lr_style=0.01"]) == 0
    report = json.loads((tmp_path / "ds_replicates-dc.lr_style=0.01.json").read_text())
    pair = report["pairs"][0]
    assert report["haba_settings"] == "dc.lr_style=0.01" and sorted(report["haba_files"]) == ["0", "2"]
    assert [(s["seed"], round(s["pixels"], 6), round(s["haba"], 6)) for s in pair["seeds"]] == [
        (0, 0.77, 0.75), (2, 0.78, 0.76)]
    assert pair["difference_mean"] == pytest.approx(-0.02)
    # Without --haba-set the protocol's own HaBa cells are paired, into the default file.
    assert module.main(["--dataset", "ds", "--pairs", "dc:haba-dc"]) == 0
    plain = json.loads((tmp_path / "ds_replicates.json").read_text())["pairs"][0]
    assert [round(s["haba"], 6) for s in plain["seeds"]] == [0.74, 0.66]
    assert module.main(["--dataset", "ds", "--haba-set", "dm.lr_img=3"]) == 2
    assert "with HaBa settings dm.lr_img=3" in capsys.readouterr().err


def test_no_cell_files_is_an_error(tmp_path, monkeypatch, capsys):
    module = _script()
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    assert module.main(["--dataset", "none"]) == 2
    assert "no cell JSONs for none" in capsys.readouterr().err


def test_one_seed_has_no_spread(tmp_path, monkeypatch, capsys):
    module = _script()
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    _cells(tmp_path / "ds_cells.json", dm=0.78, **{"haba-dm": 0.75})
    assert module.main(["--dataset", "ds", "--pairs", "dm:haba-dm"]) == 0
    pair = json.loads((tmp_path / "ds_replicates.json").read_text())["pairs"][0]
    assert pair["n"] == 1 and pair["difference_mean"] == pytest.approx(-0.03)
    assert pair["difference_std"] is None and pair["difference_sem"] is None and pair["haba_std"] is None
    out = capsys.readouterr().out
    assert "one seed only" in out and "± 0.00" not in out
