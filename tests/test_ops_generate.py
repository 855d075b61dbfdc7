"""haba_fast.ops.generate on every available backend against the torch reference: values, gradients, errors."""

from __future__ import annotations

import pytest
import torch
from utils import CUDA, assert_close, requires_ext

from haba_fast import _reference, ops

# opcheck without the slow torch.compile-based check (it runs once, on generate, in test_opcheck_cpu_ops)
FAST_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor")
NAMES = ("bases", "enc_weight", "enc_bias", "scale", "shift", "dec_weight", "dec_bias")


def backends():
    """(backend, device) pairs that can run here: the C++ kernels on CPU, Triton on CUDA (interpreter: elsewhere)."""
    out = [pytest.param("cpu", "cpu", marks=requires_ext)]
    if CUDA:
        out.append(("triton", "cuda"))
    return out


def make_inputs(n, M, cb, C, H, W, k, Hn, dtype=torch.float32, device="cpu", seed=0, repeat=True):
    """Random generate() inputs; base/hall indices with repeats (the first two samples share both)."""
    g = torch.Generator().manual_seed(seed)
    Ho, Wo = H - k + 1, W - k + 1

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

    tensors = [t(M, cb, H, W), t(Hn, C, cb, k, k, scale=0.3), t(Hn, C), 1.0 + t(Hn, C, Ho, Wo, scale=0.1),
               t(Hn, C, Ho, Wo, scale=0.1), t(Hn, C, C, k, k, scale=0.3), t(Hn, C)]
    bidx = torch.randint(0, M, (n,), generator=g)
    hidx = torch.randint(0, Hn, (n,), generator=g)
    if repeat and n > 1:
        bidx[1], hidx[1] = bidx[0], hidx[0]
    return tensors, bidx.to(device), hidx.to(device)


def check_against_reference(backend, device, dtype, n, M, cb, C, H, W, k, Hn):
    tensors, bidx, hidx = make_inputs(n, M, cb, C, H, W, k, Hn, dtype=dtype, device=device)
    ref_in = [t.detach().clone().requires_grad_(True) for t in tensors]
    my_in = [t.detach().clone().requires_grad_(True) for t in tensors]
    ref = _reference.generate_reference(*ref_in, bidx, hidx)
    out = ops.generate(*my_in, bidx, hidx, backend=backend)
    assert out.shape == (n, C, H, W) and out.dtype == dtype
    # float32 sums of up to ~k²·C² products of O(1) terms: scale the tolerance with the output's magnitude
    scale = float(ref.detach().abs().max())
    assert_close(out, ref, atol=(1e-5 if dtype == torch.float32 else 1e-10) * max(scale, 1.0))
    gy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype=dtype,
                                                                                                     device=device)
    g_ref = torch.autograd.grad(ref, ref_in, gy)
    g_my = torch.autograd.grad(out, my_in, gy)
    for name, a, b in zip(NAMES, g_my, g_ref):
        mag = max(float(b.abs().max()), 1.0)
        rtol, atol = (2e-4, 2e-5 * mag) if dtype == torch.float32 else (1e-9, 1e-10 * mag)
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("H,W", [(8, 8), (28, 28), (32, 32), (11, 7)])
@pytest.mark.parametrize("cb,C", [(1, 1), (3, 3)])
@pytest.mark.parametrize("k", [3, 5])
def test_generate_matches_reference(backend, device, dtype, H, W, cb, C, k):
    check_against_reference(backend, device, dtype, n=7, M=5, cb=cb, C=C, H=H, W=W, k=k, Hn=3)


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_generate_one_channel_basis_to_three(backend, device, dtype):
    """Single-channel bases (--single_channel) decoded to 3 channels, an odd prime size."""
    check_against_reference(backend, device, dtype, n=7, M=5, cb=1, C=3, H=13, W=17, k=3, Hn=3)


@pytest.mark.parametrize("backend,device", backends())
def test_generate_batch_one(backend, device):
    check_against_reference(backend, device, torch.float32, n=1, M=1, cb=3, C=3, H=13, W=13, k=3, Hn=1)


@requires_ext
def test_generate_batch_500_cpu():
    check_against_reference("cpu", "cpu", torch.float32, n=500, M=100, cb=3, C=3, H=32, W=32, k=3, Hn=5)


@requires_ext
def test_one_hallucinator_for_all_and_repeated_bases():
    """The distillation case: one hallucinator for the whole batch, every basis drawn several times."""
    tensors, _, _ = make_inputs(9, 3, 3, 3, 10, 10, 3, 2, dtype=torch.float64)
    bidx = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 0])
    hidx = torch.ones(9, dtype=torch.int64)
    ref_in = [t.clone().requires_grad_(True) for t in tensors]
    my_in = [t.clone().requires_grad_(True) for t in tensors]
    ref = _reference.generate_reference(*ref_in, bidx, hidx)
    out = ops.generate(*my_in, bidx, hidx, backend="cpu")
    assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(out.square().sum(), my_in), torch.autograd.grad(ref.square().sum(), ref_in)):
        assert_close(a, b)
    # hallucinator 0 is unused: its gradients are exactly zero
    g = torch.autograd.grad(ops.generate(*my_in, bidx, hidx, backend="cpu").sum(), my_in[1:])
    assert all(float(t[0].abs().max()) == 0.0 for t in g)


@requires_ext
def test_gradcheck_cpu_float64():
    tensors, bidx, hidx = make_inputs(4, 2, 1, 2, 5, 6, 3, 2, dtype=torch.float64)
    inputs = [t.requires_grad_(True) for t in tensors]
    assert torch.autograd.gradcheck(lambda *a: ops.generate(*a, bidx, hidx, backend="cpu"), inputs)


@requires_ext
def test_needs_input_grad_subsets():
    """Only the wanted gradients are computed; each subset equals the reference's."""
    tensors, bidx, hidx = make_inputs(5, 4, 3, 3, 9, 9, 3, 2, dtype=torch.float64)
    for wanted in ([0], [1, 3], [6]):
        my_in = [t.clone().requires_grad_(i in wanted) for i, t in enumerate(tensors)]
        ref_in = [t.clone().requires_grad_(i in wanted) for i, t in enumerate(tensors)]
        out = ops.generate(*my_in, bidx, hidx, backend="cpu")
        ref = _reference.generate_reference(*ref_in, bidx, hidx)
        got = torch.autograd.grad(out.sum(), [my_in[i] for i in wanted])
        exp = torch.autograd.grad(ref.sum(), [ref_in[i] for i in wanted])
        for a, b in zip(got, exp):
            assert_close(a, b)


@requires_ext
def test_opcheck_cpu_ops():
    tensors, bidx, hidx = make_inputs(3, 2, 1, 3, 7, 6, 3, 2, dtype=torch.float64)
    ops.generate(*tensors, bidx, hidx, backend="cpu")  # registers fake kernels + autograd
    args = [t.clone().requires_grad_(True) for t in tensors] + [bidx, hidx]
    torch.library.opcheck(torch.ops.haba_fast.generate.default, tuple(args))
    grad = torch.randn(3, 3, 7, 6, dtype=torch.float64)
    bwd_args = (grad, *tensors[:6], bidx, hidx, True, True)
    torch.library.opcheck(torch.ops.haba_fast.generate_backward.default, bwd_args, test_utils=FAST_OPCHECK)
    torch.library.opcheck(torch.ops.haba_fast.generate_backward.default, (*bwd_args[:-2], False, True),
                          test_utils=FAST_OPCHECK)


@requires_ext
def test_auto_backend_uses_cpu_kernels(monkeypatch):
    monkeypatch.delenv("HABA_FAST_BACKEND", raising=False)
    tensors, bidx, hidx = make_inputs(2, 2, 1, 1, 6, 6, 3, 1)
    calls = []
    real = torch.ops.haba_fast.generate

    class Spy:
        def __call__(self, *a):
            calls.append(1)
            return real(*a)

    monkeypatch.setattr(torch.ops.haba_fast, "generate", Spy(), raising=False)
    ops.generate(*tensors, bidx, hidx)
    assert calls, "auto on CPU tensors must run the C++ kernel"


# ---- bad input: a clear error before any kernel runs --------------------------------------------------
@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=requires_ext), "torch"])
def test_bad_inputs(backend):
    tensors, bidx, hidx = make_inputs(3, 2, 1, 3, 8, 8, 3, 2)

    def call(ts=tensors, b=bidx, h=hidx):
        return ops.generate(*ts, b, h, backend=backend)

    with pytest.raises(ValueError, match="base_idx values must lie in"):
        call(b=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="hall_idx values must lie in"):
        call(h=torch.tensor([0, -1, 1]))
    with pytest.raises(TypeError, match="hall_idx must be an integer tensor"):
        call(h=hidx.float())
    with pytest.raises(ValueError, match="differ in length"):
        call(h=hidx[:2])
    bad = list(tensors)
    bad[3] = bad[3][..., :-1]
    with pytest.raises(ValueError, match="scale must have shape"):
        call(ts=bad)
    bad = list(tensors)
    bad[5] = bad[5].double()
    with pytest.raises(TypeError, match="dec_weight has dtype"):
        call(ts=bad)
    bad = list(tensors)
    bad[0] = bad[0][:, :, :2, :2]
    with pytest.raises(ValueError, match="kernel size 3 exceeds"):
        call(ts=bad)
    bad = list(tensors)
    bad[2] = bad[2].to("meta")
    with pytest.raises(ValueError, match="enc_bias is on meta"):
        call(ts=bad)
    with pytest.raises(ValueError, match="bases must be"):
        call(ts=[tensors[0][0]] + list(tensors[1:]))


@requires_ext
def test_cpu_backend_rejects_half():
    tensors, bidx, hidx = make_inputs(2, 2, 1, 1, 6, 6, 3, 1, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="supports float32/float64"):
        ops.generate(*tensors, bidx, hidx, backend="cpu")
    # auto falls back to the reference for other dtypes
    out = ops.generate(*tensors, bidx, hidx, backend="auto")
    assert out.dtype == torch.bfloat16
