"""pytest-benchmark suite: generate + augment, forward and backward, per DSA family and backend.

Same step as ``haba-fast bench genaug`` (haba_fast/benchmarks/genaug.py): one hallucinator drawn per sample,
per-sample augmentation parameters, gradients to the bases and every hallucinator parameter. ``reference``
is the research-code path (a module per hallucinator + composed DSA ops). Sizes from the environment:
HABA_BENCH_BATCH (default 500), HABA_BENCH_SIZE (32), HABA_BENCH_CHANNELS (3), HABA_BENCH_K (3).

    pytest bench/test_bench_genaug.py --benchmark-json bench/results/pytest-genaug.json
"""

from __future__ import annotations

import os

import pytest
import torch

from haba_fast.augment import sample
from haba_fast.benchmarks import genaug as G

BATCH = int(os.environ.get("HABA_BENCH_BATCH", "500"))
SIZE = int(os.environ.get("HABA_BENCH_SIZE", "32"))
CHANNELS = int(os.environ.get("HABA_BENCH_CHANNELS", "3"))
K = int(os.environ.get("HABA_BENCH_K", "3"))
HALLUCINATORS = 5


def _paths():
    out = ["reference", "torch"]
    from haba_fast._ext import has_op

    if has_op("generate_augment"):
        out.append("cpu")
    if torch.cuda.is_available():
        out.append("triton")
    return out


@pytest.fixture(scope="module")
def problem():
    return G.make_problem(BATCH, SIZE, CHANNELS, CHANNELS, K, HALLUCINATORS, 100, "cpu", torch.float32)


@pytest.mark.parametrize("family", G.FAMILIES)
@pytest.mark.parametrize("path", _paths())
def test_genaug_fwd_bwd(benchmark, problem, path, family):
    device = torch.device("cuda" if path == "triton" else "cpu")
    prob = {k: v.to(device) for k, v in problem.items()}
    gen = torch.Generator().manual_seed(1)
    aug = sample(family, BATCH, (SIZE, SIZE), generator=gen).to(device)
    grad_out = torch.randn((BATCH, CHANNELS, SIZE, SIZE), generator=gen).to(device)
    benchmark.extra_info.update(batch=BATCH, size=SIZE, channels=CHANNELS, k=K, hallucinators=HALLUCINATORS)
    if path == "reference":
        bases = prob["bases"].clone().requires_grad_(True)
        mods = G.reference_modules(prob)

        def step():
            return G.reference_step(bases, mods, prob, aug, grad_out)
    else:
        leaves = [prob[k].clone().requires_grad_(True) for k in G._PARAM_NAMES]

        def step():
            out = G.fused_step(prob, leaves, aug, grad_out, path)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out

    grads = benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
    assert all(torch.isfinite(g).all() for g in grads)


# ---- the GPU bandwidth model and report (plain tests: they run on the CPU, no benchmark fixture) ----------------
def test_minimal_bytes_by_hand():
    """n=2, M=3, c_b=1, C=2, 4x4, k=3, Hn=1, float32: every term counted by hand (see minimal_bytes' docstring)."""
    b = G.minimal_bytes(2, 3, 1, 2, 4, 4, 3, 1, 4)
    bases, params, dec_bias = 3 * 16 * 4, (2 * 9 + 2 + 2 * 2 * 4 + 2 * 2 * 9 + 2) * 4, 2 * 4
    indices, aug, images = 2 * 2 * 8, 2 * 4 * 4 + 2 * 4 * 8, 2 * 2 * 16 * 4
    assert b["forward"] == bases + params + indices + aug + images == 872
    assert b["backward"] == images + bases + (params - dec_bias) + indices + aug + bases + params == 1352
    assert b["total"] == 2224
    # float64 doubles every float term, not the int64 indices
    b64 = G.minimal_bytes(2, 3, 1, 2, 4, 4, 3, 1, 8)
    assert b64["total"] == 2 * 2224 - (2 * indices + 2 * 2 * 4 * 8)  # the int64 bytes, fwd + bwd


def test_gpu_rows_get_bandwidth_and_their_own_table(tmp_path, monkeypatch):
    import argparse
    import json

    parser = argparse.ArgumentParser()
    G.add_arguments(parser)
    args = parser.parse_args(["--batch", "4", "--size", "8", "--bases", "6", "--families", "color,flip",
                              "--warmup", "0", "--repeats", "1", "--backend", "torch"])
    row = G.run_benchmark(args)
    assert "copy_gbps" not in row and "achieved_gbps" not in row["families"]["color"]  # CPU: no bandwidth fields
    monkeypatch.setattr(G, "copy_bandwidth", lambda device: {"copy_bytes": 2, "copy_s": 1.0, "copy_gbps": 2000.0})
    G._add_bandwidth(row, args, 3, "cuda")
    total = G.minimal_bytes(4, 6, 3, 3, 8, 8, 3, 5, 4)["total"]
    assert row["families"]["flip"]["achieved_gbps"] == total / row["families"]["flip"]["fwd_bwd_s"] / 1e9
    assert row["bandwidth_fraction"] == row["mean_achieved_gbps"] / 2000.0
    gpu = dict(row, device="cuda", env=dict(row["env"], gpu="Fake H100"))
    (tmp_path / "cpu.json").write_text(json.dumps(G.run_benchmark(args)) + "\n")
    (tmp_path / "gpu.json").write_text(json.dumps(gpu) + "\n")
    doc = G.report(str(tmp_path / "cpu.json"), str(tmp_path / "gpu.json"))
    assert doc.index("| family | fused fwd+bwd (s) |") < doc.index("# GPU") < doc.index("| GB/s | of copy |")
    assert "Fake H100" in doc and "2000 GB/s" in doc and doc.count("| **mean** |") == 2
