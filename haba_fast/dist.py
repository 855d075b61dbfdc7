"""Every collective of a multi-process run, on PyTorch's own engine (``torch.distributed``, started by ``torchrun``).

One process (no ``torchrun``, or world size 1, or a process group never initialized) is the no-op path: every
function here works and does nothing collective (``rank() == 0``, ``world_size() == 1``, reductions return their
input), so callers call them unconditionally.

* :func:`init_from_env` joins the process group from torchrun's variables (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; ``env://``): NCCL for CUDA, gloo for the CPU, with a
  collective timeout (``$HABA_FAST_DIST_TIMEOUT`` seconds, default 600) so that a rank that died ends the job
  with an error instead of a hang.
* :func:`all_reduce_sum_`, :func:`broadcast`, :func:`gather_objects`, :func:`all_gather_objects`,
  :func:`barrier`, :func:`all_reduce_grads_`, :func:`broadcast_grads_`.
* :class:`BatchReducer`: data parallelism inside one unrolled step of trajectory matching. The batch of B
  samples is split into contiguous shards (rank r holds rows ``[r B / K, (r+1) B / K)``); each rank computes
  ``(B_r / B) · grad CE_r`` and one all-reduce (sum) gives every rank the full-batch gradient of the mean loss.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor

__all__ = [
    "BatchReducer",
    "DEFAULT_TIMEOUT_S",
    "all_gather_objects",
    "all_reduce_grads_",
    "all_reduce_sum_",
    "barrier",
    "broadcast",
    "broadcast_grads_",
    "destroy",
    "gather_objects",
    "init_from_env",
    "is_main",
    "main_weight",
    "payload_bytes",
    "print_main",
    "rank",
    "world_size",
]

DEFAULT_TIMEOUT_S = 600.0
_TIMEOUT_ENV = "HABA_FAST_DIST_TIMEOUT"


def _dist():
    import torch.distributed as dist

    return dist


def _active() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 on one process)."""
    return _dist().get_rank() if _active() else 0


def world_size() -> int:
    """Number of processes (1 on one process)."""
    return _dist().get_world_size() if _active() else 1


def is_main() -> bool:
    """True on rank 0: the process that writes files and logs.

    Before the process group is joined (a command's checks and warnings), torchrun's ``$RANK`` decides when
    ``$WORLD_SIZE`` > 1, so that a job prints its warnings once, not once per process.
    """
    return rank() == 0 if _active() else _launched_rank() == 0


def _launched_rank() -> int:
    """torchrun's ``$RANK`` when ``$WORLD_SIZE`` > 1, else 0 (a bad value is 0 here; init_from_env refuses it)."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


def print_main(*args, **kwargs) -> None:
    """``print`` on rank 0 only (one line per job, not one per process)."""
    if is_main():
        print(*args, **kwargs)


def main_weight() -> float:
    """1.0 on rank 0, 0.0 elsewhere: the weight of a loss term every rank computes in full (replicated), so that
    the gradient sum over ranks counts it once (exactly, unlike 1/K)."""
    return 1.0 if is_main() else 0.0


def _timeout_s() -> float:
    raw = os.environ.get(_TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"${_TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"${_TIMEOUT_ENV} must be > 0 seconds, got {raw!r}")
    return value


def init_from_env(device: Optional[str] = None) -> bool:
    """Join the process group torchrun describes in the environment; nothing when there is none.

    Args:
        device: the run's device (``"cuda"``, ``"cuda:0"``, ``"cpu"``; None: CUDA when available). CUDA uses
            NCCL and binds this process to GPU ``$LOCAL_RANK``; the CPU uses gloo.

    Returns:
        True when this process is one of several (a group was initialized, or already was), False on one process.

    Raises:
        ValueError: a bad ``$WORLD_SIZE`` / ``$RANK`` / ``$HABA_FAST_DIST_TIMEOUT``, or CUDA asked for but fewer GPUs
            than ``$LOCAL_RANK`` needs.
    """
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    raw = os.environ.get("WORLD_SIZE")
    if raw is None:
        return False
    try:
        size, r = int(raw), int(os.environ.get("RANK", "0"))
    except ValueError:
        raise ValueError(f"$WORLD_SIZE / $RANK must be integers, got {raw!r} / {os.environ.get('RANK')!r}") from None
    if size < 1 or not 0 <= r < size:
        raise ValueError(f"$WORLD_SIZE={size} and $RANK={r} do not describe a process group (need 0 <= RANK < SIZE)")
    if size == 1:
        return False
    if not dist.is_available():
        raise ValueError("this PyTorch build has no torch.distributed; run on one process")
    from haba_fast.devices import resolve_device

    cuda = resolve_device(device).type == "cuda"
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"$LOCAL_RANK={local} but this node has {torch.cuda.device_count()} GPU(s): start at most that many "
                "processes per node (torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(local)
    timeout = datetime.timedelta(seconds=_timeout_s())
    dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://", timeout=timeout)
    return True


_leave_rounds = 0  # destroy()'s waits in this process: each uses its own key, the same on every rank


def destroy(wait: bool = True) -> None:
    """Leave the process group (no-op on one process).

    ``wait`` (the normal exit): every rank first waits at a barrier, then, through the group's key-value store
    (:func:`_leave_together`), until every rank has returned from that barrier. A rank that tore the group down
    while a peer still read a message from it made the peer's transport thread abort its process ("terminate
    called without an active exception", SIGABRT): the barrier alone does not prevent it, since a rank returns from
    the barrier once it has heard from every peer, which can be before a peer has heard from it. The waits are
    bounded by the group's timeout; past it (a dead peer) the group is left anyway. ``wait=False``: leave at once
    (on an error path, where a peer may never arrive).
    """
    global _leave_rounds
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        try:
            if wait and dist.get_world_size() > 1:
                dist.barrier()
                _leave_rounds += 1
                store = dist.distributed_c10d._get_default_store()
                _leave_together(store, dist.get_world_size(), f"haba_fast/leave/{_leave_rounds}")
        except RuntimeError:
            pass  # a peer is gone: nothing to wait for; leave the group all the same
        finally:
            dist.destroy_process_group()


def _leave_together(store, world: int, key: str) -> None:
    """Return once all ``world`` ranks have called this with ``key``, through ``store`` (a
    ``torch.distributed.Store``) and not through the group's own connections, so that no rank is still reading a
    collective's message when this returns. Raises the store's error (a ``RuntimeError``) past its timeout."""
    if store.add(key, 1) == world:
        store.set(f"{key}/all", "1")
    store.wait([f"{key}/all"])


def barrier() -> None:
    """Wait for every rank."""
    if _active():
        _dist().barrier()


_payload_bytes = 0  # bytes of tensors this process handed to collectives (benchmarks read it: payload_bytes())


def payload_bytes() -> int:
    """Bytes of the tensors this process has passed to all-reduce / broadcast so far (0 on one process). A ring
    all-reduce of S bytes sends about 2 (K-1)/K · S bytes per rank over the network."""
    return _payload_bytes


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over ranks in place (every rank gets the sum); returns it."""
    global _payload_bytes
    if _active():
        _dist().all_reduce(tensor, op=_dist().ReduceOp.SUM)
        _payload_bytes += tensor.numel() * tensor.element_size()
    return tensor


def broadcast(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` on every rank: a tensor is overwritten in place (and returned); anything else is
    pickled (plain values, dicts of tensors)."""
    if not _active():
        return value
    dist = _dist()
    if isinstance(value, Tensor):
        global _payload_bytes
        dist.broadcast(value, src=src)
        _payload_bytes += value.numel() * value.element_size()
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def run_on_main(fn: Callable[[], Any], errors: tuple = (ValueError,)) -> Any:
    """``fn()`` on rank 0 alone; every rank returns its value (pickled) or raises the error of ``errors`` it
    raised, so that no rank waits at a later collective for a rank 0 that failed. One process: just ``fn()``."""
    outcome = None
    if is_main():
        try:
            outcome = ("ok", fn())
        except errors as exc:
            outcome = ("error", exc)
    kind, value = broadcast(outcome)
    if kind == "error":
        raise value
    return value


def gather_objects(value: Any, dst: int = 0) -> Optional[list]:
    """Every rank's ``value`` in rank order on rank ``dst`` (None on the others); ``[value]`` on one process."""
    if not _active():
        return [value]
    dist = _dist()
    out = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(value, out, dst=dst)
    return out


def all_gather_objects(value: Any) -> list:
    """Every rank's ``value`` in rank order, on every rank."""
    if not _active():
        return [value]
    dist = _dist()
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _flat_grads(params: Iterable[Tensor]) -> tuple[list[Tensor], Optional[Tensor]]:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return grads, None
    return grads, torch.cat([g.reshape(-1) for g in grads])


def _scatter_back(grads: list[Tensor], flat: Tensor) -> None:
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def all_reduce_grads_(params: Iterable[Tensor]) -> None:
    """Sum the ``.grad`` of ``params`` over ranks, in ONE collective on a flat buffer (parameters without a gradient
    are skipped: every rank runs the same graph, so they are the same on every rank). No-op on one process."""
    if not _active():
        return
    grads, flat = _flat_grads(params)
    if flat is not None:
        all_reduce_sum_(flat)
        _scatter_back(grads, flat)


def broadcast_grads_(params: Iterable[Tensor], src: int = 0) -> None:
    """Rank ``src``'s ``.grad`` of ``params`` on every rank (one collective): for replicated computations, so that
    the ranks stay bitwise in step. No-op on one process."""
    if not _active():
        return
    grads, flat = _flat_grads(params)
    if flat is not None:
        broadcast(flat, src=src)
        _scatter_back(grads, flat)


# ----------------------------------------------------------------------------------------------------------------------
# Data parallelism inside an unrolled step.


class _ReduceSum(torch.autograd.Function):
    """Forward: sum over ranks. Backward: identity (the result feeds a loss every rank computes in full)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return all_reduce_sum_(x.clone())

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class _Share(torch.autograd.Function):
    """Forward: identity (a replicated tensor used by this rank's shard). Backward: sum over ranks."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return all_reduce_sum_(grad.clone())


class BatchReducer:
    """How one unrolled step's batch is split over ranks, and how the per-step gradients are summed.

    Rank r of K holds rows ``[lo, hi) = [r B // K, (r+1) B // K)`` of every step's batch and weights its mean
    cross-entropy by ``weight = (hi - lo) / B``, so the sum over ranks of the weighted shard gradients is the
    gradient of the full batch's mean loss. On one process: all rows, weight 1.0, and every method is the identity.

    Args:
        batch: B, the samples per unrolled step.

    Raises:
        ValueError: fewer samples per step than ranks (a rank would hold none).
    """

    def __init__(self, batch: int):
        k, r = world_size(), rank()
        batch = int(batch)
        if batch < k:
            raise ValueError(
                f"the synthetic batch ({batch} samples per unrolled step) is smaller than the number of processes "
                f"({k}): every rank needs at least one sample; raise --batch_syn or start fewer processes"
            )
        self.batch = batch
        self.world_size = k
        self.lo, self.hi = r * batch // k, (r + 1) * batch // k
        self.weight = (self.hi - self.lo) / batch
        self.active = k > 1

    @classmethod
    def single(cls, batch: int) -> "BatchReducer":
        """The one-process reducer (all rows, weight 1.0, identity methods), whatever the process group."""
        self = cls.__new__(cls)
        self.batch, self.world_size, self.weight, self.active = int(batch), 1, 1.0, False
        self.lo, self.hi = 0, int(batch)
        return self

    def __repr__(self) -> str:
        return f"BatchReducer(rows [{self.lo}, {self.hi}) of {self.batch}, world size {self.world_size})"

    def shard(self, X: Tensor, Y: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's rows of every step: ``X [N, B, ...] -> [N, hi - lo, ...]``, ``Y [N, B] -> [N, hi - lo]``."""
        if not self.active:
            return X, Y
        return X[:, self.lo : self.hi], Y[:, self.lo : self.hi]

    def reduce_(self, t: Tensor) -> Tensor:
        """Sum ``t`` over ranks in place (no autograd)."""
        return all_reduce_sum_(t) if self.active else t

    def reduce(self, t: Tensor) -> Tensor:
        """Sum over ranks, differentiable: backward passes the gradient through unchanged (the caller's loss is
        replicated, so each rank's gradient of it is already the full one)."""
        return _ReduceSum.apply(t) if self.active else t

    def share(self, t: Tensor) -> Tensor:
        """A replicated tensor as used by this rank's shard, differentiable: backward sums the gradient over ranks
        (each rank's shard contributes its part)."""
        return _Share.apply(t) if self.active else t
