"""haba_fast.ops.augment / generate_augment on every available backend against the torch reference."""

from __future__ import annotations

import pytest
import torch
from test_ops_generate import FAST_OPCHECK, NAMES, backends, make_inputs
from utils import assert_close, requires_ext

from haba_fast import _reference, ops
from haba_fast.augment import FAMILIES, AugParams, sample


def draw(family, n, H, W, seed=0):
    return sample(family, n, (H, W), generator=torch.Generator().manual_seed(seed))


def images(n, C, H, W, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, H, W, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def check_augment(backend, device, x, params):
    xr = x.detach().clone().requires_grad_(True)
    xm = x.detach().clone().requires_grad_(True)
    ref = _reference.augment_reference(xr, params)
    out = ops.augment(xm, params, backend=backend)
    assert out.shape == x.shape and out.dtype == x.dtype
    # color sums over C·H·W values: scale the absolute tolerance with the magnitude of the images
    mag = max(float(ref.detach().abs().max()), 1.0)
    assert_close(out, ref, atol=(2e-5 if x.dtype == torch.float32 else 1e-10) * mag)
    gy = images(*x.shape, dtype=x.dtype, device=device, seed=3)
    (g_ref,) = torch.autograd.grad(ref, xr, gy)
    (g_my,) = torch.autograd.grad(out, xm, gy)
    assert_close(g_my, g_ref)


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,C,H,W", [(7, 1, 8, 8), (7, 3, 28, 28), (7, 3, 32, 32), (7, 3, 13, 7), (1, 3, 11, 11)])
def test_augment_matches_reference(backend, device, family, dtype, n, C, H, W):
    params = draw(family, n, H, W, seed=n + H).to(device)
    check_augment(backend, device, images(n, C, H, W, dtype, device), params)


@pytest.mark.parametrize("backend,device", backends())
def test_augment_edge_parameters(backend, device):
    """Shifts past the border, holes at the corners, flips of all and none, identity affine maps."""
    n, C, H, W = 4, 2, 9, 10
    x = images(n, C, H, W, torch.float64, device)
    cases = [
        AugParams.crop(torch.tensor([-9, 9, 0, 3]), torch.tensor([10, -10, 0, -2])),
        AugParams.cutout(torch.tensor([0, 9, 4, 8]), torch.tensor([0, 10, 5, 0])),
        AugParams.cutout(torch.tensor([0, 9, 4, 8]), torch.tensor([0, 10, 5, 0]), ratio=0.0),
        AugParams.flip(torch.tensor([0.0, 0.49, 0.5, 0.99])),
        AugParams.scale(torch.tensor([1.0, 0.5, 2.0, 1.2]), torch.tensor([1.0, 2.0, 0.5, 1 / 1.2])),
        AugParams.rotate(torch.tensor([0.0, 3.14159, -1.0, 0.26])),
        AugParams.color(torch.tensor([0.0, 1.0, 0.5, 0.3]), torch.tensor([0.0, 1.0, 0.5, 0.7]),
                        torch.tensor([0.0, 1.0, 0.5, 0.1])),
        AugParams.identity(n),
    ]
    for p in cases:
        check_augment(backend, device, x, p.to(device))


@pytest.mark.parametrize("backend,device", backends())
def test_augment_chain_m_mode(backend, device):
    n, C, H, W = 5, 3, 12, 12
    chain = sample("color_crop_cutout_flip_scale_rotate", n, (H, W), generator=torch.Generator().manual_seed(4),
                   mode="M")
    check_augment(backend, device, images(n, C, H, W, torch.float64, device), [p.to(device) for p in chain])


@requires_ext
def test_augment_batch_500_cpu():
    x = images(500, 3, 32, 32, torch.float32)
    for fam in FAMILIES:
        check_augment("cpu", "cpu", x, draw(fam, 500, 32, 32, seed=7))


@requires_ext
@pytest.mark.parametrize("family", FAMILIES)
def test_gradcheck_augment_cpu(family):
    x = images(2, 1, 4, 5, torch.float64).requires_grad_(True)
    p = draw(family, 2, 4, 5, seed=2)
    # the maps are linear in x: fast mode (random projections) checks the adjoint just as well, at a fraction
    assert torch.autograd.gradcheck(lambda t: ops.augment(t, p, backend="cpu"), (x,), fast_mode=True)


@requires_ext
def test_baseline_isa_matches_avx2(monkeypatch):
    """The C++ kernels exist twice (baseline ISA and AVX2+FMA, picked at run time): both agree."""
    tensors, bidx, hidx = make_inputs(6, 4, 3, 3, 16, 15, 3, 2, dtype=torch.float64)
    p = draw("rotate", 6, 16, 15)
    outs = []
    for isa in ("native", "baseline"):
        monkeypatch.setenv("HABA_FAST_CPU_ISA", isa)
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        out = ops.generate_augment(*leaves, bidx, hidx, p, backend="cpu")
        outs.append([out] + list(torch.autograd.grad(out.square().sum(), leaves)))
    for a, b in zip(*outs):
        assert_close(a, b)


# ---- fused generate_augment ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("family", FAMILIES + ("identity",))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_generate_augment_matches_reference(backend, device, family, dtype):
    n, M, cb, C, H, W, k, Hn = 7, 4, 3, 3, 11, 12, 3, 3
    tensors, bidx, hidx = make_inputs(n, M, cb, C, H, W, k, Hn, dtype=dtype, device=device)
    p = AugParams.identity(n) if family == "identity" else draw(family, n, H, W, seed=5).to(device)
    ref_in = [t.detach().clone().requires_grad_(True) for t in tensors]
    my_in = [t.detach().clone().requires_grad_(True) for t in tensors]
    ref = _reference.augment_reference(_reference.generate_reference(*ref_in, bidx, hidx), p)
    out = ops.generate_augment(*my_in, bidx, hidx, p, backend=backend)
    mag = max(float(ref.detach().abs().max()), 1.0)
    assert_close(out, ref, atol=(1e-5 if dtype == torch.float32 else 1e-10) * mag)
    gy = images(n, C, H, W, dtype, device, seed=9)
    for name, a, b in zip(NAMES, torch.autograd.grad(out, my_in, gy), torch.autograd.grad(ref, ref_in, gy)):
        m = max(float(b.abs().max()), 1.0)
        rtol, atol = (2e-4, 2e-5 * m) if dtype == torch.float32 else (1e-9, 1e-10 * m)
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda s, name=name: f"grad {name}: {s}")


@pytest.mark.parametrize("backend,device", backends())
def test_generate_augment_chain(backend, device):
    n, H, W = 4, 10, 10
    tensors, bidx, hidx = make_inputs(n, 3, 1, 3, H, W, 3, 2, dtype=torch.float64, device=device)
    chain = [draw("flip", n, H, W).to(device), draw("scale", n, H, W).to(device), draw("cutout", n, H, W).to(device)]
    my_in = [t.clone().requires_grad_(True) for t in tensors]
    ref_in = [t.clone().requires_grad_(True) for t in tensors]
    out = ops.generate_augment(*my_in, bidx, hidx, chain, backend=backend)
    ref = _reference.augment_reference(_reference.generate_reference(*ref_in, bidx, hidx), chain)
    assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(out.sum(), my_in), torch.autograd.grad(ref.sum(), ref_in)):
        assert_close(a, b)


@requires_ext
def test_gradcheck_generate_augment_cpu():
    tensors, bidx, hidx = make_inputs(3, 2, 1, 2, 5, 5, 3, 1, dtype=torch.float64)
    p = draw("color", 3, 5, 5)
    inputs = [t.requires_grad_(True) for t in tensors]
    assert torch.autograd.gradcheck(lambda *a: ops.generate_augment(*a, bidx, hidx, p, backend="cpu"), inputs)


@requires_ext
def test_opcheck_augment_ops():
    x = images(3, 2, 7, 6, torch.float64).requires_grad_(True)
    ops.augment(x, draw("crop", 3, 7, 6), backend="cpu")  # registers fakes + autograd
    for fam in ("color", "crop", "scale"):
        code, fp, ip = ops._encode(draw(fam, 3, 7, 6), 3, 7, 6, torch.float64, torch.device("cpu"))
        torch.library.opcheck(torch.ops.haba_fast.augment.default, (x, code, fp, ip), test_utils=FAST_OPCHECK)
        torch.library.opcheck(torch.ops.haba_fast.augment_backward.default, (x.detach(), code, fp, ip),
                              test_utils=FAST_OPCHECK)
    tensors, bidx, hidx = make_inputs(3, 2, 1, 2, 7, 6, 3, 2, dtype=torch.float64)
    code, fp, ip = ops._encode(draw("rotate", 3, 7, 6), 3, 7, 6, torch.float64, torch.device("cpu"))
    args = [t.clone().requires_grad_(True) for t in tensors]
    torch.library.opcheck(torch.ops.haba_fast.generate_augment.default, (*args, bidx, hidx, code, fp, ip))
    grad = images(3, 2, 7, 6, torch.float64)
    torch.library.opcheck(torch.ops.haba_fast.generate_augment_backward.default,
                          (grad, *tensors[:6], bidx, hidx, code, fp, ip, True, True), test_utils=FAST_OPCHECK)


# ---- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=requires_ext), "torch"])
def test_augment_bad_inputs(backend):
    x = images(3, 2, 8, 8, torch.float32)
    with pytest.raises(ValueError, match="batch of 4"):
        ops.augment(x, draw("crop", 4, 8, 8), backend=backend)
    with pytest.raises(TypeError, match="AugParams"):
        ops.augment(x, {"family": "crop"}, backend=backend)
    with pytest.raises(ValueError, match=r"\[n, C, H, W\]"):
        ops.augment(x[0], draw("crop", 3, 8, 8), backend=backend)
    with pytest.raises(TypeError, match="floating point"):
        ops.augment(x.to(torch.int64), draw("crop", 3, 8, 8), backend=backend)
    tensors, bidx, hidx = make_inputs(3, 2, 1, 2, 8, 8, 3, 2)
    with pytest.raises(ValueError, match="batch of 2"):
        ops.generate_augment(*tensors, bidx, hidx, draw("flip", 2, 8, 8), backend=backend)
    with pytest.raises(ValueError, match="hall_idx values must lie in"):
        ops.generate_augment(*tensors, bidx, hidx + 5, draw("flip", 3, 8, 8), backend=backend)
