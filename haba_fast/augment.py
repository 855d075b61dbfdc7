"""Differentiable Siamese augmentation (DSA): sample parameters as data, then apply them.

Randomness is split from the transform (kornia's ``generate_parameters`` / ``apply_transform``):
``sample`` draws an :class:`AugParams` (one family, per-sample values) with an explicit
``torch.Generator``; ``apply`` transforms a batch under those params and is differentiable in the
images. Applying the same params to two batches is Siamese augmentation; replaying a step's params in
a backward pass reproduces its forward exactly.

Semantics follow the DSA reference (``DiffAugment`` / ``ParamDiffAug`` of the public MTT and HaBa code,
see docs/DESIGN.md), without its habit of reseeding the global RNG:

- mode ``"S"`` (default): one family is drawn, uniformly among the strategy's families, for the whole
  batch; its parameters are drawn per sample.
- mode ``"M"``: every family of the strategy, in order (a list of AugParams, applied in order).
- ``same_on_batch``: one draw broadcast to every sample (the reference's "batchmode").

Stored values are in the units of the default DSA constants (for color and flip: the uniform draws r
themselves), so ``apply`` needs no config: a non-default :class:`DSAConfig` is folded into the values
when sampling (see ``sample``), except the cutout ratio, which sets the hole size and travels as
``AugParams.cutout_ratio``.

Each family (its values, sampler, reference transform and kernel encoding) is one registered object in
``haba_fast.aug_families``; this module names none of them. ``FAMILIES`` are DSA's six; the registry also
holds ``noise`` (additive Gaussian noise, see ``aug_families.Noise``), usable in any strategy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import Tensor

from haba_fast.aug_families import family as _family
from haba_fast.aug_families import registered_families

__all__ = [
    "DEFAULT_STRATEGY",
    "FAMILIES",
    "MODES",
    "AugDtypeError",
    "AugParams",
    "DSAConfig",
    "apply",
    "augment",
    "parse_strategy",
    "sample",
    "strategy_families",
]

FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")  # DSA's families (the default strategy)
MODES = ("S", "M")
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
_NONE_STRATEGIES = ("", "none", "None")


def strategy_families() -> tuple[str, ...]:
    """Every family a strategy may name: the registered ones (haba_fast.aug_families) except ``identity``."""
    return tuple(f for f in registered_families() if f != "identity")


class AugDtypeError(TypeError, ValueError):
    """An augmentation value has the wrong dtype (a TypeError, and a ValueError for callers that catch those)."""


@dataclass(frozen=True)
class DSAConfig:
    """The DSA constants (defaults = the reference's ``ParamDiffAug``).

    Attributes:
        brightness: brightness shift x + (r − 0.5)·brightness.
        saturation: saturation factor r·saturation around the per-pixel channel mean.
        contrast: contrast factor r + contrast around the per-image mean.
        crop: crop pad ratio; shifts lie in [−s, s], s = int(H·crop + 0.5) (W for columns).
        cutout: cutout side ratio; the hole is int(H·cutout + 0.5) × int(W·cutout + 0.5).
        flip: flip probability (width axis).
        scale: scale ratio; sx, sy ~ U[1/scale, scale).
        rotate: maximal rotation in degrees; θ ~ U[−rotate, rotate).
        noise: std of the additive Gaussian noise of the ``noise`` family (DSA's ``ratio_noise``).
    """

    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    crop: float = 0.125
    cutout: float = 0.5
    flip: float = 0.5
    scale: float = 1.2
    rotate: float = 15.0
    noise: float = 0.05

    def __post_init__(self):
        for f in dataclasses.fields(self):
            name = f.name
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"DSAConfig.{name} must be a finite number, got {v!r}")
        if min(self.crop, self.rotate, self.brightness, self.saturation, self.contrast, self.noise) < 0:
            raise ValueError(f"DSAConfig ratios must be >= 0, got {self}")
        if not 0.0 <= self.cutout <= 1.0:
            raise ValueError(f"DSAConfig.cutout is a side ratio in [0, 1], got {self.cutout}")
        if not 0.0 <= self.flip <= 1.0:
            raise ValueError(f"DSAConfig.flip is a probability in [0, 1], got {self.flip}")
        if self.scale < 1.0:
            raise ValueError(f"DSAConfig.scale must be >= 1 (sx, sy ~ U[1/scale, scale)), got {self.scale}")


def _as_values(family: str, name: str, v) -> Tensor:
    """One per-sample value as a 1-D tensor of its dtype (int64 for the family's ``int_keys``, float otherwise)."""
    t = v if isinstance(v, Tensor) else torch.as_tensor(v)
    if t.dim() != 1:
        raise ValueError(
            f"AugParams.{family}: {name!r} must be a 1-D tensor [n] (one value per sample), got shape {tuple(t.shape)}"
        )
    if name in _family(family).int_keys:
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise AugDtypeError(
                f"AugParams.{family}: {name!r} holds integer values (pixel offsets, seeds); got dtype {t.dtype}, "
                "pass an integer tensor (e.g. torch.int64)"
            )
        return t.to(torch.int64)
    if t.dtype == torch.bool or t.is_complex():
        raise AugDtypeError(f"AugParams.{family}: {name!r} must be a real floating tensor, got dtype {t.dtype}")
    return t if t.is_floating_point() else t.to(torch.float32)


@dataclass(frozen=True, eq=False)
class AugParams:
    """Parameters of one augmentation family for a batch: per-sample tensors, all of shape [n].

    ``values`` holds the family's ``keys`` (``haba_fast.aug_families``), e.g. color: ``brightness``,
    ``saturation``, ``contrast`` (the uniform draws r, float); crop: ``tx``, ``ty`` (int64 shifts; rows shift
    with tx, columns with ty); cutout: ``ox``, ``oy`` (int64 hole centres); flip: ``r`` (float; flip where
    r < 0.5); scale: ``sx``, ``sy`` (float factors); rotate: ``theta`` (radians, float); noise: ``seed``
    (int64), ``std`` (float); identity: none.

    Build with the family constructors (``AugParams.crop(tx, ty)``, ...) rather than directly.
    A list or tuple of AugParams is a chain ("M" mode), applied in order.

    Attributes:
        family: a registered family name (``FAMILIES``, ``"noise"``, ``"identity"``).
        values: name -> [n] tensor.
        batch_size: n; inferred from ``values`` (required only for ``identity``).
        cutout_ratio: hole side ratio of a cutout (the DSA constant 0.5 unless sampled with another).
    """

    family: str
    values: dict[str, Tensor] = field(default_factory=dict)
    batch_size: int | None = None
    cutout_ratio: float = 0.5

    def __post_init__(self):
        expected = _family(self.family).keys  # ValueError naming the registered families
        if not isinstance(self.values, dict):
            raise TypeError(f"AugParams.values must be a dict of name -> tensor, got {type(self.values).__name__}")
        if set(self.values) != set(expected):
            raise ValueError(f"AugParams({self.family!r}) needs values {list(expected)}, got {sorted(self.values)}")
        # Own copy in constructor order, so that mutating the caller's dict cannot change these params.
        values = {k: _as_values(self.family, k, self.values[k]) for k in expected}
        object.__setattr__(self, "values", values)
        lengths = {k: int(v.shape[0]) for k, v in values.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"AugParams({self.family!r}): all values need the same length n, got {lengths}")
        devices = {v.device for v in values.values()}
        if len(devices) > 1:
            raise ValueError(
                f"AugParams({self.family!r}): values live on different devices {sorted(map(str, devices))}"
            )
        n = next(iter(lengths.values())) if lengths else self.batch_size
        if n is None:
            raise ValueError("AugParams('identity') needs batch_size (use AugParams.identity(n))")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"AugParams batch size must be an int >= 0, got {n!r}")
        if self.batch_size is not None and self.batch_size != n:
            raise ValueError(f"AugParams({self.family!r}): batch_size={self.batch_size} but the values have length {n}")
        object.__setattr__(self, "batch_size", n)
        ratio = self.cutout_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"AugParams.cutout_ratio must be a number in [0, 1], got {ratio!r}")
        object.__setattr__(self, "cutout_ratio", float(ratio))

    # ---- constructors -------------------------------------------------------------------------------
    @classmethod
    def color(cls, brightness, saturation, contrast) -> AugParams:
        """Color jitter from the uniform draws r [n] of each stage (default DSA constants apply)."""
        return cls("color", {"brightness": brightness, "saturation": saturation, "contrast": contrast})

    @classmethod
    def crop(cls, tx, ty) -> AugParams:
        """Integer translation [n] int64: out[i, j] = in[i + tx, j + ty], zero outside."""
        return cls("crop", {"tx": tx, "ty": ty})

    @classmethod
    def cutout(cls, ox, oy, ratio: float = 0.5) -> AugParams:
        """Cutout holes centred at rows ox, columns oy [n] int64; side = int(H·ratio + 0.5) (W for columns)."""
        return cls("cutout", {"ox": ox, "oy": oy}, cutout_ratio=ratio)

    @classmethod
    def flip(cls, r) -> AugParams:
        """Horizontal flip (width axis) where r [n] < 0.5."""
        return cls("flip", {"r": r})

    @classmethod
    def scale(cls, sx, sy) -> AugParams:
        """Scaling with the affine matrix [[sx, 0, 0], [0, sy, 0]] (sx along the width), [n] each."""
        return cls("scale", {"sx": sx, "sy": sy})

    @classmethod
    def rotate(cls, theta) -> AugParams:
        """Rotation by theta [n] radians: affine matrix [[cos, −sin, 0], [sin, cos, 0]]."""
        return cls("rotate", {"theta": theta})

    @classmethod
    def noise(cls, seed, std) -> AugParams:
        """Additive Gaussian noise x + std·ε, ε ~ N(0, 1) drawn from ``seed`` [n] int64; std [n] float."""
        return cls("noise", {"seed": seed, "std": std})

    @classmethod
    def identity(cls, n: int) -> AugParams:
        """No augmentation for a batch of n."""
        return cls("identity", {}, batch_size=n)

    # ---- batch manipulation -------------------------------------------------------------------------
    @property
    def n(self) -> int:
        """Batch size."""
        return self.batch_size

    @property
    def device(self) -> torch.device:
        """Device of the values (CPU for identity)."""
        return next(iter(self.values.values())).device if self.values else torch.device("cpu")

    def __len__(self) -> int:
        return self.batch_size

    def _replace(self, values: dict[str, Tensor], n: int) -> AugParams:
        return AugParams(self.family, values, batch_size=n, cutout_ratio=self.cutout_ratio)

    def __getitem__(self, idx) -> AugParams:
        """Select samples: an int (keeps the batch axis: n = 1), a slice, or an index / bool mask tensor or list."""
        if isinstance(idx, bool):
            raise TypeError("AugParams index must be an int, slice, or index tensor, not bool")
        if not isinstance(idx, (int, slice)):
            empty = isinstance(idx, (list, tuple)) and len(idx) == 0
            t = torch.zeros(0, dtype=torch.int64) if empty else torch.as_tensor(idx)
            if t.dtype == torch.bool and t.dim() == 1:
                if t.shape[0] != self.n:
                    raise ValueError(f"AugParams bool mask has length {t.shape[0]}, batch size is {self.n}")
            elif t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
                raise TypeError(f"AugParams index must be integer (or a 1-D bool mask), got {t.dtype}")
            elif t.dim() == 0:
                t = int(t)  # a 0-dim integer tensor or numpy integer: like an int
            elif t.dim() != 1:
                raise ValueError(f"AugParams index tensor must be 1-D, got shape {tuple(t.shape)}")
            idx = t.to(self.device) if isinstance(t, Tensor) else t
        if isinstance(idx, int):
            if not -self.n <= idx < self.n:
                raise IndexError(f"AugParams index {idx} out of range for batch size {self.n}")
            idx = slice(idx % self.n, idx % self.n + 1)
        n = int(torch.arange(self.n, device=self.device)[idx].numel())
        return self._replace({k: v[idx] for k, v in self.values.items()}, n)

    @staticmethod
    def cat(params: Sequence[AugParams]) -> AugParams:
        """Concatenate params of one family along the batch (on the first one's device)."""
        params = list(params)
        if not params or not all(isinstance(p, AugParams) for p in params):
            raise ValueError("AugParams.cat needs a non-empty list of AugParams")
        first = params[0]
        for p in params[1:]:
            if p.family != first.family:
                raise ValueError(f"AugParams.cat: cannot concatenate families {first.family!r} and {p.family!r}")
            if p.cutout_ratio != first.cutout_ratio:
                raise ValueError(f"AugParams.cat: cutout ratios differ ({first.cutout_ratio} vs {p.cutout_ratio})")
        dev = first.device
        values = {k: torch.cat([p.values[k].to(dev) for p in params]) for k in _family(first.family).keys}
        return first._replace(values, sum(p.n for p in params))

    def to(self, device) -> AugParams:
        """The same params with values on ``device``."""
        return self._replace({k: v.to(device) for k, v in self.values.items()}, self.n)


AugChain = Union[AugParams, list[AugParams], tuple[AugParams, ...]]


# ---- sampling ----------------------------------------------------------------------------------------
def parse_strategy(strategy: str) -> tuple[str, ...]:
    """Families of a DSA strategy string such as ``"color_crop_cutout_flip_scale_rotate"``.

    ``""``, ``"none"`` and ``"None"`` mean no augmentation (empty tuple). Order and repeats are kept.
    """
    if not isinstance(strategy, str):
        raise TypeError(f"DSA strategy must be a string like {DEFAULT_STRATEGY!r}, got {type(strategy).__name__}")
    if strategy in _NONE_STRATEGIES:
        return ()
    fams = tuple(strategy.split("_"))
    known = strategy_families()
    bad = [f for f in fams if f not in known]
    if bad:
        raise ValueError(
            f"unknown DSA family {bad[0]!r} in strategy {strategy!r}: families are {', '.join(known)} joined by '_' "
            f"(e.g. {DEFAULT_STRATEGY!r}), or 'none'"
        )
    return fams


def sample(
    strategy: str,
    n: int,
    size: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    mode: str = "S",
    same_on_batch: bool = False,
    device=None,
    config: DSAConfig = DSAConfig(),
) -> AugParams | list[AugParams]:
    """Draw DSA parameters for a batch of n images of spatial size (H, W).

    Args:
        strategy: families joined by ``_`` (``"color_crop_cutout_flip_scale_rotate"``); ``""``/``"none"``: identity.
        n: batch size.
        size: (H, W) of the images (crop and cutout ranges depend on them).
        generator: source of randomness; None uses a fresh generator seeded from OS entropy. The global
            RNG is never read or reseeded.
        mode: ``"S"``: one family, drawn uniformly among the strategy's, for the whole batch;
            ``"M"``: every family of the strategy in order.
        same_on_batch: one draw shared by all samples instead of one per sample.
        device: where the returned values live (default: the generator's device).
        config: the DSA constants.

    Returns:
        mode "S": an AugParams (``identity`` for an empty strategy); mode "M": a list of AugParams, one per
        family in strategy order (``[identity]`` for an empty strategy). Values are [n] tensors.
    """
    fams = parse_strategy(strategy)
    if mode not in MODES:
        raise ValueError(f"unknown DSA mode {mode!r}: choose 'S' (one family per batch) or 'M' (all families in order)")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"sample: n must be an int >= 0 (the batch size), got {n!r}")
    try:
        H, W = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"sample: size must be (H, W), two positive ints, got {size!r}") from None
    if H < 1 or W < 1 or any(isinstance(s, bool) or int(s) != s for s in size):
        raise ValueError(f"sample: size must be (H, W), two positive ints, got {size!r}")
    if not isinstance(config, DSAConfig):
        raise TypeError(f"sample: config must be a DSAConfig, got {type(config).__name__}")
    if generator is None:
        generator = torch.Generator(device=device if device is not None else "cpu")
        generator.seed()  # OS entropy; leaves the global RNG alone
    elif not isinstance(generator, torch.Generator):
        raise TypeError(f"sample: generator must be a torch.Generator or None, got {type(generator).__name__}")

    if not fams:
        ident = AugParams.identity(n)
        return [ident] if mode == "M" else ident
    same = bool(same_on_batch)
    if mode == "M":
        return [_sample_family(f, n, (H, W), generator, same, config, device) for f in fams]
    pick = int(torch.randint(len(fams), (1,), generator=generator, device=generator.device).item())
    return _sample_family(fams[pick], n, (H, W), generator, same, config, device)


def _sample_family(
    name: str, n: int, size: tuple[int, int], g: torch.Generator, same: bool, cfg: DSAConfig, device
) -> AugParams:
    fam = _family(name)
    p = AugParams(name, fam.sample(n, size, g, same, cfg), batch_size=n, **fam.static_params(cfg))
    return p.to(device) if device is not None else p


# ---- applying ----------------------------------------------------------------------------------------
def _check_chain(x: Tensor, params) -> None:
    from haba_fast.ops import _check_images  # late import, as in apply

    _check_images(x, "augment", AugDtypeError)
    chain = params if isinstance(params, (list, tuple)) else [params]
    for p in chain:
        if not isinstance(p, AugParams):
            raise TypeError(
                "augment: params must be an AugParams or a list/tuple of them (from augment.sample), "
                f"got {type(p).__name__}"
            )
        if p.n != x.shape[0]:
            raise ValueError(
                f"augment: params are for a batch of {p.n} ({p.family}) but the images have batch size {x.shape[0]}"
            )


def apply(x: Tensor, params: AugChain, *, backend: str | None = None) -> Tensor:
    """Augment ``x`` under ``params``; differentiable in ``x``. Also ``haba_fast.augment(x, params)``.

    Args:
        x: [n, C, H, W] floating images.
        params: an AugParams with ``n`` samples, or a list/tuple of them applied in order ("M" mode).
        backend: ``torch`` | ``cpu`` | ``triton`` | ``auto`` (None: $HABA_FAST_BACKEND, else auto).

    Returns:
        [n, C, H, W], same dtype and device as ``x`` (param values are moved to ``x``'s device).
    """
    _check_chain(x, params)
    from haba_fast import ops  # late import: ops may grow backends that import this module

    return ops.augment(x, params) if backend is None else ops.augment(x, params, backend=backend)


def augment(
    x: Tensor,
    strategy: str = DEFAULT_STRATEGY,
    *,
    generator: torch.Generator | None = None,
    mode: str = "S",
    same_on_batch: bool = False,
    config: DSAConfig = DSAConfig(),
) -> Tensor:
    """``apply(x, sample(strategy, n, (H, W), ...))`` for x [n, C, H, W].

    Params are drawn on the generator and moved to x's device.
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"augment: images must be a tensor [n, C, H, W], got {getattr(x, 'shape', type(x).__name__)}")
    params = sample(
        strategy,
        x.shape[0],
        tuple(x.shape[-2:]),
        generator=generator,
        mode=mode,
        same_on_batch=same_on_batch,
        device=x.device,
        config=config,
    )
    return apply(x, params)
