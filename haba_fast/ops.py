"""Public ops: ``generate``, ``augment``, ``generate_augment`` — one signature, three backends.

Backends (picked per call by ``haba_fast.backend.select_backend``; ``backend=`` or ``$HABA_FAST_BACKEND``
forces one):

- ``torch``: the pure-PyTorch reference (``haba_fast._reference``), any device and dtype.
- ``cpu``: fused C++ kernels (``csrc/genaug.cpp``) registered as ``torch.ops.haba_fast.*``; float32/float64.
- ``triton``: Triton kernels (``kernels/generate.py``, ``kernels/augment.py``) registered here as
  ``torch.ops.haba_fast_triton.*``; CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``); float32/float64.

Autograd goes through ``torch.library.register_autograd`` on the registered forward ops; their backward
calls the registered backward ops, asking only for the gradients ``ctx.needs_input_grad`` wants. Fake
(meta) implementations are registered too, so the ops trace under ``torch.compile`` and pass
``torch.library.opcheck``.

Every input is validated here, before any kernel runs: a bad shape, dtype, device or index raises a
``ValueError`` / ``TypeError`` that names the argument and the fix.

Augmentation parameters (``haba_fast.augment.AugParams``) are encoded per sample as ``fparams`` [n, 4]
(dtype of the images) and ``iparams`` [n, 4] int64 with a kernel code, by each family's ``encode``
(``haba_fast.aug_families``; the kernels' side: ``csrc/genaug_types.h``): the fused kernels read one row per
sample, so a whole batch with per-sample parameters is one pass. A family without a kernel encoding (its
``no_kernel`` says why) makes the dispatcher pick the torch backend for the call.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from typing import Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from haba_fast import _reference
from haba_fast.aug_families import KernelCode
from haba_fast.aug_families import family as _family
from haba_fast.backend import OpInputs, requested_backend, select_backend

__all__ = ["generate", "augment", "generate_augment"]

_FAST_DTYPES = (torch.float32, torch.float64)
_GEN_NAMES = ("bases", "enc_weight", "enc_bias", "scale", "shift", "dec_weight", "dec_bias")


# ---- validation ---------------------------------------------------------------------------------------
_VALUES_CHECKED = contextvars.ContextVar("haba_fast_values_checked", default=False)


@contextlib.contextmanager
def values_checked() -> Iterator[None]:
    """Inside this block the ops skip the checks that read a value back from the device (on CUDA, a sync per call):
    generate's index bounds and augment's parameter finiteness. For callers that checked those values once, on the
    host (``haba_fast.objectives.mtt.check_plan``: a step plan per iteration, before it moves to the GPU); shapes,
    dtypes and devices are still checked. Per thread of execution (a ``contextvars`` variable)."""
    token = _VALUES_CHECKED.set(True)
    try:
        yield
    finally:
        _VALUES_CHECKED.reset(token)


def check_index_bounds(
    base_idx: Tensor, hall_idx: Optional[Tensor], num_bases: int, n_hallucinators: int, op: str
) -> None:
    """ValueError unless ``base_idx`` [n] lies in [0, num_bases) and ``hall_idx`` [n] (None: not checked) in
    [0, n_hallucinators).

    One host read for all the bounds (on CUDA each ``int(t.min())`` would be a device sync of its own)."""
    if not base_idx.numel():
        return
    named = [("base_idx", base_idx, num_bases)]
    if hall_idx is not None:
        named.append(("hall_idx", hall_idx, n_hallucinators))
    bounds = torch.stack([b for _, t, _ in named for b in (t.min(), t.max())]).tolist()
    for i, (name, _, limit) in enumerate(named):
        lo, hi = bounds[2 * i : 2 * i + 2]
        if lo < 0 or hi >= limit:
            raise ValueError(f"{op}: {name} values must lie in [0, {limit}), got range [{lo}, {hi}]")


def check_augment_params(params, op: str = "augment") -> None:
    """ValueError (naming ``op``) if a floating parameter of ``params`` (an AugParams or a list of them) is NaN or Inf:
    the kernels' bilinear taps would fall outside the image and silently give zeros (the reference gives NaN). One
    host read."""
    floats = [
        (p.family, k, v) for p in _chain(params) for k, v in p.values.items() if v.is_floating_point() and v.numel()
    ]
    if floats and not bool(torch.stack([torch.isfinite(v).all().to(floats[0][2].device) for _, _, v in floats]).all()):
        bad = [f"{fam}.{k}" for fam, k, v in floats if not bool(torch.isfinite(v).all())]
        raise ValueError(f"{op}: parameters {', '.join(bad)} contain NaN or Inf (sample them from finite ranges)")


def _check_generate(bases, enc_weight, enc_bias, scale, shift, dec_weight, dec_bias, base_idx, hall_idx):
    """Validate generate's inputs; return all nine, in order, with base_idx and hall_idx as int64."""
    tensors = (bases, enc_weight, enc_bias, scale, shift, dec_weight, dec_bias)
    for name, t in zip(_GEN_NAMES, tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"generate: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"generate: {name} must be floating point (float32/float64), got {t.dtype}")
    for name, t in zip(_GEN_NAMES[1:], tensors[1:]):
        if t.dtype != bases.dtype:
            raise TypeError(f"generate: {name} has dtype {t.dtype} but bases has {bases.dtype}; cast them to one dtype")
        if t.device != bases.device:
            raise ValueError(
                f"generate: {name} is on {t.device} but bases is on {bases.device}; move them to one device"
            )
    if bases.dim() != 4:
        raise ValueError(f"generate: bases must be [M, c_b, H, W], got shape {tuple(bases.shape)}")
    if enc_weight.dim() != 5 or enc_weight.shape[-1] != enc_weight.shape[-2]:
        raise ValueError(f"generate: enc_weight must be [Hn, C, c_b, k, k], got shape {tuple(enc_weight.shape)}")
    M, cb, H, W = bases.shape
    Hn, C, cbw, k, _ = enc_weight.shape
    if cbw != cb:
        raise ValueError(f"generate: enc_weight has {cbw} input channels but bases have c_b={cb}")
    if k < 1:  # the C++ kernel would return dec_bias alone; the reference conv raises
        raise ValueError(f"generate: enc_weight's kernel size k must be >= 1, got shape {tuple(enc_weight.shape)}")
    if k > H or k > W:
        raise ValueError(f"generate: kernel size {k} exceeds the image size {H}x{W}")
    Ho, Wo = H - k + 1, W - k + 1
    expect = {
        "enc_bias": (Hn, C),
        "scale": (Hn, C, Ho, Wo),
        "shift": (Hn, C, Ho, Wo),
        "dec_weight": (Hn, C, C, k, k),
        "dec_bias": (Hn, C),
    }
    for name, t in zip(_GEN_NAMES[2:], tensors[2:]):
        if tuple(t.shape) != expect[name]:
            raise ValueError(
                f"generate: {name} must have shape {expect[name]} (from bases {tuple(bases.shape)} and "
                f"enc_weight {tuple(enc_weight.shape)}), got {tuple(t.shape)}"
            )
    idx = []
    for name, t in (("base_idx", base_idx), ("hall_idx", hall_idx)):
        if not isinstance(t, Tensor):
            raise TypeError(f"generate: {name} must be an int64 tensor [n], got {type(t).__name__}")
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise TypeError(f"generate: {name} must be an integer tensor (int64), got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"generate: {name} must be 1-D [n], got shape {tuple(t.shape)}")
        if t.device != bases.device:
            raise ValueError(f"generate: {name} is on {t.device} but bases is on {bases.device}")
        idx.append(t.to(torch.int64))
    if idx[0].shape != idx[1].shape:
        raise ValueError(f"generate: base_idx ({idx[0].shape[0]}) and hall_idx ({idx[1].shape[0]}) differ in length")
    if not _VALUES_CHECKED.get():
        check_index_bounds(idx[0], idx[1], M, Hn, "generate")
    return (*tensors, idx[0], idx[1])


def _chain(params) -> List:
    """``params`` as a list of AugParams (TypeError for anything else)."""
    chain = list(params) if isinstance(params, (list, tuple)) else [params]
    for p in chain:
        if not (hasattr(p, "family") and hasattr(p, "values") and hasattr(p, "n")):
            raise TypeError(f"augment: params must be an AugParams or a list/tuple of them, got {type(p).__name__}")
    return chain


def _checked_chain(params) -> List:
    """``_chain`` and, unless under :func:`values_checked`, the finiteness check."""
    out = _chain(params)
    if not _VALUES_CHECKED.get():
        check_augment_params(out)
    return out


def _check_images(x, op: str = "augment", dtype_error: type = TypeError) -> None:
    """Images must be a floating tensor [n, C, H, W] (``haba_fast.augment.apply`` passes its AugDtypeError)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: images must be a tensor [n, C, H, W], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op}: images must be [n, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise dtype_error(f"{op}: images must be floating point (float32/float64/...), got {x.dtype}")


def _encode(p, n: int, H: int, W: int, dtype: torch.dtype, device) -> Tuple[int, Tensor, Tensor]:
    """One AugParams -> (kernel code, fparams [n, 4] dtype, iparams [n, 4] int64) on ``device``, by its family."""
    if p.n != n:
        raise ValueError(f"augment: params ({p.family}) are for a batch of {p.n}, the images have {n}")
    fp = torch.zeros(n, 4, dtype=dtype, device=device)
    ip = torch.zeros(n, 4, dtype=torch.int64, device=device)
    code = _family(p.family).encode(p.to(device), H, W, fp, ip)
    return int(code), fp, ip


def _pick(op: str, x: Tensor, backend: Optional[str], chain=()) -> str:
    """select_backend on the call's device, dtype and augmentation families (a dtype the kernels lack: TypeError)."""
    inputs = OpInputs(x.device, x.dtype, tuple(p.family for p in chain))
    asked = requested_backend(backend)
    if asked in ("cpu", "triton") and x.dtype not in _FAST_DTYPES:
        raise TypeError(
            f"{op}: backend {asked!r} supports float32/float64, got {x.dtype}; use backend='torch' or cast the inputs"
        )
    name = select_backend(op, inputs, backend)
    if name == "cpu":
        _register_cpu()
    return name


# ---- registration: autograd + fake kernels for the C++ (haba_fast) and Triton (haba_fast_triton) ops -----
# ``fused``: the namespace has generate_augment[_backward] (the C++ one; Triton runs generate, then augment).
def _register_autograd(ns: str, fused: bool = True) -> None:
    lib = getattr(torch.ops, ns)

    def gen_setup(ctx, inputs, output):
        bases, ew, eb, sc, sh, dw, _db, bidx, hidx = inputs[:9]
        ctx.aug = tuple(inputs[9:])  # (family, fparams, iparams) for generate_augment, () for generate
        ctx.save_for_backward(bases, ew, eb, sc, sh, dw, bidx, hidx)

    def gen_backward(ctx, grad):
        bases, ew, eb, sc, sh, dw, bidx, hidx = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_bases, need_hall = bool(need[0]), any(need[1:7])
        n_in = 9 + len(ctx.aug)
        if not (need_bases or need_hall):
            return (None,) * n_in
        if ctx.aug:
            fam, fp, ip = ctx.aug
            r = lib.generate_augment_backward(
                grad, bases, ew, eb, sc, sh, dw, bidx, hidx, fam, fp, ip, need_bases, need_hall
            )
        else:
            r = lib.generate_backward(grad, bases, ew, eb, sc, sh, dw, bidx, hidx, need_bases, need_hall)
        grads = [r[0] if need_bases else None] + [r[i] if need[i] else None for i in range(1, 7)]
        return tuple(grads) + (None,) * (n_in - 7)

    def aug_setup(ctx, inputs, output):
        _, fam, fp, ip = inputs
        ctx.fam = fam
        ctx.save_for_backward(fp, ip)

    def aug_backward(ctx, grad):
        fp, ip = ctx.saved_tensors
        gx = lib.augment_backward(grad, ctx.fam, fp, ip) if ctx.needs_input_grad[0] else None
        return gx, None, None, None

    torch.library.register_autograd(f"{ns}::generate", gen_backward, setup_context=gen_setup)
    torch.library.register_autograd(f"{ns}::augment", aug_backward, setup_context=aug_setup)
    if fused:
        torch.library.register_autograd(f"{ns}::generate_augment", gen_backward, setup_context=gen_setup)


def _gen_backward_fake(grad, bases, ew, eb, sc, sh, dw, bidx, hidx, need_bases, need_hall):
    e = bases.new_empty((0,))
    gb = torch.empty_like(bases) if need_bases else e
    if need_hall:
        Hn, C = eb.shape
        hall = [
            torch.empty_like(ew),
            torch.empty_like(eb),
            torch.empty_like(sc),
            torch.empty_like(sh),
            torch.empty_like(dw),
            bases.new_empty((Hn, C)),
        ]
    else:
        hall = [bases.new_empty((0,)) for _ in range(6)]
    return (gb, *hall)


def _register_fakes(ns: str, fused: bool = True) -> None:
    def generate_fake(bases, ew, eb, sc, sh, dw, db, bidx, hidx, *aug):  # aug: (family, fparams, iparams) or ()
        return bases.new_empty((bidx.shape[0], ew.shape[1], bases.shape[2], bases.shape[3]))

    def generate_augment_backward_fake(*args):  # generate_backward's arguments with (family, fparams, iparams) at 9
        return _gen_backward_fake(*args[:9], *args[12:])

    def augment_fake(x, fam, fp, ip):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    torch.library.register_fake(f"{ns}::generate", generate_fake)
    torch.library.register_fake(f"{ns}::generate_backward", _gen_backward_fake)
    torch.library.register_fake(f"{ns}::augment", augment_fake)
    torch.library.register_fake(f"{ns}::augment_backward", augment_fake)
    if fused:
        torch.library.register_fake(f"{ns}::generate_augment", generate_fake)
        torch.library.register_fake(f"{ns}::generate_augment_backward", generate_augment_backward_fake)


@functools.lru_cache(maxsize=None)
def _register_cpu() -> None:
    """Wire fake kernels and autograd onto the C++ ops once the extension has loaded (idempotent)."""
    _register_fakes("haba_fast")
    _register_autograd("haba_fast")


# Triton ops: thin custom ops around the launchers; triton itself is imported only when one runs.
@torch.library.custom_op("haba_fast_triton::generate", mutates_args=())
def _tr_generate(
    bases: Tensor,
    enc_weight: Tensor,
    enc_bias: Tensor,
    scale: Tensor,
    shift: Tensor,
    dec_weight: Tensor,
    dec_bias: Tensor,
    base_idx: Tensor,
    hall_idx: Tensor,
) -> Tensor:
    from haba_fast.kernels.generate import generate_forward

    return generate_forward(bases, enc_weight, enc_bias, scale, shift, dec_weight, dec_bias, base_idx, hall_idx)


@torch.library.custom_op("haba_fast_triton::generate_backward", mutates_args=())
def _tr_generate_backward(
    grad: Tensor,
    bases: Tensor,
    enc_weight: Tensor,
    enc_bias: Tensor,
    scale: Tensor,
    shift: Tensor,
    dec_weight: Tensor,
    base_idx: Tensor,
    hall_idx: Tensor,
    need_bases: bool,
    need_hall: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from haba_fast.kernels.generate import generate_backward

    return tuple(
        generate_backward(
            grad, bases, enc_weight, enc_bias, scale, shift, dec_weight, base_idx, hall_idx, need_bases, need_hall
        )
    )


@torch.library.custom_op("haba_fast_triton::augment", mutates_args=())
def _tr_augment(x: Tensor, family: int, fparams: Tensor, iparams: Tensor) -> Tensor:
    from haba_fast.kernels.augment import augment_forward

    return augment_forward(x, family, fparams, iparams)


@torch.library.custom_op("haba_fast_triton::augment_backward", mutates_args=())
def _tr_augment_backward(grad: Tensor, family: int, fparams: Tensor, iparams: Tensor) -> Tensor:
    from haba_fast.kernels.augment import augment_backward

    return augment_backward(grad, family, fparams, iparams)


_register_fakes("haba_fast_triton", fused=False)
_register_autograd("haba_fast_triton", fused=False)


# The C++ trajectory op's Triton block kernels (kernels/trajectory_block.py): implementations of two schemas the
# extension declares (trajectory_block_forward_kernel / _backward_kernel), which the op calls through the dispatcher
# when HABA_FAST_TRAJECTORY_FUSED=triton. Registered for CUDA tensors, and for CPU tensors when TRITON_INTERPRET=1
# is set at registration (the interpreter; tests).
_trajectory_block_lib: Optional[torch.library.Library] = None

# The C++ op's variable choosing who runs a block's norm/activation/pooling (csrc/trajectory.cpp, block_impl), by
# name: default (the fused CPU loops on CPU tensors, ATen ops on CUDA), aten (ATen ops everywhere), triton.
BLOCK_KERNELS_ENV = "HABA_FAST_TRAJECTORY_FUSED"
BLOCK_KERNELS = {"default": "1", "aten": "0", "triton": "triton"}


def block_kernels_in_use() -> str:
    """The block implementation the environment asks the C++ op for: ``default`` | ``aten`` | ``triton``."""
    value = os.environ.get(BLOCK_KERNELS_ENV)
    return next((k for k, v in BLOCK_KERNELS.items() if v == value and k != "default"), "default")


@contextlib.contextmanager
def block_kernels(name: Optional[str]) -> Iterator[None]:
    """Run the ``with`` block with the C++ op's blocks as ``name`` (a key of ``BLOCK_KERNELS``; None: as the
    environment says), restoring the variable after it."""
    if name is None:
        yield
        return
    if name not in BLOCK_KERNELS:
        raise ValueError(f"block kernels: {name!r} is not one of {sorted(BLOCK_KERNELS)}")
    previous = os.environ.get(BLOCK_KERNELS_ENV)
    os.environ[BLOCK_KERNELS_ENV] = BLOCK_KERNELS[name]
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(BLOCK_KERNELS_ENV, None)
        else:
            os.environ[BLOCK_KERNELS_ENV] = previous


def trajectory_block_kernel_devices() -> List[str]:
    """The dispatch keys (``CUDA``, ``CPU``) the Triton block kernels are registered for (empty: none)."""
    name = "haba_fast::trajectory_block_forward_kernel"
    try:
        return [k for k in ("CUDA", "CPU") if torch._C._dispatch_has_kernel_for_dispatch_key(name, k)]
    except RuntimeError:  # the extension (and so the schema) is not loaded
        return []


def _trajectory_block_forward(*args) -> None:
    from haba_fast.kernels.trajectory_block import trajectory_block_forward

    trajectory_block_forward(*args)


def _trajectory_block_backward(*args) -> None:
    from haba_fast.kernels.trajectory_block import trajectory_block_backward

    trajectory_block_backward(*args)


def register_trajectory_block_kernels() -> None:
    """Register the Triton block kernels with the loaded extension (idempotent; called when it loads). Nothing to
    register when Triton is not installed or the extension lacks the schemas; triton itself is imported only when
    one runs."""
    global _trajectory_block_lib
    if _trajectory_block_lib is not None or importlib.util.find_spec("triton") is None:
        return
    if not hasattr(torch.ops.haba_fast, "trajectory_block_forward_kernel"):
        return
    lib = torch.library.Library("haba_fast", "IMPL")
    devices = ["CUDA"] + (["CPU"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    for device in devices:
        lib.impl("trajectory_block_forward_kernel", _trajectory_block_forward, device)
        lib.impl("trajectory_block_backward_kernel", _trajectory_block_backward, device)
    _trajectory_block_lib = lib


def _lib(name: str):
    return torch.ops.haba_fast if name == "cpu" else torch.ops.haba_fast_triton


# ---- public ops -------------------------------------------------------------------------------------------
def generate(
    bases: Tensor,
    enc_weight: Tensor,
    enc_bias: Tensor,
    scale: Tensor,
    shift: Tensor,
    dec_weight: Tensor,
    dec_bias: Tensor,
    base_idx: Tensor,
    hall_idx: Tensor,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """Hallucinate one sample per (basis, hallucinator) pair: out[i] = dec_h(scale_h ⊙ enc_h(bases[b]) + shift_h).

    Args:
        bases: [M, c_b, H, W] float32/float64.
        enc_weight: [Hn, C, c_b, k, k]; enc_bias: [Hn, C].
        scale, shift: [Hn, C, H-k+1, W-k+1].
        dec_weight: [Hn, C, C, k, k] (ConvTranspose2d layout [in, out, k, k]); dec_bias: [Hn, C].
        base_idx, hall_idx: [n] int64; b = base_idx[i] in [0, M), h = hall_idx[i] in [0, Hn). Any mix, repeats ok.
        backend: ``torch`` | ``cpu`` | ``triton`` | ``auto`` (None: $HABA_FAST_BACKEND, else auto).

    Returns:
        [n, C, H, W], dtype of ``bases``; differentiable in bases and every hallucinator parameter.
    """
    gen = _check_generate(bases, enc_weight, enc_bias, scale, shift, dec_weight, dec_bias, base_idx, hall_idx)
    name = _pick("generate", bases, backend)
    if name == "torch":
        return _reference.generate_reference(*gen)
    return _lib(name).generate(*gen)


def augment(x: Tensor, params, *, backend: Optional[str] = None) -> Tensor:
    """DSA-augment ``x`` under explicit per-sample parameters.

    Args:
        x: [n, C, H, W] floating images.
        params: an ``AugParams`` (one family, values [n]) or a list/tuple of them applied in order ("M" mode).
        backend: as in :func:`generate`.

    Returns:
        [n, C, H, W], a new tensor of ``x``'s dtype and device; differentiable in ``x``.
    """
    _check_images(x)
    chain = _checked_chain(params)
    name = _pick("augment", x, backend, chain)
    if name == "torch":
        return _reference.augment_reference(x, chain if isinstance(params, (list, tuple)) else params)
    n, _, H, W = x.shape
    out = x
    for p in chain:
        fam, fp, ip = _encode(p, n, H, W, x.dtype, x.device)
        out = _lib(name).augment(out, fam, fp, ip)
    return out if out is not x else x.clone()


def generate_augment(
    bases: Tensor,
    enc_weight: Tensor,
    enc_bias: Tensor,
    scale: Tensor,
    shift: Tensor,
    dec_weight: Tensor,
    dec_bias: Tensor,
    base_idx: Tensor,
    hall_idx: Tensor,
    params,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """``augment(generate(...), params)``; on the C++ backend one fused pass per sample (the chain's first family).

    On the Triton backend it runs the generate op, then the augment op per family (not fused there); on the torch
    backend it is the reference of each.

    Args: as :func:`generate`, plus ``params`` as in :func:`augment` (n = len(base_idx)).

    Returns:
        [n, C, H, W]; differentiable in bases and every hallucinator parameter.
    """
    gen = _check_generate(bases, enc_weight, enc_bias, scale, shift, dec_weight, dec_bias, base_idx, hall_idx)
    chain = _checked_chain(params)
    name = _pick("generate_augment", bases, backend, chain)
    if name == "torch":
        return _reference.augment_reference(_reference.generate_reference(*gen), chain)
    n, H, W = base_idx.shape[0], bases.shape[2], bases.shape[3]
    lib, rest, fam = _lib(name), list(chain), KernelCode.IDENTITY
    if name == "cpu" and rest:  # the chain's first family fused into generate's pass (Triton: generate, then each)
        fam, fp, ip = _encode(rest.pop(0), n, H, W, bases.dtype, bases.device)
    out = lib.generate(*gen) if fam == KernelCode.IDENTITY else lib.generate_augment(*gen, fam, fp, ip)
    for p in rest:
        fam, fp, ip = _encode(p, n, H, W, out.dtype, out.device)
        out = lib.augment(out, fam, fp, ip)
    return out

