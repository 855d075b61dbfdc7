"""Loads the compiled extension ``haba_fast._C`` once; warns once and reports unavailability on failure.

The extension registers its ops under ``torch.ops.haba_fast`` (TORCH_LIBRARY). Loading it is
deferred until an op first asks, so ``import haba_fast`` stays cheap and never fails.

libtorch has no stable C++ ABI across versions, so an extension compiled against one torch must not be
loaded into another (at best an undefined-symbol error, at worst a crash). The build records the torch it
compiled against in ``haba_fast/_build_info.py`` (written by setup.py beside ``_C``); before loading,
:func:`extension_available` compares that version with the running torch and refuses a mismatch with a
message saying how to rebuild. A build without the record (an older in-place build) is loaded as before.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any, Dict, Iterator, Optional, Sequence

_load_error: Optional[str] = None

REBUILD_HINT = (
    "rebuild it against the installed torch: `pip install --no-build-isolation .` in the source tree "
    "(or `pip install --no-build-isolation --force-reinstall --no-deps haba-fast-<version>.tar.gz`)"
)


def build_info() -> Optional[Dict[str, Any]]:
    """What ``haba_fast._C`` was compiled against, from ``haba_fast/_build_info.py``; None without a record.

    Returns:
        ``{"torch": "2.13.0+cpu", "cuda": None | "12.8", "compiler": "...", "cxx_flags": "..."}``.
    """
    try:
        from haba_fast import _build_info
    except ImportError:
        return None
    return {
        "torch": getattr(_build_info, "TORCH_VERSION", None),
        "cuda": getattr(_build_info, "TORCH_CUDA", None),
        "compiler": getattr(_build_info, "COMPILER", None),
        "cxx_flags": getattr(_build_info, "CXX_FLAGS", None),
    }


def _public_version(version: str) -> str:
    # "2.13.0+cpu" and "2.13.0+cu128" share libtorch's CPU ABI, which is all the extension links against.
    return str(version).split("+", 1)[0]


def abi_mismatch(built: Optional[str], running: str) -> Optional[str]:
    """Why an extension built against torch ``built`` cannot load into torch ``running``; None when it can.

    Versions are compared without their local label (``+cpu``, ``+cu128``); ``built`` None (no record)
    is not a mismatch.
    """
    if built is None or _public_version(built) == _public_version(running):
        return None
    return (
        f"the extension was built against torch {built}, but torch {running} is running "
        f"(the C++ ABI differs between torch versions); {REBUILD_HINT}"
    )


@functools.lru_cache(maxsize=None)
def extension_available() -> bool:
    """True when ``haba_fast._C`` imported and registered its ops (cached)."""
    global _load_error
    try:
        import torch  # loads libtorch, which _C links against

        info = build_info()
        mismatch = abi_mismatch(info["torch"] if info else None, torch.__version__)
        if mismatch is not None:
            _load_error = mismatch
        else:
            from haba_fast import _C  # noqa: F401
    except Exception as exc:  # ImportError (not built), or an undefined symbol from an unrecorded torch mismatch
        _load_error = f"{type(exc).__name__}: {exc} (to build it: `pip install --no-build-isolation .`)"
    if _load_error is None:
        _register_python_kernels()
    else:
        warnings.warn(
            f"haba_fast C++ extension not loaded ({_load_error}); falling back to the pure-PyTorch backend "
            "(several times slower on the CPU).",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


def _register_python_kernels() -> None:
    """The extension's ops implemented in Python (the trajectory op's Triton block kernels): registered once it has
    loaded. A failure here only costs those kernels (a warning), not the extension."""
    try:
        from haba_fast.ops import register_trajectory_block_kernels

        register_trajectory_block_kernels()
    except Exception as exc:
        warnings.warn(
            f"haba_fast: the trajectory op's Triton block kernels were not registered ({type(exc).__name__}: "
            f"{exc}); HABA_FAST_TRAJECTORY_FUSED=triton will say so, every other path is unaffected",
            RuntimeWarning,
            stacklevel=3,
        )


def extension_error() -> Optional[str]:
    """The reason the extension failed to load, or None (call ``extension_available`` first)."""
    return _load_error


@contextlib.contextmanager
def buffer_cache_scope() -> Iterator[None]:
    """Hold the C++ buffer cache's scope on this thread for the ``with`` block (csrc/buffer_cache.h): the per-step
    ops called inside it reuse each other's large CPU blocks (every step of a sweep allocates the same shapes)
    instead of each op call starting with an empty cache and paying fresh pages' faults. The free blocks go back to
    the system when the block ends. Nothing happens unless the cache is switched on (``HABA_FAST_BUFFER_CACHE=1``)
    and the extension has the ops."""
    if not has_op("buffer_cache_enter"):
        yield
        return
    import torch

    torch.ops.haba_fast.buffer_cache_enter()
    try:
        yield
    finally:
        torch.ops.haba_fast.buffer_cache_leave()


def buffer_cache_retain(sizes: Sequence[int] = ()) -> None:
    """Let free blocks of these byte sizes (one entry per block) in the C++ buffer cache outlive the last scope, so
    the next sweep reuses them instead of faulting in fresh pages (the exact engine's kept steps between
    iterations); no sizes hands them back to the system. Nothing happens unless the cache is switched on
    (``HABA_FAST_BUFFER_CACHE=1``) and the extension has the op."""
    if has_op("buffer_cache_retain"):
        import torch

        torch.ops.haba_fast.buffer_cache_retain([int(n) for n in sizes])


def buffer_cache_hold(on: bool) -> None:
    """While held, every free block of the C++ buffer cache outlives the last scope and serves the next scope
    (capped by ``HABA_FAST_BUFFER_CACHE_MB`` beyond the retained blocks); releasing it trims to the retained
    sizes. Nothing happens unless the cache is switched on (``HABA_FAST_BUFFER_CACHE=1``) and the extension has
    the op."""
    if has_op("buffer_cache_hold"):
        import torch

        torch.ops.haba_fast.buffer_cache_hold(bool(on))


_STAT_HELD, _STAT_FREE_CAP = 7, 8  # indices in buffer_cache_stats() (csrc/buffer_cache.h)


def _buffer_cache_stat(index: int) -> Optional[int]:
    """One counter of the C++ buffer cache (``buffer_cache_stats()[index]``); None where the extension lacks it."""
    if not has_op("buffer_cache_stats"):
        return None
    import torch

    stats = torch.ops.haba_fast.buffer_cache_stats()
    return int(stats[index]) if len(stats) > index else None


def buffer_cache_is_held() -> bool:
    """Whether the C++ buffer cache is switched on and held now (``buffer_cache_hold``)."""
    return bool(_buffer_cache_stat(_STAT_HELD))


class BatchBuffers:
    """The C++ buffer cache over a network's loop of batches on this thread (``train_network``, its test pass): a
    ``buffer_cache_scope()`` open while the batches have the loop's full size, so that each batch's large CPU blocks
    (activations, their gradients, the augmented batch) come back from the cache instead of as fresh pages (on the
    2-core dev VM, ConvNet-128 on 100 Fashion-MNIST- or CIFAR-shaped images or 500 CIFAR-shaped ones: 0.71-0.73x
    the CPU time, 4.5-5.0M page faults down to 0.18-0.30M, 4-9% more peak RSS; bench/train_buffers.py).

    The cache reuses a block for a request of the same size, and in this scope (``buffer_cache_fit(FIT)``, this
    thread) also for a request up to ``FIT`` times smaller that finds none of its size: so an epoch's ragged last
    batch of at least 1 / FIT of the full size runs in the full batches' blocks (a tensor may then sit in a block up
    to FIT times its size). The scope is handed back before a batch of any other size (a ragged one under 1 / FIT of
    the full size, a new full size), and by ``close()`` (the loop calls it before a test pass and before a user's
    callback): apart from what a kept ragged batch misses, blocks of two batch sizes are not held side by side by
    this loop. What runs while the scope is open on this thread (the next epoch's data provider) shares it, and its
    ratio. Free blocks go back to the system only when the last scope of the process ends: a scope held at the same
    time by another thread or by a caller keeps them until then. Nothing while a run holds the cache
    (``distill()``'s iterations, at budgets that can afford it: an evaluation's blocks must not join the blocks held
    for its steps), nor unless the cache is switched on (``HABA_FAST_BUFFER_CACHE=1``, the CLI's default). A loop
    whose ragged last batch is under half the full size reopens the scope every epoch, so it gains only within an
    epoch's full batches.

    Use::

        buffers = BatchBuffers()
        try:
            for x in batches:
                buffers.batch(x.shape[0], full_size)
                ...
        finally:
            buffers.close()
    """

    # A smaller batch (the ragged last one) draws from the full batches' blocks when they are at most this many
    # times larger than its requests (buffer_cache_fit); a batch smaller still closes the scope.
    FIT = 2.0

    def __init__(self):
        self._scope = contextlib.ExitStack()
        self._size: Optional[int] = None  # the batch size the open scope serves; None: closed

    @property
    def open(self) -> bool:
        """Whether the scope is open now."""
        return self._size is not None

    def batch(self, size: int, full_size: int) -> None:
        """Before each batch: keep the scope for its own size and for a smaller batch that its blocks fit, close it
        for any other size; open it for a full batch (unless a run holds the cache)."""
        # this loop's ragged batch, in the full batches' blocks (where the extension has buffer_cache_fit)
        fits = size < full_size == self._size <= self.FIT * size and has_op("buffer_cache_fit")
        if self.open and size != self._size and not fits:
            self.close()
        if size == full_size and not self.open and not buffer_cache_is_held():
            self._scope.enter_context(buffer_cache_scope())
            if has_op("buffer_cache_fit"):
                import torch

                previous = torch.ops.haba_fast.buffer_cache_fit(self.FIT)
                self._scope.callback(torch.ops.haba_fast.buffer_cache_fit, previous)  # restored before the leave
            self._size = size

    def close(self) -> None:
        """Hand the scope back (before a test pass or a callback, at the end)."""
        self._scope.close()
        self._size = None


def buffer_cache_free_cap() -> Optional[int]:
    """The bytes a scope of the C++ buffer cache may keep free beyond the retained blocks
    (``HABA_FAST_BUFFER_CACHE_MB``, default 4096 MiB, read now), or None where the extension lacks the counter."""
    return _buffer_cache_stat(_STAT_FREE_CAP)


class BufferCacheRun:
    """A run of iterations (``distill()``, ``bench iteration``) over the C++ buffer cache: ``hold()`` holds its free
    blocks from then on for the rest of the run (each step inside ``step()``, a ``buffer_cache_scope()``, so that all
    its large blocks on this thread come from the cache): every iteration allocates the same blocks again, so the
    steps work in resident pages instead of faulting fresh ones in (a fault and a page zeroing per 4 KiB; on a VM
    that hands freed guest pages back to its host, up to ~30 us each: bench/first_touch.py). Held or not, at the end
    every block, the kept steps' retained ones included, goes back to the system.

    Args:
        hold: hold from the start of the run.
    """

    def __init__(self, hold: bool = False):
        self._hold_at_start = bool(hold)
        self.held = False  # whether this run holds the cache now (a no-op with the cache switched off)

    def hold(self) -> None:
        """Hold the cache's free blocks for the rest of the run (call between steps)."""
        if not self.held:
            buffer_cache_hold(True)
            self.held = True

    def step(self) -> contextlib.AbstractContextManager:
        """One step of the run: inside a ``buffer_cache_scope()`` while the run holds the cache, else nothing (the
        engine's sweeps hold their own scopes)."""
        return buffer_cache_scope() if self.held else contextlib.nullcontext()

    def __enter__(self) -> "BufferCacheRun":
        if self._hold_at_start:
            self.hold()
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.held:
                buffer_cache_hold(False)
                self.held = False
        finally:
            buffer_cache_retain()


def has_op(name: str) -> bool:
    """True when the extension is loaded and registered ``torch.ops.haba_fast.<name>``."""
    if not extension_available():
        return False
    import torch

    return hasattr(torch.ops.haba_fast, name)
