"""The augmentation families: one registered object per family, holding everything about it.

Each family (kornia's augmentation classes split randomness from the transform the same way) is one
:class:`AugFamily` subclass, registered with :func:`register_family`, that knows

- ``keys`` / ``int_keys``: the names of its per-sample values ([n] tensors) and which of them are int64;
- ``sample(n, size, g, same, cfg)``: how to draw those values with an explicit ``torch.Generator``;
- ``apply(x, p)``: the reference transform in plain torch ops (the oracle of every backend);
- ``encode(p, H, W, fp, ip)``: the per-sample rows the fused C++ / Triton kernels read (``fparams`` [n, 4] in
  the images' dtype, ``iparams`` [n, 4] int64) and the kernel code it runs under (:class:`KernelCode`), or
  ``no_kernel``: why the fused kernels cannot run it (the dispatcher then routes it to the torch backend);
- ``apply_research(x, p)``: the same transform written as the DSA research code writes it (meshgrid gathers,
  per-sample Python loops), the baseline of ``haba-fast bench genaug``.

Adding a family = one subclass here (plus, if it should run fused, a case in the kernels: ``csrc/genaug_kernels.h``
and ``kernels/augment.py``, under a new :class:`KernelCode`). Every Python module — ``haba_fast.augment``
(``AugParams``, ``sample``), ``haba_fast._reference``, ``haba_fast.ops``, ``kernels/augment.py`` and the benchmark —
reads the registry instead of naming families.

Formulas: docs/DESIGN.md, "Augmentation (DSA)". This module imports only torch.
"""

from __future__ import annotations

import math
from enum import IntEnum
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AugFamily",
    "KernelCode",
    "family",
    "register_family",
    "registered_families",
]


class KernelCode(IntEnum):
    """The transforms the fused kernels implement (``enum Family`` of csrc/genaug_types.h; kernels/augment.py).

    Several families may share one code (scale and rotate are both ``AFFINE``).
    """

    IDENTITY = 0
    COLOR = 1
    CROP = 2
    CUTOUT = 3
    FLIP = 4
    AFFINE = 5


class AugFamily:
    """One augmentation family. Subclass, set the class attributes, override the methods, register.

    Attributes:
        name: the family's name in strategy strings (``"color"``, ...).
        keys: names of the per-sample values, in constructor order; each is a [n] tensor.
        int_keys: the subset of ``keys`` held as int64 (pixel offsets, seeds); the others are floating.
        no_kernel: None when ``encode`` feeds the fused kernels; else the reason they cannot run this family.
    """

    name: str = ""
    keys: tuple[str, ...] = ()
    int_keys: frozenset = frozenset()
    no_kernel: Optional[str] = None

    def sample(self, n: int, size: tuple[int, int], g: torch.Generator, same: bool, cfg) -> dict[str, Tensor]:
        """Draw the values for n samples of spatial size (H, W) on ``g``'s device (one draw repeated if ``same``).

        ``cfg`` is a ``haba_fast.augment.DSAConfig``; non-default constants are folded into the values so that
        ``apply`` needs no config.
        """
        raise NotImplementedError

    def static_params(self, cfg) -> dict:
        """Keyword arguments of ``AugParams`` that are not per-sample values (cutout: its ``cutout_ratio``)."""
        return {}

    def apply(self, x: Tensor, p) -> Tensor:
        """Reference transform of x [n, C, H, W] under params ``p`` (an ``AugParams`` of this family)."""
        raise NotImplementedError

    def encode(self, p, H: int, W: int, fp: Tensor, ip: Tensor) -> KernelCode:
        """Fill the kernels' rows fp [n, 4] (x's dtype) and ip [n, 4] int64 (zero on entry); return the code.

        Values are turned into the kernels' coefficients with the reference's own arithmetic, in the images'
        dtype, so the kernels see bit-identical coefficients.
        """
        raise NotImplementedError(f"augmentation family {self.name!r} has no kernel encoding: {self.no_kernel}")

    def apply_research(self, x: Tensor, p) -> Tensor:
        """The transform as the DSA research code computes it (same numbers); defaults to ``apply``."""
        return self.apply(x, p)

    def __repr__(self) -> str:
        return f"<augmentation family {self.name!r}>"


_REGISTRY: dict[str, AugFamily] = {}


def register_family(cls: type[AugFamily]) -> type[AugFamily]:
    """Class decorator: register one instance of an :class:`AugFamily` subclass under its ``name``."""
    inst = cls()
    if not inst.name or "_" in inst.name:
        raise ValueError(f"{cls.__name__}: a family needs a non-empty name without '_' (strategies join on it)")
    if inst.name in _REGISTRY:
        raise ValueError(f"augmentation family {inst.name!r} is already registered")
    if not set(inst.int_keys) <= set(inst.keys):
        raise ValueError(f"{cls.__name__}: int_keys {sorted(inst.int_keys)} are not all in keys {inst.keys}")
    _REGISTRY[inst.name] = inst
    return cls


def registered_families() -> tuple[str, ...]:
    """Names of every registered family, ``identity`` included, in registration order."""
    return tuple(_REGISTRY)


def family(name: str) -> AugFamily:
    """The registered family called ``name``; ValueError naming the choices otherwise."""
    fam = _REGISTRY.get(name)
    if fam is None:
        raise ValueError(f"unknown augmentation family {name!r}: choose one of {', '.join(_REGISTRY)}")
    return fam


# ---- shared pieces ------------------------------------------------------------------------------------
def _draw_uniform(g: torch.Generator, n: int, same: bool) -> Tensor:
    """[n] float32 U[0, 1) on the generator's device; one draw repeated when ``same``."""
    r = torch.rand(1 if same else n, generator=g, device=g.device)
    return r.repeat(n) if same else r


def _draw_int(g: torch.Generator, low: int, high: int, n: int, same: bool) -> Tensor:
    """[n] int64 uniform in [low, high) on the generator's device; one draw repeated when ``same``."""
    r = torch.randint(low, high, (1 if same else n,), generator=g, device=g.device)
    return r.repeat(n) if same else r


def _sides(H: int, W: int, ratio: float) -> tuple[int, int]:
    """The DSA rounding of a ratio of the image sides: (int(H·ratio + 0.5), int(W·ratio + 0.5))."""
    return int(H * ratio + 0.5), int(W * ratio + 0.5)


def _per_sample(v: Tensor, x: Tensor) -> Tensor:
    """A float value [n] as [n, 1, 1, 1] in x's dtype and device, to broadcast over C, H, W."""
    return v.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _affine(x: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """Bilinear resampling (zero padding, align_corners=True) under the per-sample matrices [[a, b, 0], [c, d, 0]]."""
    zero = torch.zeros_like(a)
    theta = torch.stack([torch.stack([a, b, zero], dim=-1), torch.stack([c, d, zero], dim=-1)], dim=-2)  # [n, 2, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _affine_research(x: Tensor, rows) -> Tensor:
    """The research code's affine path: matrices built in a per-sample Python loop on the CPU, then moved."""
    theta = torch.tensor(rows, dtype=x.dtype)
    grid = F.affine_grid(theta, x.shape, align_corners=True).to(x.device)
    return F.grid_sample(x, grid, align_corners=True)


def _meshgrid(x: Tensor, rows: int, cols: int):
    dev = x.device
    axes = (torch.arange(x.size(0), device=dev), torch.arange(rows, device=dev), torch.arange(cols, device=dev))
    return torch.meshgrid(*axes, indexing="ij")


# ---- the families -------------------------------------------------------------------------------------
@register_family
class Identity(AugFamily):
    """No augmentation (an empty strategy)."""

    name = "identity"

    def sample(self, n, size, g, same, cfg):
        return {}

    def apply(self, x, p):
        return x

    def encode(self, p, H, W, fp, ip):
        return KernelCode.IDENTITY


@register_family
class Color(AugFamily):
    """Brightness, then saturation, then contrast, from the uniform draws r of each stage.

    y = x + (b − 0.5); y = (y − m_C)·2s + m_C (m_C: per-pixel channel mean); y = (y − m)·(c + 0.5) + m (m: mean
    over C, H, W). Kernel rows: fp = (b − 0.5, 2s, c + 0.5).
    """

    name = "color"
    keys = ("brightness", "saturation", "contrast")

    def sample(self, n, size, g, same, cfg):
        b, s, c = (_draw_uniform(g, n, same) for _ in range(3))
        # Fold non-default constants into the stored draws so that apply's fixed formula
        # x + (b − 0.5), factor 2s, factor c + 0.5 realizes the configured ratios exactly.
        if cfg.brightness != 1.0:
            b = 0.5 + (b - 0.5) * cfg.brightness
        if cfg.saturation != 2.0:
            s = s * (cfg.saturation / 2.0)
        if cfg.contrast != 0.5:
            c = c + (cfg.contrast - 0.5)
        return {"brightness": b, "saturation": s, "contrast": c}

    def apply(self, x, p):
        b, s, c = (_per_sample(p.values[k], x) for k in self.keys)
        x = x + (b - 0.5)  # brightness: shift by (r − 0.5)·1.0
        m = x.mean(dim=1, keepdim=True)  # saturation: around the per-pixel channel mean, factor 2r
        x = (x - m) * (s * 2.0) + m
        m = x.mean(dim=(1, 2, 3), keepdim=True)  # contrast: around the image mean, factor r + 0.5
        return (x - m) * (c + 0.5) + m

    def encode(self, p, H, W, fp, ip):
        v = p.values
        fp[:, 0] = v["brightness"].to(fp) - 0.5
        fp[:, 1] = v["saturation"].to(fp) * 2.0
        fp[:, 2] = v["contrast"].to(fp) + 0.5
        return KernelCode.COLOR


def _shift_axis(x: Tensor, t: Tensor, dim: int) -> Tensor:
    """out[..., i, ...] = x[..., i + t, ...] along ``dim`` (2 or 3), zero where i + t falls outside."""
    n, C, H, W = x.shape
    L = x.shape[dim]
    src = torch.arange(L, device=x.device).view(1, L) + t.to(x.device).view(-1, 1)  # [n, L]
    valid = (src >= 0) & (src < L)
    shape = (n, 1, L, 1) if dim == 2 else (n, 1, 1, L)
    src = src.clamp(0, L - 1).view(shape).expand(n, C, H, W)
    return torch.where(valid.view(shape), x.gather(dim, src), x.new_zeros(()))


@register_family
class Crop(AugFamily):
    """Integer translation: out[i, j] = in[i + tx, j + ty], zero outside; tx, ty in [−s, s], s = int(H·ratio + 0.5)."""

    name = "crop"
    keys = ("tx", "ty")
    int_keys = frozenset(keys)

    def sample(self, n, size, g, same, cfg):
        sh, sw = _sides(*size, cfg.crop)
        return {"tx": _draw_int(g, -sh, sh + 1, n, same), "ty": _draw_int(g, -sw, sw + 1, n, same)}

    def apply(self, x, p):
        return _shift_axis(_shift_axis(x, p.values["tx"], 2), p.values["ty"], 3)

    def encode(self, p, H, W, fp, ip):
        # A shift of the image size or more empties the image either way; clamping keeps the kernels' index
        # arithmetic far from int64 overflow for absurd shifts.
        ip[:, 0], ip[:, 1] = p.values["tx"].clamp(-H, H), p.values["ty"].clamp(-W, W)
        return KernelCode.CROP

    def apply_research(self, x, p):
        tx = p.values["tx"].to(x.device).view(-1, 1, 1)
        ty = p.values["ty"].to(x.device).view(-1, 1, 1)
        gb, gx, gy = _meshgrid(x, x.size(2), x.size(3))
        gx = torch.clamp(gx + tx + 1, 0, x.size(2) + 1)
        gy = torch.clamp(gy + ty + 1, 0, x.size(3) + 1)
        x_pad = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
        return x_pad.permute(0, 2, 3, 1).contiguous()[gb, gx, gy].permute(0, 3, 1, 2)


def _hole_size(p, H: int, W: int) -> tuple[int, int]:
    return _sides(H, W, getattr(p, "cutout_ratio", 0.5))


def _hole_axis(o: Tensor, c: int, L: int, device) -> Tensor:
    """[n, L] bool: positions clamp(o − c//2 + k, 0, L−1), k in [0, c), i.e. the clamped interval's ends."""
    lo = (o.to(device) - c // 2).clamp(0, L - 1).view(-1, 1)
    hi = (o.to(device) - c // 2 + c - 1).clamp(0, L - 1).view(-1, 1)
    i = torch.arange(L, device=device).view(1, L)
    return (i >= lo) & (i <= hi)


@register_family
class Cutout(AugFamily):
    """Zero a ch × cw hole centred at (ox, oy), clamped to the image; ch = int(H·ratio + 0.5) (W for cw)."""

    name = "cutout"
    keys = ("ox", "oy")
    int_keys = frozenset(keys)

    def sample(self, n, size, g, same, cfg):
        H, W = size
        ch, cw = _sides(H, W, cfg.cutout)
        # Even holes may also be centred one past the last pixel, as in the reference.
        return {"ox": _draw_int(g, 0, H + (1 - ch % 2), n, same), "oy": _draw_int(g, 0, W + (1 - cw % 2), n, same)}

    def static_params(self, cfg):
        return {"cutout_ratio": cfg.cutout}

    def apply(self, x, p):
        H, W = x.shape[-2:]
        ch, cw = _hole_size(p, H, W)
        if ch == 0 or cw == 0:  # an empty hole
            return x.clone()
        rows = _hole_axis(p.values["ox"], ch, H, x.device)  # [n, H]
        cols = _hole_axis(p.values["oy"], cw, W, x.device)  # [n, W]
        keep = ~(rows[:, :, None] & cols[:, None, :])  # [n, H, W]
        return x * keep.to(x.dtype).unsqueeze(1)

    def encode(self, p, H, W, fp, ip):
        ch, cw = _hole_size(p, H, W)
        if ch == 0 or cw == 0:  # an empty hole: nothing to cut
            return KernelCode.IDENTITY
        ox, oy = p.values["ox"], p.values["oy"]
        ip[:, 0] = (ox - ch // 2).clamp(0, H - 1)
        ip[:, 1] = (ox - ch // 2 + ch - 1).clamp(0, H - 1)
        ip[:, 2] = (oy - cw // 2).clamp(0, W - 1)
        ip[:, 3] = (oy - cw // 2 + cw - 1).clamp(0, W - 1)
        return KernelCode.CUTOUT

    def apply_research(self, x, p):
        ch, cw = _hole_size(p, x.size(2), x.size(3))
        ox = p.values["ox"].to(x.device).view(-1, 1, 1)
        oy = p.values["oy"].to(x.device).view(-1, 1, 1)
        gb, gx, gy = _meshgrid(x, ch, cw)
        gx = torch.clamp(gx + ox - ch // 2, min=0, max=x.size(2) - 1)
        gy = torch.clamp(gy + oy - cw // 2, min=0, max=x.size(3) - 1)
        mask = torch.ones(x.size(0), x.size(2), x.size(3), dtype=x.dtype, device=x.device)
        mask[gb, gx, gy] = 0
        return x * mask.unsqueeze(1)


@register_family
class Flip(AugFamily):
    """Flip the width axis where r < 0.5 (a flip probability p ≠ 0.5 is folded into r when sampling)."""

    name = "flip"
    keys = ("r",)

    def sample(self, n, size, g, same, cfg):
        r = _draw_uniform(g, n, same)
        if cfg.flip != 0.5:
            r = r + (0.5 - cfg.flip)  # flip where r < p  <=>  r + 0.5 − p < 0.5
        return {"r": r}

    def apply(self, x, p):
        r = p.values["r"].to(x.device).view(-1, 1, 1, 1)
        return torch.where(r < 0.5, x.flip(3), x)

    def encode(self, p, H, W, fp, ip):
        ip[:, 0] = (p.values["r"] < 0.5).to(torch.int64)
        return KernelCode.FLIP


@register_family
class Scale(AugFamily):
    """Affine [[sx, 0, 0], [0, sy, 0]] (sx along the width), sx, sy ~ U[1/ratio, ratio); bilinear, zero padding."""

    name = "scale"
    keys = ("sx", "sy")

    def sample(self, n, size, g, same, cfg):
        lo, span = 1.0 / cfg.scale, cfg.scale - 1.0 / cfg.scale
        return {"sx": _draw_uniform(g, n, same) * span + lo, "sy": _draw_uniform(g, n, same) * span + lo}

    def apply(self, x, p):
        sx, sy = (p.values[k].to(device=x.device, dtype=x.dtype) for k in self.keys)
        zero = torch.zeros_like(sx)
        return _affine(x, sx, zero, zero, sy)

    def encode(self, p, H, W, fp, ip):
        fp[:, 0], fp[:, 3] = p.values["sx"].to(fp), p.values["sy"].to(fp)
        return KernelCode.AFFINE

    def apply_research(self, x, p):
        # The research code draws these on the CPU (torch.rand without a device) and loops over them there; reading
        # CUDA values one by one would add a device sync per sample that it never pays.
        sx, sy = p.values["sx"].cpu(), p.values["sy"].cpu()
        return _affine_research(x, [[[sx[i], 0, 0], [0, sy[i], 0]] for i in range(x.shape[0])])


@register_family
class Rotate(AugFamily):
    """Affine [[cos θ, −sin θ, 0], [sin θ, cos θ, 0]], θ = (r − 0.5)·2·ratio° in radians; bilinear, zero padding."""

    name = "rotate"
    keys = ("theta",)

    def sample(self, n, size, g, same, cfg):
        return {"theta": (_draw_uniform(g, n, same) - 0.5) * (2.0 * cfg.rotate / 180.0 * math.pi)}

    def apply(self, x, p):
        t = p.values["theta"].to(device=x.device, dtype=x.dtype)
        cos, sin = torch.cos(t), torch.sin(t)
        return _affine(x, cos, -sin, sin, cos)

    def encode(self, p, H, W, fp, ip):
        t = p.values["theta"].to(fp)
        cos, sin = torch.cos(t), torch.sin(t)
        fp[:, 0], fp[:, 1], fp[:, 2], fp[:, 3] = cos, -sin, sin, cos
        return KernelCode.AFFINE

    def apply_research(self, x, p):
        t = p.values["theta"].cpu()  # on the CPU, as in the research code (see Scale.apply_research)
        rows = [[[torch.cos(t[i]), torch.sin(-t[i]), 0], [torch.sin(t[i]), torch.cos(t[i]), 0]] for i in range(len(t))]
        return _affine_research(x, rows)


@register_family
class Noise(AugFamily):
    """Additive Gaussian noise: y = x + std·ε, ε ~ N(0, 1) per pixel, drawn from a per-sample seed.

    Not one of DSA's differentiable families: the DSA code (``ParamDiffAug`` / ``AUGMENT_FNS`` of
    VICO-UoE/DatasetCondensation and GeorgeCazenavette/mtt-distillation) declares ``ratio_noise = 0.05`` but has no
    ``noise`` function; its non-differentiable evaluation augmentation (``augment``'s ``noisefun``, strategy
    ``crop_noise`` for ConvNetBN) adds ``noise · randn(C, H, W)`` per image. This family is that transform as
    data: the values are a seed and a std per sample (std = ``DSAConfig.noise``, default 0.05, the DSA constant),
    so params replay exactly (Siamese, backward) and ``params[idx]`` keeps each sample's noise. ε is drawn on the
    CPU from ``torch.Generator().manual_seed(seed)`` in float32 (the same on every device), then moved and cast.
    The transform is an addition, so its gradient is the identity.
    """

    name = "noise"
    keys = ("seed", "std")
    int_keys = frozenset({"seed"})
    no_kernel = (
        "family 'noise' draws its per-pixel noise from torch's CPU generator (one seed per sample); the fused "
        "kernels have no bit-identical generator, so it runs on the torch backend"
    )

    def sample(self, n, size, g, same, cfg):
        seed = _draw_int(g, 0, 2**62, n, same)
        return {"seed": seed, "std": torch.full((n,), float(cfg.noise), device=seed.device)}

    @staticmethod
    def noise(p, shape: tuple[int, int, int], dtype: torch.dtype, device) -> Tensor:
        """ε [n, C, H, W] (unit variance) of params ``p`` for images of per-sample shape (C, H, W)."""
        seeds = p.values["seed"].tolist()
        eps = torch.empty((len(seeds), *shape), dtype=torch.float32)
        g = torch.Generator()
        for i, s in enumerate(seeds):
            g.manual_seed(int(s))
            torch.randn(shape, generator=g, out=eps[i])
        return eps.to(device=device, dtype=dtype)

    def apply(self, x, p):
        eps = self.noise(p, tuple(x.shape[1:]), x.dtype, x.device)
        return x + _per_sample(p.values["std"], x) * eps
