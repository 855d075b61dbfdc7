"""bench/composite_step.py at a tiny size: the counts it reports are there and consistent."""

from __future__ import annotations

import pytest
from utils import load_bench_script

from haba_fast._ext import extension_available


def _script():
    return load_bench_script("composite_step")


@pytest.mark.skipif(not extension_available(), reason="the C++ extension is not built")
def test_composite_step_counts_the_ops_of_both_sweeps(monkeypatch):
    monkeypatch.setenv("HABA_FAST_TRAJECTORY_FUSED", "0")
    out = _script().measure(batch=4, width=32, repeats=1)
    module = _script()
    for name in module.STEP_OPS:
        r = out[name]
        assert 0 < r["compute_ops"] <= r["aten_ops"] + 10 and r["compute_input_melems"] > 0
        assert "aten::convolution" in r["top_compute_ops"] and "aten::view" not in r["top_compute_ops"]
    # the backward sweep's step does more than the forward sweep's
    assert out["trajectory_step_adjoint"]["compute_ops"] > out["trajectory_step_grad"]["compute_ops"]
    # a kept backward step skips the primal convolutions: fewer convolutions and fewer elements read
    kept, full = out["trajectory_step_adjoint_kept"], out["trajectory_step_adjoint"]
    assert kept["top_compute_ops"]["aten::convolution"] < full["top_compute_ops"]["aten::convolution"]
    assert kept["compute_input_melems"] < full["compute_input_melems"]
    # with its values checked once per unroll, the forward step runs no finiteness check
    assert "aten::isfinite" not in out["trajectory_step_grad"]["top_compute_ops"]
