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
