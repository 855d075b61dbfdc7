"""Real-data quality: on scikit-learn's digits, HaBa at a small budget beats a random real coreset of the same storage.

Slow (the whole demo pipeline: experts, two distillations, evaluations): run with ``pytest -m slow``.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_haba_beats_random_coreset_at_equal_storage(tmp_path):
    from haba_fast.demo import DemoConfig, run_demo

    demo = DemoConfig(out=str(tmp_path / "demo"), seed=0, progress=False)
    res = run_demo(demo, log=lambda s: None)
    rows = {r["method"].split(" ")[0]: r for r in res["rows"]}
    haba, pixels, rand = rows["HaBa"], rows["pixel"], rows["random"]
    # HaBa never uses more storage than the baselines it is compared with
    assert haba["floats"] <= rand["floats"] == pixels["floats"]
    # a clear margin, averaged over the evaluation repeats
    assert len(haba["accuracies"]) == demo.num_eval
    assert haba["mean"] >= rand["mean"] + 0.03, res["table"]
