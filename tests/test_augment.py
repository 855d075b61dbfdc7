"""DSA augmentation: sampling, AugParams, and the reference transform against independent oracles.

The oracles below are written from DESIGN.md's formulas with explicit per-sample / per-pixel loops in
numpy float64 (bilinear sampling with align_corners=True by hand), sharing no code with the library.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from utils import assert_close, requires_cuda

from haba_fast import _reference, ops
from haba_fast.augment import (
    DEFAULT_STRATEGY,
    FAMILIES,
    AugParams,
    DSAConfig,
    apply,
    augment,
    parse_strategy,
    sample,
)

SHAPES = [(1, 8, 8), (3, 7, 9), (1, 28, 28), (3, 32, 32)]  # (C, H, W): odd and non-square sizes too
BATCHES = [1, 5]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n, C, H, W, dtype=torch.float64, seed=1):
    return torch.randn(n, C, H, W, generator=gen(seed), dtype=dtype)


# ---- independent oracles (numpy float64, explicit loops) -------------------------------------------
def oracle_color(x, b, s, c, brightness=1.0, saturation=2.0, contrast=0.5):
    out = np.empty_like(x)
    for k in range(x.shape[0]):
        img = x[k] + (b[k] - 0.5) * brightness
        pix_mean = img.mean(axis=0)  # [H, W]
        img = (img - pix_mean) * (s[k] * saturation) + pix_mean
        mean = img.mean()
        out[k] = (img - mean) * (c[k] + contrast) + mean
    return out


def oracle_crop(x, tx, ty):
    n, _C, H, W = x.shape
    out = np.zeros_like(x)
    for k in range(n):
        for i in range(H):
            for j in range(W):
                si, sj = i + tx[k], j + ty[k]
                if 0 <= si < H and 0 <= sj < W:
                    out[k, :, i, j] = x[k, :, si, sj]
    return out


def oracle_cutout(x, ox, oy, ratio=0.5):
    n, _C, H, W = x.shape
    ch, cw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    out = x.copy()
    for k in range(n):
        for a in range(ch):
            for b in range(cw):
                r = min(max(ox[k] - ch // 2 + a, 0), H - 1)
                col = min(max(oy[k] - cw // 2 + b, 0), W - 1)
                out[k, :, r, col] = 0.0
    return out


def oracle_flip(x, r, prob=0.5):
    out = x.copy()
    for k in range(x.shape[0]):
        if r[k] < prob:
            out[k] = x[k][:, :, ::-1]
    return out


def oracle_affine(x, mats):
    """Bilinear sampling, zero padding, align_corners=True, of x [n, C, H, W] under 2×2 matrices mats [n]."""
    n, _C, H, W = x.shape
    out = np.zeros_like(x)
    for k in range(n):
        A = mats[k]
        for i in range(H):
            for j in range(W):
                xn = -1.0 + 2.0 * j / (W - 1)  # width coordinate of the output pixel in [-1, 1]
                yn = -1.0 + 2.0 * i / (H - 1)
                xs = A[0][0] * xn + A[0][1] * yn
                ys = A[1][0] * xn + A[1][1] * yn
                px, py = (xs + 1.0) / 2.0 * (W - 1), (ys + 1.0) / 2.0 * (H - 1)
                x0, y0 = math.floor(px), math.floor(py)
                fx, fy = px - x0, py - y0
                for yy, wy in ((y0, 1.0 - fy), (y0 + 1, fy)):
                    for xx, wx in ((x0, 1.0 - fx), (x0 + 1, fx)):
                        if 0 <= yy < H and 0 <= xx < W:
                            out[k, :, i, j] += wy * wx * x[k, :, yy, xx]
    return out


def oracle(x: torch.Tensor, p: AugParams) -> np.ndarray:
    xn = x.detach().double().cpu().numpy()
    v = {k: t.double().cpu().numpy() if t.is_floating_point() else t.cpu().numpy() for k, t in p.values.items()}
    if p.family == "color":
        return oracle_color(xn, v["brightness"], v["saturation"], v["contrast"])
    if p.family == "crop":
        return oracle_crop(xn, v["tx"], v["ty"])
    if p.family == "cutout":
        return oracle_cutout(xn, v["ox"], v["oy"], p.cutout_ratio)
    if p.family == "flip":
        return oracle_flip(xn, v["r"])
    if p.family == "scale":
        return oracle_affine(xn, [[[sx, 0.0], [0.0, sy]] for sx, sy in zip(v["sx"], v["sy"])])
    if p.family == "rotate":
        return oracle_affine(xn, [[[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]] for t in v["theta"]])
    assert p.family == "identity"
    return xn.copy()


def both(x, p):
    """The reference itself, and the public op (whichever backend ``ops.augment`` picks here)."""
    return _reference.augment_reference(x, p), apply(x, p)


# Tests parametrized with ``impl`` run on the reference and on the public op.
IMPLS = {"reference": _reference.augment_reference, "apply": apply}
impl_param = pytest.mark.parametrize("impl", list(IMPLS.values()), ids=list(IMPLS))


# ---- each family against its oracle -----------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_family_matches_oracle(family, shape, n, dtype):
    C, H, W = shape
    x = images(n, C, H, W, dtype=dtype)
    p = sample(family, n, (H, W), generator=gen(100 * FAMILIES.index(family) + 10 * SHAPES.index(shape) + n))
    assert p.family == family and p.n == n
    expected = torch.from_numpy(oracle(x, p)).to(dtype)
    for out in both(x, p):
        assert out.shape == x.shape and out.dtype == dtype
        assert_close(out, expected, dtype=dtype)


@pytest.mark.parametrize("H,W", [(8, 8), (7, 9), (6, 5)])
def test_crop_extreme_shifts(H, W):
    # Shifts at, inside and beyond the image: beyond it everything is zero.
    tx = torch.tensor([0, -1, 2, H, -H - 3, 1])
    ty = torch.tensor([0, 1, -2, 0, 1, W + 1])
    x = images(6, 2, H, W)
    for out in both(x, AugParams.crop(tx, ty)):
        assert_close(out, torch.from_numpy(oracle_crop(x.numpy(), tx.numpy(), ty.numpy())))
        assert torch.equal(out[0], x[0])
        assert torch.count_nonzero(out[3]) == 0 and torch.count_nonzero(out[5]) == 0


@pytest.mark.parametrize("H,W", [(8, 8), (7, 9), (28, 28), (5, 6)])
def test_cutout_edge_centres(H, W):
    # Centres at the corners, one past the last pixel (reachable for even hole sizes), and far outside.
    ox = torch.tensor([0, H - 1, H, 0, 100, -50])
    oy = torch.tensor([0, W - 1, W, W // 2, 3, -50])
    x = images(6, 3, H, W)
    ch, cw = int(H * 0.5 + 0.5), int(W * 0.5 + 0.5)
    for out in both(x, AugParams.cutout(ox, oy)):
        assert_close(out, torch.from_numpy(oracle_cutout(x.numpy(), ox.numpy(), oy.numpy())))
        # Centre (0, 0): the hole covers rows [0, ch - ch//2) and columns [0, cw - cw//2).
        assert torch.count_nonzero(out[0, :, : ch - ch // 2, : cw - cw // 2]) == 0
        assert torch.equal(out[0, :, ch - ch // 2 :, :], x[0, :, ch - ch // 2 :, :])


@impl_param
def test_flip_threshold_and_scale_identity(impl):
    x = images(4, 3, 7, 9)
    out = impl(x, AugParams.flip(torch.tensor([0.0, 0.4999, 0.5, 0.9])))
    assert torch.equal(out[:2], x[:2].flip(3)) and torch.equal(out[2:], x[2:])
    # scale 1 and rotation 0 are the identity (align_corners=True maps pixel centres onto themselves).
    assert_close(impl(x, AugParams.scale(torch.ones(4), torch.ones(4))), x)
    assert_close(impl(x, AugParams.rotate(torch.zeros(4))), x)


@impl_param
def test_rotate_quarter_turn_is_exact(impl):
    # A 90° rotation of a square image permutes pixels; direction per DESIGN.md's matrix
    # [[cos, −sin], [sin, cos]]: out[i, j] = in[j', i'] with the grid's x along the width.
    x = images(1, 2, 7, 7)
    out = impl(x, AugParams.rotate(torch.tensor([math.pi / 2], dtype=torch.float64)))
    # θ = 90°: source (xs, ys) = (−yn, xn) → source column = W−1−i, source row = j.
    expected = torch.empty_like(x)
    for i in range(7):
        for j in range(7):
            expected[0, :, i, j] = x[0, :, j, 6 - i]
    assert_close(out, expected, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("family", FAMILIES + ("chain",))
def test_gradcheck_float64(family):
    n, C, H, W = 2, 2, 4, 5
    g = gen(7)
    if family == "chain":
        params = sample("color_crop_rotate", n, (H, W), generator=g, mode="M")
    else:
        params = sample(family, n, (H, W), generator=g)
    x = images(n, C, H, W).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: _reference.augment_reference(t, params), (x,))
    assert torch.autograd.gradcheck(
        lambda t: apply(t, params), (x,), fast_mode=True
    )  # the backend's own tests go further
    if family == "color":  # the one non-linear family: its second derivative is not trivially zero
        assert torch.autograd.gradgradcheck(lambda t: _reference.augment_reference(t, params), (x,))


# ---- sampling ------------------------------------------------------------------------------------------
def test_sampling_ranges_per_axis():
    n, H, W = 4000, 28, 9
    g = gen(3)
    crop = sample("crop", n, (H, W), generator=g)
    sh, sw = int(H * 0.125 + 0.5), int(W * 0.125 + 0.5)  # 4 and 1: rows use H, columns W
    assert (sh, sw) == (4, 1)
    assert crop.values["tx"].dtype == torch.int64
    assert crop.values["tx"].min() == -sh and crop.values["tx"].max() == sh
    assert crop.values["ty"].min() == -sw and crop.values["ty"].max() == sw
    cut = sample("cutout", n, (H, W), generator=g)
    # H = 28: hole 14 (even) → centres in [0, 29); W = 9: hole 5 (odd) → [0, 9).
    assert cut.values["ox"].min() == 0 and cut.values["ox"].max() == H
    assert cut.values["oy"].min() == 0 and cut.values["oy"].max() == W - 1
    flip = sample("flip", n, (H, W), generator=g).values["r"]
    assert 0.0 <= flip.min() and flip.max() < 1.0 and abs((flip < 0.5).float().mean() - 0.5) < 0.05
    sc = sample("scale", n, (H, W), generator=g)
    for k in ("sx", "sy"):
        v = sc.values[k]
        assert v.min() >= 1 / 1.2 - 1e-6 and v.max() < 1.2 and v.max() - v.min() > 0.3
    rot = sample("rotate", n, (H, W), generator=g).values["theta"]
    lim = 15.0 / 180.0 * math.pi
    assert rot.min() >= -lim - 1e-6 and rot.max() < lim and rot.max() - rot.min() > 1.8 * lim
    col = sample("color", n, (H, W), generator=g)
    for k in ("brightness", "saturation", "contrast"):
        assert 0.0 <= col.values[k].min() and col.values[k].max() < 1.0


def test_s_mode_draws_each_family_uniformly():
    g = gen(11)
    counts = dict.fromkeys(FAMILIES, 0)
    for _ in range(300):
        p = sample(DEFAULT_STRATEGY, 3, (8, 8), generator=g)
        assert isinstance(p, AugParams)
        counts[p.family] += 1
    assert all(20 <= c <= 80 for c in counts.values()), counts  # expected 50 each
    # Only the strategy's families are drawn.
    fams = {sample("flip_rotate", 2, (8, 8), generator=g).family for _ in range(40)}
    assert fams == {"flip", "rotate"}


@impl_param
def test_m_mode_chain_in_order_and_composition(impl):
    g = gen(5)
    chain = sample("rotate_color_crop_crop", 4, (7, 9), generator=g, mode="M")
    assert isinstance(chain, list) and [p.family for p in chain] == ["rotate", "color", "crop", "crop"]
    x = images(4, 3, 7, 9)
    step = x
    for p in chain:
        step = torch.from_numpy(oracle(step, p))
    assert_close(impl(x, chain), step)
    assert_close(impl(x, tuple(chain)), step)
    assert_close(impl(x, chain), impl(impl(impl(impl(x, chain[0]), chain[1]), chain[2]), chain[3]))


@pytest.mark.parametrize("family", FAMILIES)
def test_same_on_batch(family):
    p = sample(family, 6, (9, 7), generator=gen(2), same_on_batch=True)
    for v in p.values.values():
        assert v.shape == (6,) and torch.equal(v, v[:1].expand(6))
    x = images(1, 2, 9, 7).expand(6, 2, 9, 7)
    out = apply(x, p)
    assert torch.equal(out, out[:1].expand_as(out))


@pytest.mark.parametrize("mode", ["S", "M"])
def test_determinism_under_generator(mode):
    def values(seed):
        res = sample(DEFAULT_STRATEGY, 8, (7, 9), generator=gen(seed), mode=mode)
        res = res if isinstance(res, list) else [res]
        return [(p.family, {k: v.clone() for k, v in p.values.items()}) for p in res]

    a, b, c = values(123), values(123), values(124)
    assert [f for f, _ in a] == [f for f, _ in b]
    for (_, va), (_, vb) in zip(a, b):
        assert all(torch.equal(va[k], vb[k]) for k in va)
    differ = [f for f, _ in a] != [f for f, _ in c] or any(
        not torch.equal(va[k], vc[k]) for (_, va), (_, vc) in zip(a, c) for k in va
    )
    assert differ


@pytest.mark.parametrize("family", FAMILIES)
def test_different_seeds_give_different_params(family):
    a = sample(family, 8, (16, 16), generator=gen(1))
    b = sample(family, 8, (16, 16), generator=gen(2))
    assert any(not torch.equal(a.values[k], b.values[k]) for k in a.values)


def test_global_rng_untouched():
    state = torch.get_rng_state()
    sample(DEFAULT_STRATEGY, 5, (8, 8), generator=gen(0))
    sample(DEFAULT_STRATEGY, 5, (8, 8), generator=gen(0), mode="M", same_on_batch=True)
    sample(DEFAULT_STRATEGY, 5, (8, 8))  # no generator: a private one, not the global RNG
    augment(images(5, 1, 8, 8), generator=gen(0))
    assert torch.equal(torch.get_rng_state(), state)


def test_no_generator_is_random_but_valid():
    a = sample("rotate", 16, (8, 8))
    b = sample("rotate", 16, (8, 8))
    assert not torch.equal(a.values["theta"], b.values["theta"])


def test_none_strategy_is_identity():
    x = images(3, 2, 5, 5)
    for s in ("", "none", "None"):
        p = sample(s, 3, (5, 5), generator=gen(0))
        assert p.family == "identity" and p.n == 3
        out = apply(x, p)
        assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
        chain = sample(s, 3, (5, 5), generator=gen(0), mode="M")
        assert [q.family for q in chain] == ["identity"]
    assert parse_strategy("none") == () and parse_strategy("crop_flip") == ("crop", "flip")


@impl_param
def test_nondefault_config_matches_formulas(impl):
    cfg = DSAConfig(
        brightness=0.3, saturation=1.0, contrast=0.2, crop=0.25, cutout=0.25, flip=0.8, scale=1.5, rotate=40.0
    )
    H, W, n = 9, 12, 6
    x = images(n, 3, H, W)
    # Same generator state → the same uniform draws r; the config changes only their effect.
    base = sample("color", n, (H, W), generator=gen(4)).values
    p = sample("color", n, (H, W), generator=gen(4), config=cfg)
    r = {k: v.double().numpy() for k, v in base.items()}
    want = oracle_color(x.numpy(), r["brightness"], r["saturation"], r["contrast"], 0.3, 1.0, 0.2)
    assert_close(impl(x, p), torch.from_numpy(want), atol=1e-6, rtol=1e-6)

    r_flip = sample("flip", n, (H, W), generator=gen(5)).values["r"].double().numpy()
    p = sample("flip", n, (H, W), generator=gen(5), config=cfg)
    assert_close(impl(x, p), torch.from_numpy(oracle_flip(x.numpy(), r_flip, prob=0.8)))
    assert torch.equal(impl(x, sample("flip", n, (H, W), generator=gen(5), config=DSAConfig(flip=1.0))), x.flip(3))
    assert torch.equal(impl(x, sample("flip", n, (H, W), generator=gen(5), config=DSAConfig(flip=0.0))), x)

    p = sample("cutout", 3000, (H, W), generator=gen(6), config=cfg)
    assert p.cutout_ratio == 0.25  # holes int(9·0.25+0.5) = 2 (even), int(12·0.25+0.5) = 3 (odd)
    assert p.values["ox"].max() == H and p.values["oy"].max() == W - 1
    q = p[:n]
    assert_close(
        impl(x, q),
        torch.from_numpy(oracle_cutout(x.numpy(), q.values["ox"].numpy(), q.values["oy"].numpy(), ratio=0.25)),
    )

    crop = sample("crop", 3000, (H, W), generator=gen(7), config=cfg)
    assert crop.values["tx"].abs().max() == int(H * 0.25 + 0.5) and crop.values["ty"].abs().max() == 3
    sc = sample("scale", 3000, (H, W), generator=gen(8), config=cfg).values["sx"]
    assert sc.min() >= 1 / 1.5 - 1e-6 and sc.max() < 1.5 and sc.max() > 1.45
    rot = sample("rotate", 3000, (H, W), generator=gen(9), config=cfg).values["theta"]
    assert rot.abs().max() <= 40 / 180 * math.pi + 1e-6 and rot.abs().max() > 39 / 180 * math.pi


# ---- Siamese property, indexing, concatenation -------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@impl_param
def test_siamese_same_params_same_transform(family, impl):
    n, C, H, W = 5, 3, 7, 9
    p = sample(family, n, (H, W), generator=gen(21))
    x1, x2 = images(n, C, H, W, seed=1), images(n, C, H, W, seed=2)
    y1, y2 = impl(x1, p), impl(x2, p)
    # Replaying the params reproduces the transform, and the transform does not depend on the other batch.
    assert torch.equal(impl(x1, p), y1)
    joint = impl(torch.cat([x1, x2]), AugParams.cat([p, p]))
    assert_close(joint, torch.cat([y1, y2]))
    # Sample i of the batch is transformed by params[i] alone.
    for i in range(n):
        assert_close(impl(x1[i : i + 1], p[i]), y1[i : i + 1])
    # The transform is linear in x for every family except color, so impl(x1 + x2) = y1 + y2 (same geometry).
    if family != "color":
        assert_close(impl(x1 + x2, p), y1 + y2)


def test_augparams_indexing_and_cat():
    p = sample("color", 6, (8, 8), generator=gen(0))
    assert p.n == 6 and len(p) == 6
    assert p[2].n == 1 and torch.equal(p[2].values["brightness"], p.values["brightness"][2:3])
    assert torch.equal(p[-1].values["contrast"], p.values["contrast"][5:])
    assert p[1:4].n == 3 and p[::2].n == 3 and p[10:].n == 0
    idx = torch.tensor([4, 0, 4])
    q = p[idx]
    assert q.n == 3 and torch.equal(q.values["saturation"], p.values["saturation"][idx])
    assert torch.equal(p[[1, 2]].values["brightness"], p.values["brightness"][1:3])
    assert p[[]].n == 0 and p[torch.tensor(3)].n == 1 and p[np.int64(-2)].values["contrast"] == p.values["contrast"][4]
    mask = torch.tensor([True, False, True, False, False, True])
    assert p[mask].n == 3 and torch.equal(p[mask].values["brightness"], p.values["brightness"][mask])
    back = AugParams.cat([p[:2], p[2:5], p[5]])
    assert back.n == 6 and all(torch.equal(back.values[k], p.values[k]) for k in p.values)
    ident = AugParams.identity(4)
    assert ident[1:3].n == 2 and ident[torch.tensor([0, 0, 1])].n == 3 and AugParams.cat([ident, ident]).n == 8
    cut = AugParams.cutout(torch.tensor([1, 2]), torch.tensor([3, 4]), ratio=0.25)
    assert cut[0].cutout_ratio == 0.25 and AugParams.cat([cut, cut]).cutout_ratio == 0.25
    moved = p.to("cpu")
    assert moved.family == "color" and moved.n == 6
    with pytest.raises(IndexError):
        p[6]
    with pytest.raises(ValueError, match="cannot concatenate"):
        AugParams.cat([p, sample("crop", 2, (8, 8), generator=gen(0))])
    with pytest.raises(ValueError, match="cutout ratios differ"):
        AugParams.cat([cut, AugParams.cutout(torch.tensor([1]), torch.tensor([1]))])
    with pytest.raises(ValueError, match="non-empty"):
        AugParams.cat([])
    with pytest.raises(ValueError, match="length"):
        p[torch.tensor([True, False])]
    with pytest.raises(TypeError, match="integer"):
        p[torch.tensor([0.5])]
    with pytest.raises(ValueError, match="1-D"):
        p[torch.zeros(2, 2, dtype=torch.long)]


def test_constructors_accept_sequences_and_copy():
    p = AugParams.crop([1, -2], [0, 3])
    assert p.values["tx"].dtype == torch.int64 and p.n == 2
    assert AugParams.rotate([0.1, 0.2, 0.3]).values["theta"].dtype == torch.float32
    assert AugParams.scale(torch.tensor([1, 1]), torch.tensor([2, 2])).values["sx"].is_floating_point()
    d = {"r": torch.tensor([0.1, 0.9])}
    q = AugParams("flip", d)
    d["r"] = torch.tensor([0.9])
    assert q.n == 2  # the params own their dict
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.family = "crop"


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: AugParams.crop(torch.tensor([0.5]), torch.tensor([1])), TypeError, "integer"),
        (lambda: AugParams.crop(torch.tensor([0.5]), torch.tensor([1])), ValueError, "integer"),
        (lambda: AugParams.cutout(torch.tensor([True]), torch.tensor([1])), TypeError, "integer"),
        (lambda: AugParams.flip(torch.tensor([True])), TypeError, "floating"),
        (lambda: AugParams.rotate(torch.zeros(2, 3)), ValueError, r"1-D tensor \[n\]"),
        (lambda: AugParams.rotate(torch.tensor(0.3)), ValueError, "1-D"),
        (lambda: AugParams.scale(torch.ones(3), torch.ones(4)), ValueError, "same length"),
        (lambda: AugParams.color(torch.ones(2), torch.ones(2), torch.ones(1)), ValueError, "same length"),
        (lambda: AugParams("crop", {"tx": torch.zeros(2, dtype=torch.long)}), ValueError, r"\['tx', 'ty'\]"),
        (lambda: AugParams("blur", {}), ValueError, "choose one of"),
        (lambda: AugParams("identity", {}), ValueError, "batch_size"),
        (lambda: AugParams.identity(-1), ValueError, ">= 0"),
        (lambda: AugParams.cutout([1], [1], ratio=2.0), ValueError, "cutout_ratio"),
    ],
)
def test_augparams_validation(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


# ---- errors of sample / apply -----------------------------------------------------------------------
def test_sample_errors():
    with pytest.raises(ValueError, match="'blur'.*color, crop, cutout, flip, scale, rotate"):
        sample("color_blur", 2, (8, 8), generator=gen(0))
    with pytest.raises(ValueError, match="'S'.*'M'"):
        sample("color", 2, (8, 8), generator=gen(0), mode="X")
    with pytest.raises(ValueError, match="n must be"):
        sample("color", -1, (8, 8), generator=gen(0))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        sample("color", 2, (8,), generator=gen(0))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        sample("color", 2, (0, 8), generator=gen(0))
    with pytest.raises(TypeError, match="generator"):
        sample("color", 2, (8, 8), generator=0)
    with pytest.raises(TypeError, match="strategy"):
        sample(None, 2, (8, 8))
    with pytest.raises(ValueError, match="flip"):
        DSAConfig(flip=1.5)
    with pytest.raises(ValueError, match="scale"):
        DSAConfig(scale=0.5)


def test_apply_errors():
    x = images(4, 3, 8, 8)
    p = sample("crop", 3, (8, 8), generator=gen(0))
    with pytest.raises(ValueError, match="batch of 3.*batch size 4"):
        apply(x, p)
    with pytest.raises(ValueError, match="batch of 3"):
        apply(x, [sample("flip", 4, (8, 8), generator=gen(0)), p])
    with pytest.raises(ValueError, match=r"\[n, C, H, W\]"):
        apply(x[0], p)
    with pytest.raises(TypeError, match="floating"):
        apply(x.long(), sample("crop", 4, (8, 8), generator=gen(0)))
    with pytest.raises(TypeError, match="AugParams"):
        apply(x, {"family": "crop"})
    with pytest.raises(ValueError, match="batch"):
        _reference.augment_reference(x, p)  # the reference checks too


def test_apply_dispatches_through_ops(monkeypatch):
    x = images(3, 2, 6, 7)
    p = sample("rotate", 3, (6, 7), generator=gen(0))
    assert_close(apply(x, p), _reference.augment_reference(x, p))
    calls = []

    def spy(xx, params, **kw):
        calls.append(params)
        return _reference.augment_reference(xx, params)

    monkeypatch.setattr(ops, "augment", spy)
    apply(x, p)
    assert calls == [p]


def test_augment_convenience_equals_sample_then_apply():
    x = images(5, 3, 7, 9)
    out = augment(x, DEFAULT_STRATEGY, generator=gen(8))
    p = sample(DEFAULT_STRATEGY, 5, (7, 9), generator=gen(8))
    assert_close(out, apply(x, p))


@requires_cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_matches_cpu(family):
    p = sample(family, 5, (7, 9), generator=gen(3))
    x = images(5, 3, 7, 9, dtype=torch.float32)
    assert_close(apply(x.cuda(), p.to("cuda")).cpu(), apply(x, p))
    g = torch.Generator(device="cuda").manual_seed(0)
    q = sample(family, 5, (7, 9), generator=g, device="cuda")
    assert q.device.type == "cuda" and apply(x.cuda(), q).device.type == "cuda"
