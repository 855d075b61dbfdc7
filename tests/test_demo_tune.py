"""The digits demo's validation tuning (haba_fast.demo.tune): split, isolation from the test set, the trial log."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from utils import load_bench_script

from haba_fast import data
from haba_fast.demo import TUNABLE, DemoConfig, check_trial, tune

TINY = dict(
    num_experts=1,
    expert_train_epochs=2,
    expert_epochs=1,
    max_start_epoch=1,
    syn_steps=2,
    iterations=2,
    pixels_iterations=2,
    num_eval=2,
    eval_epochs=2,
    progress=False,
)
TRIALS = [{"method": "pixels"}, {"method": "haba", "n_hallucinators": 1, "haba_lr_style": 0.1}]


def _ids(images):
    """The tag each tagged train image carries in its (always blank) top-left pixel."""
    return torch.round(images[:, 0, 0, 0].double() * 1000).long().tolist()


@pytest.fixture
def tagged(monkeypatch):
    """digits with train image i tagged i/1000 in pixel (0, 0) and a poisoned test set (NaN images, label -1)."""
    real = data.load("digits")
    train = real.train_images.clone()
    assert bool((real.train_images[:, 0, 0, 0] == real.train_images[0, 0, 0, 0]).all())  # the pixel is blank
    train[:, 0, 0, 0] = torch.arange(len(train), dtype=train.dtype) / 1000
    poisoned = dataclasses.replace(
        real,
        train_images=train,
        test_images=torch.full_like(real.test_images, float("nan")),
        test_labels=torch.full_like(real.test_labels, -1),
    )
    monkeypatch.setattr(data, "load", lambda name, *a, **k: poisoned)
    return poisoned


def _spy(monkeypatch):
    """Record the dataset every expert run, distillation and evaluation receives."""
    import haba_fast.distill as distill_mod
    import haba_fast.evaluate as evaluate_mod
    import haba_fast.experts as experts_mod

    seen = {"experts": [], "distill": [], "evaluate": []}
    for mod, name, key, pos in (
        (experts_mod, "train_experts", "experts", 0),
        (distill_mod, "distill", "distill", 1),
        (evaluate_mod, "evaluate_synthetic", "evaluate", 1),
    ):
        orig = getattr(mod, name)

        def wrapper(*args, _orig=orig, _key=key, _pos=pos, **kwargs):
            seen[_key].append(args[_pos])
            return _orig(*args, **kwargs)

        monkeypatch.setattr(mod, name, wrapper)
    return seen


def test_tune_trains_on_the_rest_evaluates_on_held_out_and_never_reads_the_test_set(tagged, monkeypatch, tmp_path):
    seen = _spy(monkeypatch)
    log_path = tmp_path / "log.json"
    demo = DemoConfig(out=str(tmp_path / "work"), **TINY)
    rec = tune(TRIALS, demo, val_per_class=7, split_seed=3, log_path=log_path, meta={"m": 1}, log=lambda s: None)

    assert len(seen["experts"]) == 1 and len(seen["distill"]) == 2 and len(seen["evaluate"]) == 2
    trained = [set(_ids(d.train_images)) for d in seen["experts"] + seen["distill"]]
    assert all(t == trained[0] for t in trained)  # experts and every trial see the same training pool
    evaluated = seen["evaluate"][0]
    val = _ids(evaluated.test_images)
    assert len(set(val)) == len(val) == 70 and set(val).isdisjoint(trained[0])
    assert set(val) | trained[0] == set(range(len(tagged.train_images)))
    assert torch.equal(evaluated.test_labels, tagged.train_labels[val])  # the held-out images keep their labels
    assert torch.bincount(evaluated.test_labels).tolist() == [7] * 10  # class-balanced
    for d in seen["evaluate"] + seen["distill"] + seen["experts"]:  # the poisoned test set reaches nothing
        assert not torch.isnan(d.test_images).any() and bool((d.test_labels >= 0).all())
    assert rec["split"]["val_images"] == 70 and rec["split"]["split_seed"] == 3

    # every trial recorded, with each network's accuracy and the values it ran with
    assert [t["method"] for t in rec["trials"]] == ["pixels", "haba"]
    for t in rec["trials"]:
        assert len(t["accuracies"]) == 2 and t["mean"] == pytest.approx(sum(t["accuracies"]) / 2)
    haba = rec["trials"][1]
    assert haba["values"] == {"n_hallucinators": 1, "haba_lr_img": 3.0, "haba_lr_style": 0.1, "iterations": 2}
    assert haba["bpc"] == 1 and haba["floats"] == 10 * 64 + 92  # 1 basis per class + one 3×3 hallucinator
    assert rec["best"] == {"pixels": 0, "haba": 1} and rec["meta"] == {"m": 1}
    assert json.loads(log_path.read_text()) == json.loads(json.dumps(rec))

    # a second run reuses the recorded trials (nothing is distilled again) and runs only the new one
    seen = _spy(monkeypatch)
    more = TRIALS + [{"method": "haba", "n_hallucinators": 2}]
    rec2 = tune(more, demo, val_per_class=7, split_seed=3, log_path=log_path, log=lambda s: None)
    assert len(seen["distill"]) == 1 and rec2["trials"][:2] == json.loads(json.dumps(rec["trials"]))
    assert rec2["trials"][2]["values"]["n_hallucinators"] == 2 and len(rec2["trials"]) == 3
    # another split is another experiment: nothing is reused
    seen = _spy(monkeypatch)
    tune(TRIALS[:1], demo, val_per_class=5, split_seed=3, log_path=log_path, log=lambda s: None)
    assert len(seen["distill"]) == 1
    pool = seen["experts"][0]  # the experts too are the new split's, trained on its pool (not the 7-per-class one's)
    assert pool.train_labels.numel() == len(tagged.train_labels) - 50 and seen["distill"][0] is pool
    buffers = sorted(p.name for p in (tmp_path / "work").glob("buffer*"))
    assert buffers == ["buffer-val5-split3", "buffer-val7-split3"]


@pytest.mark.parametrize(
    "trial, match",
    [
        ({"method": "dct"}, "method 'haba' or 'pixels'"),
        ({"n_hallucinators": 2}, "method 'haba' or 'pixels'"),
        ({"method": "pixels", "haba_lr_img": 3.0}, "pixels trials may set only"),
        ({"method": "haba", "eval_epochs": 3}, "haba trials may set only"),
    ],
)
def test_bad_trials_are_refused_before_anything_runs(trial, match, monkeypatch, tmp_path):
    monkeypatch.setattr(data, "load", lambda *a, **k: pytest.fail("loaded data for a refused trial"))
    with pytest.raises(ValueError, match=match):
        tune([{"method": "pixels"}, trial], DemoConfig(out=str(tmp_path)), log=lambda s: None)


@pytest.mark.parametrize("kwargs", [{"val_per_class": 0}, {"val_per_class": 2.5}])
def test_bad_split_sizes_are_refused(kwargs, tmp_path):
    with pytest.raises(ValueError, match="val_per_class must be a positive int"):
        tune([{"method": "pixels"}], DemoConfig(out=str(tmp_path)), log=lambda s: None, **kwargs)


def test_tune_needs_evaluation_networks(tmp_path):
    with pytest.raises(ValueError, match="num_eval >= 1"):
        tune([{"method": "pixels"}], DemoConfig(out=str(tmp_path), num_eval=0), log=lambda s: None)


def test_the_bench_trials_are_valid():
    path = Path(__file__).resolve().parents[1] / "bench" / "tune_demo.py"
    if not path.exists():  # the sdist ships tests/ without bench/
        pytest.skip("bench/tune_demo.py is not in this tree")
    mod = load_bench_script("tune_demo")
    assert mod.TRIALS and [check_trial(t)[0] for t in mod.TRIALS].count("pixels") >= 1
    keys = [json.dumps(t, sort_keys=True) for t in mod.TRIALS]
    assert len(set(keys)) == len(keys)  # no trial listed twice
    # the committed log is this script's (a rerun reuses every trial) and the demo's defaults are a trial of it
    log = json.loads((path.parents[0] / "results" / "demo_tuning.json").read_text())
    base = dataclasses.asdict(DemoConfig(**mod.BASE))
    base = {k: v for k, v in base.items() if k not in ("out", "progress", "threads")}
    assert log["base"] == base and log["split"]["val_images"] == 250
    assert [{"method": t["method"], **t["settings"]} for t in log["trials"]] == mod.TRIALS
    demo = DemoConfig()
    assert {"method": "haba", **{k: getattr(demo, k) for k in TUNABLE["haba"]}} in [
        {"method": t["method"], **t["values"]} for t in log["trials"]
    ]
    trial = {"method": "pixels", "values": {"pixels_lr_img": 10.0}, "floats": 1280, "accuracies": [0.9, 0.8],
             "mean": 0.85, "std": 0.05, "seconds": {"distill_pixels_s": 12.3}}
    table = mod.markdown({"trials": [trial], "best": {"pixels": 0}}).splitlines()
    assert table[2] == "| 0 | pixels | pixels_lr_img 10.0 | 1,280 | 85.00 ± 5.00 **(best)** | 90.0 / 80.0 | 12 |"
