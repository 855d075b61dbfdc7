"""The Triton kernels on this CPU under TRITON_INTERPRET=1, against the torch reference (tiny shapes).

The interpreter flag is read when a kernel module is imported (``@triton.jit``) and by the backend gate, so
the checks run in ONE subprocess started with TRITON_INTERPRET=1 (this process may already hold compiled-mode
kernels or a cached ``triton_available``); it prints one JSON dict ``check -> relative error`` (``||out - ref|| /
||ref||``, the worst of the output and every gradient) and the tests below assert on its entries. The interpreter
executes every program in Python: a 3-channel generate costs tens of seconds on the 2-core dev VM, so the default
run uses 1-2 channels (one tiny generate with c_b = C = 2) and the 3-channel case is marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    r"""
    import json, os, sys
    import torch
    sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
    from test_ops_generate import make_inputs
    from haba_fast import _reference, ops
    from haba_fast.augment import FAMILIES, sample

    SLOW = os.environ.get("HABA_TEST_SLOW") == "1"
    res = {}

    def rel(a, b):  # ||a - b|| / ||b||, no floor (gradients are often far below 1); 0 only if both are exactly 0
        a, b = a.detach().double(), b.detach().double()
        if not b.any():
            return 0.0 if not a.any() else float("inf")
        return float((a - b).norm() / b.norm())

    def gen_case(name, dtype, n, M, cb, C, H, W, k, Hn, params=None):
        ts, bidx, hidx = make_inputs(n, M, cb, C, H, W, k, Hn, dtype=dtype)
        a = [t.clone().requires_grad_(True) for t in ts]
        b = [t.clone().requires_grad_(True) for t in ts]
        if params is None:
            out = ops.generate(*a, bidx, hidx, backend="triton")
            ref = _reference.generate_reference(*b, bidx, hidx)
        else:
            out = ops.generate_augment(*a, bidx, hidx, params, backend="triton")
            ref = _reference.augment_reference(_reference.generate_reference(*b, bidx, hidx), params)
        gy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
        errs = [rel(out, ref)]
        errs += [rel(x, y) for x, y in zip(torch.autograd.grad(out, a, gy), torch.autograd.grad(ref, b, gy))]
        res[name] = max(errs)

    gen_case("generate_f64_c1", torch.float64, 3, 2, 1, 1, 6, 6, 3, 2)
    gen_case("generate_f32_k5", torch.float32, 2, 2, 1, 1, 6, 7, 5, 1)
    # 2 basis channels to 2 output channels: a swapped in/out channel index reads the same address at C = c_b = 1
    gen_case("generate_f64_c2", torch.float64, 3, 2, 2, 2, 4, 5, 2, 2)
    if SLOW:
        gen_case("generate_f32_c3", torch.float32, 3, 2, 3, 3, 8, 8, 3, 2)

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float64, torch.float32):
        for fam in FAMILIES if dtype == torch.float64 or SLOW else ("color", "rotate"):
            n, C, H, W = 2, 2, 5, 6
            x = torch.randn(n, C, H, W, generator=g, dtype=torch.float64).to(dtype)
            p = sample(fam, n, (H, W), generator=g)
            xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            out = ops.augment(xa, p, backend="triton")
            ref = _reference.augment_reference(xb, p)
            gy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
            e = max(rel(out, ref), rel(torch.autograd.grad(out, xa, gy)[0], torch.autograd.grad(ref, xb, gy)[0]))
            res[f"augment_{fam}_{str(dtype)[6:]}"] = e

    gen_case("generate_augment_rotate_f64", torch.float64, 2, 2, 1, 1, 6, 6, 3, 2,
             params=sample("rotate", 2, (6, 6), generator=g))

    # the two-stage segmented reduction: one segment far longer than a chunk, plus an empty segment
    from haba_fast.kernels.generate import ROWS_PER_CHUNK, segment_sum
    R = 2 * ROWS_PER_CHUNK + 5
    src = torch.randn(R, 7, generator=g, dtype=torch.float64)
    seg = torch.zeros(R, dtype=torch.int64)
    seg[::9] = 2
    expect = torch.zeros(3, 7, dtype=torch.float64).index_add_(0, seg, src)
    res["segment_sum_two_stage"] = rel(segment_sum(src, seg, 3, "sorted"), expect)
    res["segment_sum_onehot"] = rel(segment_sum(src, seg, 3, "onehot"), expect)
    # many segments, runs crossing the chunk boundaries, a row count that is not a multiple of the chunk
    R2, S2 = 4 * ROWS_PER_CHUNK + 13, 100
    src2 = torch.randn(R2, 9, generator=g, dtype=torch.float64)
    seg2 = torch.randint(0, S2, (R2,), generator=g)
    expect2 = torch.zeros(S2, 9, dtype=torch.float64).index_add_(0, seg2, src2)
    res["segment_sum_chunked_runs"] = rel(segment_sum(src2, seg2, S2, "sorted"), expect2)
    # several column tiles (P > 1024) over both stages; no rows; no segments
    src3 = torch.randn(70, 1500, generator=g, dtype=torch.float64)
    seg3 = torch.randint(0, 3, (70,), generator=g)
    expect3 = torch.zeros(3, 1500, dtype=torch.float64).index_add_(0, seg3, src3)
    empty_rows = segment_sum(torch.zeros(0, 5, dtype=torch.float64), torch.zeros(0, dtype=torch.int64), 4, "sorted")
    no_segments = segment_sum(torch.zeros(0, 5, dtype=torch.float64), torch.zeros(0, dtype=torch.int64), 0, "sorted")
    res["segment_sum_edges"] = max(rel(segment_sum(src3, seg3, 3, "sorted"), expect3),
                                   float(empty_rows.abs().max()) + float(empty_rows.shape != (4, 5)),
                                   float(no_segments.shape != (0, 5)))

    # registration of the triton ops: schema, autograd wiring, fake kernels
    x = torch.randn(2, 1, 4, 5, dtype=torch.float64, requires_grad=True)
    code, fp, ip = ops._encode(sample("crop", 2, (4, 5), generator=g), 2, 4, 5, torch.float64, x.device)
    torch.library.opcheck(torch.ops.haba_fast_triton.augment.default, (x, code, fp, ip),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    res["opcheck_augment"] = 0.0
    print(json.dumps(res))
    """
)


def _run(slow: bool) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", HABA_TEST_SLOW="1" if slow else "0")
    env.pop("HABA_FAST_BACKEND", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results():
    return _run(slow=False)


def _tol(name: str) -> float:
    return 1e-10 if "f64" in name or "float64" in name or name.startswith("segment") else 3e-5


EXPECTED = (["generate_f64_c1", "generate_f32_k5", "generate_f64_c2", "generate_augment_rotate_f64",
             "segment_sum_two_stage", "segment_sum_chunked_runs", "segment_sum_edges", "segment_sum_onehot",
             "opcheck_augment", "augment_color_float32", "augment_rotate_float32"]
            + [f"augment_{f}_float64" for f in ("color", "crop", "cutout", "flip", "scale", "rotate")])


@pytest.mark.parametrize("check", EXPECTED)
def test_triton_interpreter_matches_reference(results, check):
    assert check in results, f"check {check} did not run: {sorted(results)}"
    assert results[check] <= _tol(check), f"{check}: relative error {results[check]:.3g}"


@pytest.mark.slow
def test_triton_interpreter_three_channels_and_float32():
    res = _run(slow=True)
    assert res["generate_f32_c3"] <= 3e-5
    for f in ("color", "crop", "cutout", "flip", "scale", "rotate"):
        assert res[f"augment_{f}_float32"] <= 3e-5
