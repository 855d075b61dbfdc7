"""Multi-process test harness: run a worker on K gloo ranks (torch.multiprocessing spawn) and collect its results.

Each worker is a module-level function ``fn(out_dir, *args) -> object``; ``run_ranks`` starts K processes with
torchrun's environment variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), each joins the group
through ``haba_fast.dist.init_from_env("cpu")`` with one intra-op thread, and saves its return value to
``<out_dir>/rank<r>.pt``; ``run_ranks`` returns the K values in rank order. ``run_ranks(fn, 1, ...)`` calls ``fn``
in this process (no group: the one-process path).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

MODEL = "ConvNetW32"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(local_rank: int, world: int, port: int, fn, out_dir: str, args: tuple) -> None:
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        HABA_FAST_DIST_TIMEOUT=os.environ.get("HABA_FAST_DIST_TIMEOUT", "60"),
    )
    import faulthandler

    from haba_fast import dist

    faulthandler.enable(all_threads=True)  # a rank killed by a signal (SIGABRT, SIGSEGV) prints every thread's stack
    torch.set_num_threads(1)
    assert dist.init_from_env("cpu")
    try:
        value = fn(out_dir, *args)
        torch.save(value, _result_file(out_dir, local_rank))
    except BaseException:
        dist.destroy(wait=False)
        raise
    dist.destroy()
    _left_file(out_dir, local_rank).touch()
    # The rank's result is saved and it has left the group: end the process here, without the interpreter's
    # teardown (static destructors of the communication library's threads), which is no part of what is tested.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _result_file(out_dir, r: int) -> Path:
    """Where rank ``r`` saves its return value."""
    return Path(out_dir) / f"rank{r}.pt"


def _left_file(out_dir, r: int) -> Path:
    """The file rank ``r`` creates once it has left the group."""
    return Path(out_dir) / f"rank{r}.left"


def _rank_stages(out_dir: Path, world: int) -> str:
    """How far each rank got, from the files ``_entry`` leaves: for the error of a rank that died."""
    stages = []
    for r in range(world):
        stage = (
            "left the group"
            if _left_file(out_dir, r).exists()
            else ("saved its result" if _result_file(out_dir, r).exists() else "did not save a result")
        )
        stages.append(f"rank {r} {stage}")
    return "; ".join(stages)


def run_ranks(fn, world: int, out_dir, *args) -> list:
    """``fn(out_dir, *args)`` on ``world`` gloo ranks; their return values in rank order. A rank that dies raises
    ``torch.multiprocessing.ProcessExitedException`` (or the rank's error), with how far every rank got."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if world == 1:
        return [fn(str(out_dir), *args)]
    for r in range(world):  # an earlier call's files in the same folder must not pass for this call's
        _result_file(out_dir, r).unlink(missing_ok=True)
        _left_file(out_dir, r).unlink(missing_ok=True)
    try:
        mp.start_processes(
            _entry, args=(world, free_port(), fn, str(out_dir), args), nprocs=world, start_method="spawn"
        )
    except mp.ProcessExitedException as exc:
        exc.add_note(f"{fn.__name__} on {world} ranks: {_rank_stages(out_dir, world)}")
        raise
    return [torch.load(_result_file(out_dir, r), weights_only=False) for r in range(world)]


# ----------------------------------------------------------------------------------------------------------------------
# Workers.


def collectives(out_dir: str) -> dict:
    from haba_fast import dist

    r, k = dist.rank(), dist.world_size()
    t = torch.full((3,), float(r + 1))
    dist.all_reduce_sum_(t)
    b = dist.broadcast(torch.full((2,), float(r)), src=k - 1)
    obj = dist.broadcast({"from": r}, src=0)
    gathered = dist.gather_objects(("rank", r))
    everyone = dist.all_gather_objects(r * 10)
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.full((2,), float(r + 1))
    q = torch.nn.Parameter(torch.zeros(1))  # no grad: skipped
    dist.all_reduce_grads_([p, q])
    a = torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.full((2,), float(r + 5))
    dist.broadcast_grads_([a])
    dist.barrier()
    return {
        "rank": r,
        "world": k,
        "is_main": dist.is_main(),
        "sum": t,
        "bcast": b,
        "obj": obj,
        "gathered": gathered,
        "everyone": everyone,
        "grad_sum": p.grad,
        "q_grad": q.grad,
        "grad_bcast": a.grad,
    }


def engine_inputs(dtype: torch.dtype, n_steps: int = 3, batch: int = 7):
    """Deterministic engine inputs: (model, X [N, B, 1, 8, 8], Y [N, B], w_start, w_target, lr)."""
    from haba_fast.models import flatten_params, get_network

    g = torch.Generator().manual_seed(0)
    model = get_network("ConvNetW32", 1, 4, (8, 8), generator=g, dtype=dtype)
    w_start = flatten_params(model).detach().to(dtype)
    w_target = w_start + 0.05 * torch.randn(w_start.shape, generator=g, dtype=dtype)
    X = torch.randn(n_steps, batch, 1, 8, 8, generator=g, dtype=dtype)
    Y = torch.randint(4, (n_steps, batch), generator=g)
    lr = torch.tensor(0.05, dtype=dtype)
    return model, X, Y, w_start, w_target, lr


def engine_grads(out_dir: str, engine: str, dtype: torch.dtype) -> dict:
    """Loss, dL/dX (this rank's rows, zero elsewhere) and this rank's share of dL/dlr."""
    from haba_fast.dist import BatchReducer
    from haba_fast.engines import NaiveEngine, get_adjoint_engine

    model, X, Y, w_start, w_target, lr = engine_inputs(dtype)
    X = X.requires_grad_(True)
    lr = lr.requires_grad_(True)
    eng = NaiveEngine() if engine == "naive" else get_adjoint_engine(engine, backend="torch")
    reducer = BatchReducer(X.shape[1])
    xs, ys = reducer.shard(X, Y)
    loss = eng(model, xs, ys, w_start, w_target, lr, reducer=reducer)
    loss.backward()
    return {"loss": loss.detach(), "dX": X.grad, "dlr": lr.grad, "rows": (reducer.lo, reducer.hi)}


def toy_buffer(dataset):
    """Two short expert trajectories by plain SGD (the in-memory buffer interface)."""
    from haba_fast.models import flatten_params, functional_forward, get_network

    class Buffer:
        def __init__(self, snaps):
            self.snaps = snaps
            self.num_trajectories, self.num_epochs = snaps.shape[0], snaps.shape[1] - 1

        def snapshot(self, traj, epoch):
            return self.snaps[traj, epoch].clone()

    g = torch.Generator().manual_seed(0)
    net = get_network(MODEL, dataset.channels, dataset.num_classes, dataset.im_size, generator=g)
    trajs = []
    for _ in range(2):
        w = flatten_params(net) + 0.01 * torch.randn(flatten_params(net).shape, generator=g)
        snaps = [w.clone()]
        for _epoch in range(3):
            idx = torch.randint(dataset.train_labels.numel(), (64,), generator=g)
            w = w.requires_grad_(True)
            loss = F.cross_entropy(functional_forward(net, w, dataset.train_images[idx]), dataset.train_labels[idx])
            (grad,) = torch.autograd.grad(loss, w)
            w = (w - 0.05 * grad).detach()
            snaps.append(w.clone())
        trajs.append(torch.stack(snaps))
    return Buffer(torch.stack(trajs))


def digits():
    from haba_fast import data

    return data.load("digits", subset_per_class=12, generator=torch.Generator().manual_seed(0))


def distill_config(**kw):
    from haba_fast.distill import DistillConfig

    base = dict(
        dataset="digits",
        model=MODEL,
        ipc=1,
        n_hallucinators=3,
        syn_steps=3,
        expert_epochs=1,
        max_start_epoch=2,
        iterations=2,
        engine="exact",
        device="cpu",
        num_eval=0,
        lr_img=100.0,
        lr_style=100.0,
        lr_lr=1e-5,
        lr_teacher=0.01,
        batch_syn=10,
        pix_init="real",
        seed=0,
    )
    base.update(kw)
    return DistillConfig(**base)


ENGINE_CASES = (("naive", torch.float64), ("naive", torch.float32), ("exact", torch.float64),
                ("exact", torch.float32), ("first-order", torch.float64))


def engine_grads_all(out_dir: str) -> dict:
    """:func:`engine_grads` of every ENGINE_CASES entry (one process start for all)."""
    return {case: engine_grads(out_dir, *case) for case in ENGINE_CASES}


def distiller_steps(out_dir: str) -> dict:
    """:func:`distiller_step` for HaBa and Pixels (exact engine), and HaBa with 2 segments per iteration."""
    out = {p: distiller_step(out_dir, "exact", p) for p in ("haba", "pixels")}
    out["haba_m2"] = distiller_step(out_dir, "exact", "haba", trajectories_per_iteration=2)
    return out


def distiller_step(out_dir: str, engine: str, parameterization: str, **kw) -> dict:
    """One Distiller iteration; the parameters after it and its metrics."""
    from haba_fast.distill import Distiller

    ds = digits()
    cfg = distill_config(engine=engine, parameterization=parameterization, **kw)
    d = Distiller(cfg, ds, toy_buffer(ds))
    if engine == "exact":
        d.engine = type(d.engine)(backend="torch")  # the 1-process reference uses the same implementation
    metrics = d.step()
    params = {name: p.detach().clone() for name, p in d.synthetic.named_parameters()}
    adv = [p.detach().clone() for p in d.adversary.parameters()] if d.adversary is not None else []
    return {"params": params, "syn_lr": d.syn_lr.detach().clone(), "metrics": metrics, "adversary": adv}


def distill_run(out_dir: str, sub: str, iterations: int, resume: bool) -> dict:
    """A HaBa run of ``iterations`` writing to ``out_dir/sub`` (rank 0 writes); this rank's history."""
    from haba_fast.distill import distill

    ds = digits()
    cfg = distill_config(parameterization="haba", checkpoint_every=1, iterations=iterations)
    res = distill(cfg, ds, toy_buffer(ds), Path(out_dir) / sub, resume=resume, progress=False, log=lambda s: None)
    return {"history": res.history, "syn_lr": res.syn_lr, "out_dir": res.out_dir}


def evaluate_runs(out_dir: str) -> dict:
    """evaluate_synthetic of a few real images on 2 models × 3 repeats (tiny)."""
    from haba_fast.evaluate import EvalConfig, evaluate_synthetic

    ds = digits()
    x, y = ds.train_images[:40], ds.train_labels[:40]
    cfg = EvalConfig(models=("ConvNetW32", "MLP"), num_eval=3, epochs=1, batch_size=20, dsa=False, device="cpu")
    seen = []
    res = evaluate_synthetic(
        (x, y), ds, cfg, lr=0.01, generator=torch.Generator().manual_seed(3), callback=lambda *a: seen.append(a)
    )
    return {"accuracies": res.accuracies, "local_calls": seen}


def train_buffers(out_dir: str, num_experts: dict, sub: str) -> None:
    """train_experts of tiny experts into ``out_dir/<fmt>_<sub>`` for each format (resumes what is there);
    ``num_experts``: format -> count."""
    from haba_fast.experts import ExpertConfig, train_experts

    ds = digits()
    for fmt, n in num_experts.items():
        cfg = ExpertConfig(
            model=MODEL, num_experts=n, epochs=2, batch_size=64, save_interval=2, seed=5, device="cpu",
            dsa_strategy="color_crop", test_every=0,
        )
        train_experts(ds, cfg, Path(out_dir) / f"{fmt}_{sub}", fmt=fmt, progress=False)
    return None


def train_buffers_slow_rank1(out_dir: str, num_experts: dict, sub: str) -> None:
    """train_buffers with rank 1's atomic writes held open 0.5 s (a slow rank): rank 0 must not remove a temp file
    rank 1 is still writing."""
    from haba_fast import dist

    if dist.rank() == 1:
        os.environ["HABA_FAST_IO_TEST_DELAY"] = "0.5"
    return train_buffers(out_dir, num_experts, sub)


def leave_in_turn(out_dir: str) -> bool:
    """Rank 1 arrives late at destroy() (after writing a marker); rank 0 leaves at once and then looks for the
    marker: destroy() waits for every rank, so rank 0 must see it."""
    import time

    from haba_fast import dist

    marker = Path(out_dir) / "rank1-arrived"
    if dist.rank() == 1:
        time.sleep(1.0)
        marker.write_text("here")
    dist.destroy()
    return marker.exists()


def abort_rank1(out_dir: str) -> int:
    """Rank 1 aborts (SIGABRT) after 2 s; rank 0 returns at once (its result is saved, then it waits to leave)."""
    import time

    from haba_fast import dist

    if dist.rank() == 1:
        time.sleep(2.0)
        os.abort()
    return dist.rank()
