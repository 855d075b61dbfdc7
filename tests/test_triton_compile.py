"""Triton kernels compiled for an sm_90 target by Triton's own compiler on this CPU (frontend, TTIR, TTGIR, PTX; no
GPU needed): what the interpreter (TRITON_INTERPRET=1) does not check, such as constexpr-only globals, types that
must agree across branches and loops, and scalar branches inside loops. The kernels whose values the interpreter
tests check: the trajectory block kernels (tests/test_trajectory_block_triton.py) and the sorted segment sum
(tests/test_triton_interpret.py).
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="TRITON_INTERPRET=1: the kernels import as interpreted functions"
)


def _compile_for_sm90(fn, dtype: str, constexprs: dict, pointers: dict = None, num_warps: int = 4) -> set:
    """Compile ``fn`` with every ``*_ptr`` argument a ``dtype`` pointer (``pointers`` overrides by name), other
    arguments i32, and ``constexprs`` by name; returns the produced stages."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, values = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            values[(i,)] = constexprs[name]
        elif name.endswith("_ptr"):
            signature[name] = f"*{(pointers or {}).get(name, dtype)}"
        else:
            signature[name] = "i32"
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=values)
    except TypeError as exc:  # another Triton's ASTSource
        pytest.skip(f"this Triton's ASTSource takes other arguments: {exc}")
    return set(triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm)


# Every branch of both block kernels at least once: tangent or not, norm or not, each activation, pooled or not.
BLOCK_VARIANTS = [
    ("fp32", True, True, 0, True),
    ("fp32", False, True, 1, True),
    ("fp32", True, False, 2, False),
    ("fp32", False, False, 0, False),
    ("fp64", True, True, 1, True),
    ("fp64", True, True, 2, False),
]


@pytest.mark.parametrize("dtype,tan,norm,act,pool", BLOCK_VARIANTS)
def test_trajectory_block_kernels_compile_for_a_cuda_target(dtype, tan, norm, act, pool):
    from haba_fast.kernels import trajectory_block as kb

    # a 32 x 32 plane as the launcher runs it (4 warps), and an 8 x 8 one (one warp)
    for block in (1024, 64):
        flags = {"TAN": tan, "NORM": norm, "ACT": act, "POOL": pool, "BLOCK": block}
        for fn in (kb._trajectory_block_fwd_kernel, kb._trajectory_block_bwd_kernel):
            assert "ptx" in _compile_for_sm90(fn, dtype, flags, num_warps=kb._num_warps(block))


@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
def test_segment_sum_kernels_compile_for_a_cuda_target(dtype):
    from haba_fast.kernels import generate

    ints = {"order_ptr": "i64", "starts_ptr": "i64", "seg_sorted_ptr": "i64"}
    chunk = {"CHUNK": generate.ROWS_PER_CHUNK, "BLOCK": 128}
    assert "ptx" in _compile_for_sm90(generate._segment_sum_kernel, dtype, {"BLOCK": 128}, ints)
    assert "ptx" in _compile_for_sm90(generate._segment_runs_kernel, dtype, chunk, ints)
    assert "ptx" in _compile_for_sm90(generate._segment_heads_kernel, dtype, chunk, ints)
