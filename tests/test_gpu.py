"""GPU acceptance suite: every CUDA path against the pure-PyTorch reference (float64 oracle), values and gradients.

Covers the Triton generate / augment / generate_augment ops, the C++ exact trajectory engine on CUDA tensors, one
full ``Distiller`` step, the CLI end to end, and bad input. Every test is marked ``gpu`` and skipped without CUDA.

Outputs are checked so that unwritten elements fail: before each op the CUDA caching allocator is handed a block
filled with NaN (``_poison``), so a ``torch.empty`` output the kernel leaves partly unwritten holds NaN and fails
the comparison (and ``isfinite``).

Kernel compiles dominate on a fresh GPU machine (each distinct (channels, k, dtype, family) is one Triton compile
of a few seconds): the shapes below are few on purpose.

``HABA_GPU_TEST_DEVICE=cpu TRITON_INTERPRET=1 pytest tests/test_gpu.py -k ...`` runs the same test code on the CPU
under the Triton interpreter (small cases only: the interpreter runs each program in Python); it validates the
test logic where no GPU is lent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_adjoint import _convnet, assert_iteration_grads_match_naive, grads, make_problem, naive_unroll, rel_err
from test_ops_generate import NAMES, make_inputs
from utils import CUDA, extension_loaded

from haba_fast import _reference, ops
from haba_fast.augment import FAMILIES, AugParams, sample

DEVICE = os.environ.get("HABA_GPU_TEST_DEVICE", "cuda")
ON_CUDA = DEVICE.startswith("cuda")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(ON_CUDA and not CUDA, reason="needs a CUDA device"),
]
requires_ext_loaded = pytest.mark.skipif(
    os.environ.get("HABA_FAST_BUILD_EXT") == "0", reason="built without the C++ extension"
)


@pytest.fixture(autouse=True)
def _no_tf32():
    """Full float32 on CUDA: TF32 convolutions/matmuls (cuDNN's default) err ~1e-3, above the float32 tolerances."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _poison() -> None:
    """Leave NaN-filled blocks in both pools of the CUDA caching allocator for the next outputs to reuse.

    Sixteen 1 MiB tensors fill 2 MiB segments of the small pool (allocations <= 1 MiB), one 64 MiB tensor the
    large pool; freed, they go back to the cache with their NaN contents.
    """
    if ON_CUDA:
        blocks = [torch.full((1 << 18,), float("nan"), device=DEVICE) for _ in range(16)]
        blocks.append(torch.full((1 << 24,), float("nan"), device=DEVICE))
        del blocks


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(max |b|, 1), in float64 on the CPU (NaN anywhere gives inf)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).abs().max() / max(float(b.abs().max()), 1.0))


# Per-dtype bound on _rel against the float64 reference: float32 sums of up to k²·C² products of O(1) terms.
REL = {torch.float32: 2e-5, torch.float64: 1e-11}


# ---- Triton generate ------------------------------------------------------------------------------------
GEN_CONFIGS = [
    # (n, M, cb, C, H, W, k, Hn); few distinct (cb, C, k) so that compiles stay few
    (7, 5, 1, 1, 8, 8, 3, 3),
    (7, 5, 1, 1, 28, 28, 5, 3),
    (7, 5, 3, 3, 32, 32, 3, 3),
    (7, 5, 3, 3, 32, 32, 5, 3),
    (1, 1, 3, 3, 32, 32, 3, 1),
    (500, 100, 3, 3, 32, 32, 3, 5),
    (500, 4, 1, 1, 28, 28, 5, 2),  # every (basis, hallucinator) pair repeated ~60 times
]


def check_generate(dtype, n, M, cb, C, H, W, k, Hn, seed=0):
    """Triton generate on DEVICE vs the float64 reference: output and the gradient of all 7 inputs."""
    tensors, bidx, hidx = make_inputs(n, M, cb, C, H, W, k, Hn, dtype=dtype, device=DEVICE, seed=seed)
    mine = [t.detach().clone().requires_grad_(True) for t in tensors]
    ref_in = [t.detach().double().clone().requires_grad_(True) for t in tensors]
    _poison()
    out = ops.generate(*mine, bidx, hidx, backend="triton")
    assert out.shape == (n, C, H, W) and out.dtype == dtype and out.device == bidx.device
    ref = _reference.generate_reference(*ref_in, bidx, hidx)
    assert _rel(out, ref) < REL[dtype]
    gy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    _poison()
    g_mine = torch.autograd.grad(out, mine, gy.to(device=DEVICE, dtype=dtype))
    g_ref = torch.autograd.grad(ref, ref_in, gy.to(DEVICE))
    for name, a, b in zip(NAMES, g_mine, g_ref):
        assert a.shape == b.shape and a.dtype == dtype, name
        # gradients of shared tensors sum over up to n samples: allow for that sum's float32 rounding
        bound = REL[dtype] * (10 if dtype == torch.float32 and n > 100 else 1)
        assert _rel(a, b) < bound, f"grad {name}: rel err {_rel(a, b):.3g}"


@pytest.mark.parametrize("cfg", GEN_CONFIGS, ids=lambda c: "n{}-cb{}-C{}-{}x{}-k{}-Hn{}".format(*c[:1], *c[2:]))
def test_triton_generate_float32(cfg):
    check_generate(torch.float32, *cfg)


@pytest.mark.parametrize("cfg", [GEN_CONFIGS[0], GEN_CONFIGS[2]], ids=["1ch-8x8-k3", "3ch-32x32-k3"])
def test_triton_generate_float64(cfg):
    """ops.py: the Triton backend takes float32 and float64."""
    check_generate(torch.float64, *cfg)


def test_triton_refuses_other_dtypes_clearly():
    tensors, bidx, hidx = make_inputs(2, 2, 1, 1, 8, 8, 3, 1, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(TypeError, match="supports float32/float64"):
        ops.generate(*tensors, bidx, hidx, backend="triton")


def test_triton_generate_unused_hallucinator_gets_zero_grad():
    """One hallucinator for the whole batch (the distillation case): the other's gradients are exactly 0."""
    tensors, _, _ = make_inputs(9, 3, 3, 3, 32, 32, 3, 2, device=DEVICE)
    bidx = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 0], device=DEVICE)
    hidx = torch.ones(9, dtype=torch.int64, device=DEVICE)
    leaves = [t.requires_grad_(True) for t in tensors]
    _poison()
    g = torch.autograd.grad(ops.generate(*leaves, bidx, hidx, backend="triton").sum(), leaves[1:])
    assert all(float(t[0].abs().max()) == 0.0 for t in g)
    assert all(float(t[1].abs().max()) > 0.0 for t in g)


# ---- Triton augment and generate_augment -------------------------------------------------------------------
def _params(family: str, n: int, H: int, W: int, seed: int) -> AugParams:
    """Per-sample parameters of one family (sampled on the CPU, then moved: the same values on every device)."""
    return sample(family, n, (H, W), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def check_augment(family, dtype, n=64, C=3, H=32, W=32, seed=3):
    x = torch.randn(n, C, H, W, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    p = _params(family, n, H, W, seed)
    mine = x.to(device=DEVICE, dtype=dtype).requires_grad_(True)
    ref_in = x.to(DEVICE).requires_grad_(True)
    _poison()
    out = ops.augment(mine, p, backend="triton")
    ref = _reference.augment_reference(ref_in, p)
    assert out.shape == x.shape and out.dtype == dtype
    assert _rel(out, ref) < REL[dtype]
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(DEVICE)
    _poison()
    (gx,) = torch.autograd.grad(out, mine, gy.to(dtype))
    (gref,) = torch.autograd.grad(ref, ref_in, gy)
    assert _rel(gx, gref) < REL[dtype], f"grad x: {_rel(gx, gref):.3g}"


@pytest.mark.parametrize("family", FAMILIES)
def test_triton_augment_float32(family):
    check_augment(family, torch.float32)


@pytest.mark.parametrize("family", ["color", "rotate"])
def test_triton_augment_float64(family):
    check_augment(family, torch.float64)


def test_triton_augment_chain_m_mode():
    """A list of AugParams applies in order (the "M" mode composition) on the GPU too."""
    n, H, W = 16, 32, 32
    x = torch.randn(n, 3, H, W, generator=torch.Generator().manual_seed(5), device="cpu").to(DEVICE)
    chain = [_params("crop", n, H, W, 6), _params("flip", n, H, W, 7), _params("color", n, H, W, 8)]
    xg = x.clone().requires_grad_(True)
    out = ops.augment(xg, chain, backend="triton")
    x64 = x.double().requires_grad_(True)
    ref = _reference.augment_reference(x64, chain)
    assert _rel(out, ref) < REL[torch.float32]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), device="cpu").to(DEVICE)
    (grad,) = torch.autograd.grad(out, xg, g)
    (grad_ref,) = torch.autograd.grad(ref, x64, g.double())
    assert _rel(grad, grad_ref) < REL[torch.float32]


# (n, M, cb, C, H, W, k, Hn): CIFAR-like on CUDA; tiny under the interpreter (a 3-channel 32x32 batch takes minutes)
FUSED_CFG = (64, 10, 3, 3, 32, 32, 3, 4) if ON_CUDA else (4, 3, 1, 2, 8, 8, 3, 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_triton_generate_augment_fused_equals_generate_then_augment(family):
    n, M, cb, C, H, W, k, Hn = FUSED_CFG
    tensors, bidx, hidx = make_inputs(n, M, cb, C, H, W, k, Hn, device=DEVICE, seed=4)
    p = _params(family, n, H, W, 9)
    fused_in = [t.clone().requires_grad_(True) for t in tensors]
    two_in = [t.clone().requires_grad_(True) for t in tensors]
    ref_in = [t.double().requires_grad_(True) for t in tensors]
    _poison()
    fused = ops.generate_augment(*fused_in, bidx, hidx, p, backend="triton")
    two = ops.augment(ops.generate(*two_in, bidx, hidx, backend="triton"), p, backend="triton")
    ref = _reference.augment_reference(_reference.generate_reference(*ref_in, bidx, hidx), p)
    assert _rel(fused, two) < 1e-6  # same kernels, same order of sums
    assert _rel(fused, ref) < REL[torch.float32]
    gy = torch.randn(fused.shape, generator=torch.Generator().manual_seed(10), dtype=torch.float64).to(DEVICE)
    _poison()
    g_fused = torch.autograd.grad(fused, fused_in, gy.float())
    g_two = torch.autograd.grad(two, two_in, gy.float())
    g_ref = torch.autograd.grad(ref, ref_in, gy)
    for name, a, b, c in zip(NAMES, g_fused, g_two, g_ref):
        assert _rel(a, b) < 1e-6, f"grad {name}: fused vs two-pass {_rel(a, b):.3g}"
        assert _rel(a, c) < REL[torch.float32], f"grad {name}: fused vs reference {_rel(a, c):.3g}"


# ---- the C++ exact trajectory engine on CUDA tensors ------------------------------------------------------------
ENGINE_CONFIGS = [
    # (channel, width, depth, norm, act, pool, im, steps, batch)
    (3, 8, 1, "instancenorm", "relu", "avgpooling", 8, 2, 3),
    (1, 8, 2, "groupnorm", "relu", "avgpooling", 8, 3, 5),
    (3, 8, 3, "layernorm", "sigmoid", "maxpooling", 16, 2, 3),
    (1, 8, 2, "none", "leakyrelu", "none", 7, 4, 3),
]


def _engine_problem(cfg, dtype):
    """(model on DEVICE, X, Y, w_start, w_target on DEVICE) of one config."""
    c, width, depth, norm, act, pool, im, steps, batch = cfg
    model = _convnet(channel=c, width=width, depth=depth, norm=norm, act=act, pool=pool, im=im, dtype=dtype)
    X, Y, ws, wt = make_problem(model, steps, batch, model.im_size, dtype)
    return model.to(DEVICE), X.to(DEVICE), Y.to(DEVICE), ws.to(DEVICE), wt.to(DEVICE)


def _cpp_engine(name="exact"):
    from haba_fast._ext import has_op
    from haba_fast.engines import get_adjoint_engine

    if not (extension_loaded() and has_op("trajectory_match")):
        pytest.skip("C++ extension without trajectory_match")
    return get_adjoint_engine(name, backend="cpu")


@requires_ext_loaded
@pytest.mark.parametrize("cfg", ENGINE_CONFIGS, ids=lambda c: f"c{c[0]}-d{c[2]}-{c[3]}")
def test_cpp_engine_cuda_matches_naive_and_cpu_float64(cfg):
    eng = _cpp_engine()
    model, X, Y, ws, wt = _engine_problem(cfg, torch.float64)
    ref = grads(naive_unroll, model, X, Y, ws, wt, lr_value=0.1)
    out = grads(eng, model, X, Y, ws, wt, lr_value=0.1)
    assert eng.last_backend == "cpu"
    assert out[1].device == X.device
    assert rel_err(out[0], ref[0]) < 1e-12
    assert rel_err(out[1], ref[1]) < 1e-9 and rel_err(out[2], ref[2]) < 1e-9
    cpu = grads(eng, model.cpu(), X.cpu(), Y.cpu(), ws.cpu(), wt.cpu(), lr_value=0.1)
    for a, b in zip(out, cpu):
        assert rel_err(a.cpu(), b) < 1e-9


@requires_ext_loaded
@pytest.mark.parametrize("cfg", ENGINE_CONFIGS[:3], ids=lambda c: f"c{c[0]}-d{c[2]}-{c[3]}")
def test_cpp_engine_cuda_float32_matches_naive_float64(cfg):
    eng = _cpp_engine()
    model64, X, Y, ws, wt = _engine_problem(cfg, torch.float64)
    ref = grads(naive_unroll, model64, X, Y, ws, wt, lr_value=0.1)
    model32 = _engine_problem(cfg, torch.float32)[0]
    out = grads(eng, model32, X.float(), Y, ws.float(), wt.float(), lr_value=0.1)
    assert out[1].dtype == torch.float32 and eng.last_backend == "cpu"
    for got, want in zip(out, ref):  # loss, dL/dX, dL/dlr
        assert rel_err(got.double(), want) < 1e-4


@requires_ext_loaded
def test_cpp_first_order_runs_on_cuda():
    from haba_fast.engines import get_adjoint_engine

    eng = _cpp_engine("first-order")
    model, X, Y, ws, wt = _engine_problem(ENGINE_CONFIGS[1], torch.float64)
    out = grads(eng, model, X, Y, ws, wt, lr_value=0.2)
    py = grads(get_adjoint_engine("first-order", backend="torch"), model, X, Y, ws, wt, lr_value=0.2)
    exact = grads(_cpp_engine(), model, X, Y, ws, wt, lr_value=0.2)
    assert eng.last_backend == "cpu" and out[1].device == X.device
    assert rel_err(out[1], py[1]) < 1e-9 and rel_err(out[2], py[2]) < 1e-9
    assert rel_err(out[1], exact[1]) > 1e-3  # an approximation: it must differ from the exact gradient


@requires_ext_loaded
@pytest.mark.parametrize("cfg", ENGINE_CONFIGS[1:3], ids=lambda c: f"c{c[0]}-d{c[2]}-{c[3]}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpp_engine_cuda_budgets_match_budget_zero_and_naive(cfg, dtype):
    """The kept-step ops (budget holding 1 step, unlimited), ``min`` (sqrt(N) weight checkpoints) and the offloaded
    weight trajectory (pinned host memory) on CUDA tensors: budget 0's gradients and the naive unroll's (float64
    oracle)."""
    from haba_fast.engines import get_adjoint_engine

    _cpp_engine()  # skips without the op
    model64, X64, Y, ws64, wt64 = _engine_problem(cfg, torch.float64)
    ref = grads(naive_unroll, model64, X64, Y, ws64, wt64, lr_value=0.1)
    model = _engine_problem(cfg, dtype)[0]
    X, ws, wt = X64.to(dtype), ws64.to(dtype), wt64.to(dtype)
    base_eng = get_adjoint_engine("exact", "cpu", 0)
    base = grads(base_eng, model, X, Y, ws, wt, lr_value=0.1)
    N = X.shape[0]
    unl = get_adjoint_engine("exact", "cpu", "unlimited")
    out_unl = grads(unl, model, X, Y, ws, wt, lr_value=0.1)
    per_step = unl.last_stats["per_step_bytes"]
    assert unl.last_backend == "cpu" and unl.last_stats["stored_steps"] == N and per_step > 0
    one = get_adjoint_engine("exact", "cpu", per_step * 2 + per_step // 2)  # one step kept
    out_one = grads(one, model, X, Y, ws, wt, lr_value=0.1)
    assert one.last_stats["stored_steps"] == 1 and one.last_stats["recomputed_steps"] == N - 1
    mini = get_adjoint_engine("exact", "cpu", "min")
    out_min = grads(mini, model, X, Y, ws, wt, lr_value=0.1)
    assert mini.last_stats["stored_steps"] == 0 and mini.last_stats["recomputed_weights"] > 0  # w_t recomputed
    off = get_adjoint_engine("exact", "cpu", 0, offload_weights=True)  # w_t in pinned host memory
    out_off = grads(off, model, X, Y, ws, wt, lr_value=0.1)
    assert off.last_stats["stored_weights"] == 2 and off.last_stats["offloaded_weights"] == N
    chosen = get_adjoint_engine("exact", None, "unlimited")  # backend auto: the C++ op on CUDA too, keeping steps
    out_chosen = grads(chosen, model, X, Y, ws, wt, lr_value=0.1)
    assert chosen.last_backend == "cpu" and chosen.last_stats["stored_steps"] == N
    rel_same, rel_ref = (1e-12, 1e-9) if dtype == torch.float64 else (1e-5, 1e-4)
    for out in (out_unl, out_one, out_min, out_off, out_chosen):
        assert out[1].device == X.device
        for a, b, r in zip(out, base, ref):
            assert rel_err(a, b) < rel_same
            assert rel_err(a.double(), r) < rel_ref


TRITON_BLOCK_CONFIGS = [
    # (channel, width, depth, norm, act, pool, im, steps, batch): every case the Triton block kernels take
    (3, 8, 3, "instancenorm", "relu", "avgpooling", 16, 3, 4),
    (1, 8, 3, "instancenorm", "sigmoid", "avgpooling", 28, 2, 3),  # 28 -> 14 -> 7: an odd plane in the last block
    (1, 8, 2, "none", "leakyrelu", "none", 7, 2, 3),
]


@requires_ext_loaded
@pytest.mark.parametrize("cfg", TRITON_BLOCK_CONFIGS, ids=lambda c: f"{c[3]}-{c[4]}-{c[6]}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpp_engine_block_kernels_match_its_aten_path_and_naive(cfg, dtype, monkeypatch):
    """``HABA_FAST_TRAJECTORY_FUSED=triton``: the C++ op's blocks in the Triton kernels (kernels/trajectory_block.py),
    at budget 0 and with every step kept, against the same op's ATen-only path (``=0``) and the naive unroll
    (float64 oracle); the kernels must have run."""
    from haba_fast.kernels import trajectory_block

    from haba_fast.engines import get_adjoint_engine

    _cpp_engine()  # skips without the op
    model64, X64, Y, ws64, wt64 = _engine_problem(cfg, torch.float64)
    ref = grads(naive_unroll, model64, X64, Y, ws64, wt64, lr_value=0.1)
    model = _engine_problem(cfg, dtype)[0]
    X, ws, wt = X64.to(dtype), ws64.to(dtype), wt64.to(dtype)
    monkeypatch.setenv("HABA_FAST_TRAJECTORY_FUSED", "0")
    aten = grads(get_adjoint_engine("exact", "cpu", 0), model, X, Y, ws, wt, lr_value=0.1)
    calls = []
    real = trajectory_block.trajectory_block_forward
    monkeypatch.setattr(trajectory_block, "trajectory_block_forward", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("HABA_FAST_TRAJECTORY_FUSED", "triton")
    rel_same, rel_ref = (1e-12, 1e-9) if dtype == torch.float64 else (1e-5, 1e-4)
    for budget in (0, "unlimited"):
        _poison()
        out = grads(get_adjoint_engine("exact", "cpu", budget), model, X, Y, ws, wt, lr_value=0.1)
        for a, b, r in zip(out, aten, ref):
            assert a.device == X.device and bool(torch.isfinite(a).all())
            assert rel_err(a, b) < rel_same
            assert rel_err(a.double(), r) < rel_ref
    assert len(calls) >= 2 * cfg[2]  # a block's forward in each sweep, every block


def _graphed_vs_eager(cfg, dtype, budgets, calls=3, name="exact", offload=False):
    """Three calls (eager, captured, replayed) of a ``cuda_graphs`` engine per budget, each on new values, against the
    eager engine (same dtype) and, exact, the naive unroll (float64 oracle)."""
    from haba_fast.engines import get_adjoint_engine

    _cpp_engine()  # skips without the op
    rel_same, rel_ref = (1e-12, 1e-9) if dtype == torch.float64 else (1e-5, 1e-4)
    for budget in budgets:
        graphed = get_adjoint_engine(name, None, budget, offload_weights=offload, cuda_graphs=True)
        eager = get_adjoint_engine(name, "cpu", budget, offload_weights=offload)
        for seed in range(calls):
            c, width, depth, norm, act, pool, im, steps, batch = cfg
            model64 = _convnet(channel=c, width=width, depth=depth, norm=norm, act=act, pool=pool, im=im)
            X64, Y, ws64, wt64 = (
                t.to(DEVICE) for t in make_problem(model64, steps, batch, model64.im_size, torch.float64, seed=seed)
            )
            model64 = model64.to(DEVICE)
            ref = grads(naive_unroll, model64, X64, Y, ws64, wt64, lr_value=0.1)
            model = _engine_problem(cfg, dtype)[0]
            X, ws, wt = X64.to(dtype), ws64.to(dtype), wt64.to(dtype)
            want = grads(eager, model, X, Y, ws, wt, lr_value=0.1)
            _poison()
            got = grads(graphed, model, X, Y, ws, wt, lr_value=0.1)
            for a, b, r in zip(got, want, ref):
                assert a.device == X.device and bool(torch.isfinite(a).all())
                assert rel_err(a, b) < rel_same, (budget, seed, rel_err(a, b))
                if name == "exact":
                    assert rel_err(a.double(), r) < rel_ref, (budget, seed, rel_err(a.double(), r))
        # The op kinds that ran from graphs (see test_cuda_graphs.py): each seen once eagerly, captured at its
        # second call, replayed from then on.
        graphs = graphed.step_graphs
        captured = {key[0] for key, graph in graphs._graphs.items() if graph is not None}
        kept = {"trajectory_step_grad_keep", "trajectory_step_adjoint_kept"}
        assert graphed.last_backend == "cpu" and graphs.captures == len(captured) >= 2
        assert captured == (kept if budget == "unlimited" else {"trajectory_step_grad", "trajectory_step_adjoint"})
        per_call = 2 * cfg[7] + graphed.last_stats.get("recomputed_weights", 0)  # min: grad again per recomputed w_t
        assert graphs.replays == calls * per_call - len(captured)
        if budget == "unlimited":
            assert graphed.last_stats["stored_steps"] == cfg[7]


@requires_ext_loaded
@pytest.mark.skipif(not ON_CUDA, reason="captures CUDA graphs")
@pytest.mark.parametrize("cfg", ENGINE_CONFIGS[1:3], ids=lambda c: f"c{c[0]}-d{c[2]}-{c[3]}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_graphs_replay_the_engines_steps(cfg, dtype):
    """``cuda_graphs=True``: the C++ op's step halves captured once and replayed (budget 0: grad and adjoint; every
    step kept: grad_keep and adjoint_kept; min: grad again for the recomputed w_t), calls on new values each."""
    _graphed_vs_eager(cfg, dtype, (0, "unlimited", "min"))


@requires_ext_loaded
@pytest.mark.skipif(not ON_CUDA, reason="captures CUDA graphs")
def test_cuda_graphs_replay_first_order_and_offloaded_steps():
    """First-order (its adjoint's h_w is a zero-size output) and the weight trajectory in pinned host memory."""
    _graphed_vs_eager(ENGINE_CONFIGS[1], torch.float64, (0, "unlimited"), name="first-order")
    _graphed_vs_eager(ENGINE_CONFIGS[1], torch.float64, (0, "unlimited"), offload=True)


@requires_ext_loaded
@pytest.mark.skipif(not ON_CUDA, reason="captures CUDA graphs")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_graphs_replay_the_block_kernels(dtype, monkeypatch):
    """The graphs capture the Triton block kernels' launches too (``HABA_FAST_TRAJECTORY_FUSED=triton``)."""
    monkeypatch.setenv("HABA_FAST_TRAJECTORY_FUSED", "triton")
    _graphed_vs_eager(TRITON_BLOCK_CONFIGS[0], dtype, (0, "unlimited"))


@requires_ext_loaded
@pytest.mark.skipif(not ON_CUDA, reason="captures CUDA graphs")
def test_cuda_graphs_replay_a_distiller_step():
    """HaBa iterations (streamed batches: generate + augment per step, eager) with graphed steps: the matching loss
    and the gradients of lr, the bases and every hallucinator parameter equal the eager engine's, on three
    iterations' trajectories and plans."""
    from haba_fast.engines import get_adjoint_engine
    from haba_fast.objectives.mtt import trajectory_loss

    d = _distiller("exact")
    syn = d.synthetic
    params = [d.syn_lr, syn.bases] + list(syn.hallucinator_parameters())
    for budget in (0, "unlimited"):
        graphed = get_adjoint_engine("exact", None, budget, cuda_graphs=True)
        eager = get_adjoint_engine("exact", "cpu", budget)
        for _ in range(3):
            _, _, w_start, w_target = d.sample_trajectory()
            plan = d.sample_plan()
            results = []
            for engine in (eager, graphed):
                loss = trajectory_loss(engine, d.student, syn, plan, w_start, w_target, d.syn_lr)
                results.append((loss.detach(), torch.autograd.grad(loss, params)))
            (l_ref, g_ref), (l_out, g_out) = results
            assert rel_err(l_out, l_ref) < 1e-5
            for a, b in zip(g_out, g_ref):
                assert rel_err(a, b) < 1e-5
        assert graphed.step_graphs.replays > 0


def test_offloaded_rows_come_back_on_the_device():
    """CUDA tensors offload to pinned host memory (CPU tensors, HABA_GPU_TEST_DEVICE=cpu, to a file); the bytes come
    back as written, on the tensor's device."""
    from haba_fast.engines.offload import OffloadedRows

    store = OffloadedRows(3, 11, torch.float32, torch.device(DEVICE))
    if ON_CUDA:
        assert store.where == "pinned host memory" and store.host.is_pinned()
    v = torch.randn(11, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    store.write(1, v)
    got = store.read(1)
    assert got.device == v.device and torch.equal(got, v)


# ---- one full distillation iteration on CUDA ------------------------------------------------------------------
def _distiller(engine: str):
    import argparse

    from haba_fast.benchmarks import iteration

    parser = argparse.ArgumentParser()
    iteration.add_arguments(parser)
    args = parser.parse_args(
        ["--engine", engine, "--ipc", "2", "--n-hallucinators", "3", "--syn-steps", "3", "--batch-syn", "5",
         "--width", "32", "--device", DEVICE]
    )
    return iteration.build_distiller(args)


@requires_ext_loaded
def test_distiller_step_exact_gradients_match_naive():
    """Bases, every hallucinator parameter and lr: exact (C++ on CUDA) vs the naive unroll, one HaBa iteration."""
    d = _distiller("exact")
    syn = d.synthetic
    assert syn.bases.device.type == torch.device(DEVICE).type
    assert_iteration_grads_match_naive(d, "exact")
    # and the whole step (matching loss + club term + optimizer + adversary) runs and moves the bases
    before = syn.bases.detach().clone()
    m = d.step()
    assert all(torch.isfinite(torch.tensor(float(m[k]))) for k in ("loss", "club", "grand", "syn_lr"))
    assert float((syn.bases.detach() - before).abs().max()) > 0


# ---- the CLI end to end ----------------------------------------------------------------------------------------
def _syncs_of_streamed_unroll(n_steps: int, bases_per_class: int = 2, batch: int = 4) -> int:
    """Device syncs (``torch.cuda.set_sync_debug_mode("warn")``) of one streamed exact unroll, forward + backward,
    on a HaBa set (4 classes) and a step plan of ``n_steps`` steps of ``batch`` rows (budget 0: every batch built
    twice)."""
    import warnings

    from haba_fast.engines import get_adjoint_engine
    from haba_fast.factorization import HaBa
    from haba_fast.models import flatten_params
    from haba_fast.objectives.mtt import trajectory_loss
    from haba_fast.plan import IndexStream, sample_plan

    g = torch.Generator().manual_seed(3)
    syn = HaBa(4, bases_per_class, 3, (9, 9), n_hallucinators=3, generator=g).to(DEVICE)
    # on the host, as the Distiller draws it
    plan = sample_plan(IndexStream(4 * bases_per_class, batch), n_steps, 3, (9, 9), generator=g)
    model = _convnet(channel=3, k=4, im=9, dtype=torch.float32).to(DEVICE)
    ws = flatten_params(model).float()
    wt = ws + 0.1 * torch.randn(ws.shape, generator=g).to(DEVICE)
    lr = torch.tensor(0.05, device=DEVICE, requires_grad=True)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trajectory_loss(get_adjoint_engine("exact", None, 0), model, syn, plan, ws, wt, lr).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@requires_ext_loaded
@pytest.mark.skipif(not ON_CUDA, reason="counts CUDA syncs")
@pytest.mark.parametrize("bases_per_class,batch", [(2, 4), (20, 80)], ids=["onehot-sum", "sorted-sum"])
def test_streamed_steps_do_not_sync_with_the_device(bases_per_class, batch):
    """A streamed step builds its batch from a plan checked once per iteration and moved to the GPU once
    (mtt.check_plan, StepPlan.to), under ops.values_checked() (generate's index bounds and augment's finiteness are
    not read back), and the C++ op's steps skip their value checks: the per-iteration checks stay, a step adds no
    sync. 8 bases take the generate backward's one-hot sum over bases; 80 bases in batches of 80 rows its sorted
    two-stage sum (kernels/generate.py, segment_sum), whose grids no longer depend on the data."""
    _syncs_of_streamed_unroll(2, bases_per_class, batch)  # warm-up: Triton compiles, cuDNN picks its algorithms
    few = _syncs_of_streamed_unroll(2, bases_per_class, batch)
    many = _syncs_of_streamed_unroll(6, bases_per_class, batch)
    print(f"device syncs: {few} at 2 steps, {many} at 6 steps: {(many - few) / 4:.1f} per step")
    assert many == few, (few, many)


@requires_ext_loaded
@pytest.mark.skipif(not ON_CUDA, reason="a bad plan on CUDA")
def test_a_bad_step_plan_is_a_clear_error_before_any_kernel_runs():
    """The streamed steps no longer check indices on the device, so check_plan must refuse an out-of-range row
    before the Triton generate kernel reads it: a ValueError, and the CUDA context still works afterwards."""
    import dataclasses

    from haba_fast.engines import get_adjoint_engine
    from haba_fast.factorization import HaBa
    from haba_fast.models import flatten_params
    from haba_fast.objectives.mtt import trajectory_loss
    from haba_fast.plan import IndexStream, sample_plan

    g = torch.Generator().manual_seed(3)
    syn = HaBa(4, 2, 3, (9, 9), n_hallucinators=3, generator=g).to(DEVICE)
    plan = sample_plan(IndexStream(8, 4), 2, 3, (9, 9), generator=g)
    model = _convnet(channel=3, k=4, im=9, dtype=torch.float32).to(DEVICE)
    ws = flatten_params(model).float()
    wt = ws + 0.1 * torch.randn(ws.shape, generator=g).to(DEVICE)
    lr = torch.tensor(0.05, device=DEVICE, requires_grad=True)
    bad = dataclasses.replace(plan, base_idx=plan.base_idx + 1000)
    with pytest.raises(ValueError, match="step plan: base_idx values must lie in"):
        trajectory_loss(get_adjoint_engine("exact", None, 0), model, syn, bad, ws, wt, lr)
    trajectory_loss(get_adjoint_engine("exact", None, 0), model, syn, plan, ws, wt, lr).backward()
    torch.cuda.synchronize()
    assert torch.isfinite(lr.grad)


def _cli(*argv, timeout=240):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "haba_fast.cli", *argv], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_cli_info_reports_triton_on_cuda():
    r = _cli("info", "--json", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout)
    if not ON_CUDA:
        pytest.skip("CUDA-only check (the command itself ran)")
    assert info["devices"]["cuda"]["available"]
    for op in ("generate", "augment", "generate_augment"):
        assert info["backends"][op]["cuda"]["backend"] == "triton", info["backends"][op]


def test_cli_distill_demo_on_cuda(tmp_path):
    """`haba-fast distill` (the digits demo) at tiny sizes on DEVICE writes its synthetic sets and results."""
    out = tmp_path / "demo"
    r = _cli("distill", "--out", str(out), "--device", DEVICE, "--Iteration", "2", "--syn-steps", "3",
             "--num-eval", "1", "--epoch-eval-train", "2", "--expert-epochs", "1", "--no-progress")
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["device"] == DEVICE and len(res["rows"]) == 3
    assert (out / "haba" / "synthetic.pt").exists() and (out / "pixels" / "synthetic.pt").exists()
    from haba_fast.factorization import load_synthetic

    syn = load_synthetic(str(out / "haba" / "synthetic.pt"))
    assert torch.isfinite(syn.bases).all()


# ---- bad input on CUDA: clear errors, no crash, no hang -----------------------------------------------------
def test_device_mix_and_bad_indices_give_clear_errors():
    if not ON_CUDA:
        pytest.skip("needs two devices")
    tensors, bidx, hidx = make_inputs(3, 2, 1, 3, 8, 8, 3, 2, device=DEVICE)
    with pytest.raises(ValueError, match="base_idx is on cpu"):
        ops.generate(*tensors, bidx.cpu(), hidx, backend="triton")
    mixed = list(tensors)
    mixed[3] = mixed[3].cpu()
    with pytest.raises(ValueError, match="scale is on cpu"):
        ops.generate(*mixed, bidx, hidx, backend="triton")
    with pytest.raises(ValueError, match="base_idx values must lie in"):
        ops.generate(*tensors, torch.tensor([0, 1, 2], device=DEVICE), hidx, backend="triton")
    with pytest.raises(ValueError, match="hall_idx values must lie in"):
        ops.generate(*tensors, bidx, torch.tensor([0, -1, 1], device=DEVICE), backend="triton")
    p = sample("crop", 3, (8, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="batch of 3"):
        ops.augment(torch.zeros(4, 3, 8, 8, device=DEVICE), p, backend="triton")
    # the CUDA context is still healthy after the errors
    assert float(ops.generate(*tensors, bidx, hidx, backend="triton").abs().sum()) > 0
    torch.cuda.synchronize()


@requires_ext_loaded
def test_cpp_engine_device_mix_is_a_clear_error():
    if not ON_CUDA:
        pytest.skip("needs two devices")
    eng = _cpp_engine()
    model, X, Y, ws, wt = _engine_problem(ENGINE_CONFIGS[0], torch.float64)
    lr = torch.tensor(0.1, dtype=torch.float64, device=DEVICE)
    spec = __import__("haba_fast.engines.adjoint", fromlist=["cpp_spec"]).cpp_spec(model)
    op = torch.ops.haba_fast.trajectory_match
    for args in ((X, Y, ws.cpu(), wt, lr, spec, False), (X, Y.cpu(), ws, wt, lr, spec, False),
                 (X.cpu(), Y, ws, wt, lr, spec, False)):
        with pytest.raises(RuntimeError, match="all inputs must be on one device"):
            op(*args)
    with pytest.raises(ValueError, match="but X is on"):
        eng(model, X, Y, ws.cpu(), wt, lr)
    with pytest.raises((RuntimeError, ValueError), match="labels"):
        op(X, Y + 100, ws, wt, lr, spec, False)
    assert torch.isfinite(op(X, Y, ws, wt, lr, spec, False))  # still healthy
    torch.cuda.synchronize()


@pytest.mark.skipif(not ON_CUDA, reason="inductor's Triton code needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_step_on_cuda_matches_naive(dtype):
    """compile_step on CUDA tensors (inductor's Triton kernels): the naive unroll's loss, dL/dX and dL/dlr (float64
    oracle). Last in the file: each dtype is a compile."""
    from haba_fast.engines import get_adjoint_engine

    model64, X64, Y, ws64, wt64 = _engine_problem(ENGINE_CONFIGS[1], torch.float64)
    ref = grads(naive_unroll, model64, X64, Y, ws64, wt64, lr_value=0.1)
    model = _engine_problem(ENGINE_CONFIGS[1], dtype)[0]
    eng = get_adjoint_engine("exact", None, 0, compile_step=True)
    out = grads(eng, model, X64.to(dtype), Y, ws64.to(dtype), wt64.to(dtype), lr_value=0.1)
    assert eng.last_backend == "torch" and out[1].device == X64.device
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for a, r in zip(out, ref):
        assert rel_err(a.double(), r) < tol
