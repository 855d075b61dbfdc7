"""The engine's scoped CPU buffer cache (csrc/buffer_cache.cpp): same results, blocks reused, nothing kept after.

The cache only changes where large activations live, so a trajectory computed with it must equal the one computed
without it bit for bit; a kernel that read memory it never wrote would differ between fresh zeroed pages (cache off)
and recycled dirty blocks (cache on). It is opt-in (HABA_FAST_BUFFER_CACHE=1; the CLI sets it for its own process):
off, the process-wide CPU allocator is never replaced; on, only the engine's own thread draws from it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from test_adjoint import _convnet, make_problem
from test_distill import buffer, digits  # noqa: F401  (module fixtures reused)
from utils import requires_ext

from haba_fast._ext import has_op
from haba_fast.engines.adjoint import cpp_spec

pytestmark = [
    requires_ext,
    pytest.mark.skipif(not has_op("buffer_cache_stats"), reason="C++ extension without the buffer cache"),
]

HITS, MISSES, FREE_BYTES, LIVE, SCOPES, INSTALLED, RETAINED, HELD, FREE_CAP = range(9)
MIB = 1 << 20


@pytest.fixture(autouse=True)
def _nothing_retained_after():
    """Retention and holding are process-wide: no test leaves blocks retained or held for the next one."""
    yield
    torch.ops.haba_fast.buffer_cache_hold(False)
    torch.ops.haba_fast.buffer_cache_retain([])


def stats():
    return list(torch.ops.haba_fast.buffer_cache_stats())


def problem(seed=0):
    """A trajectory whose activations are over the cache's 1 MiB threshold (conv outputs of 2-4 MiB)."""
    model = _convnet(channel=3, width=32, depth=2, im=16, k=3, dtype=torch.float32, seed=seed)
    X, Y, w_start, w_target = make_problem(model, n_steps=3, batch=32, im_size=(16, 16), dtype=torch.float32,
                                           seed=seed)
    return cpp_spec(model), X, Y, w_start, w_target


def run(spec, X, Y, w_start, w_target):
    """(loss, dL/dX, dL/dlr) of the exact engine's op."""
    Xr = X.clone().requires_grad_(True)
    lr = torch.tensor(0.05, requires_grad=True)
    loss = torch.ops.haba_fast.trajectory_match(Xr, Y, w_start, w_target, lr, spec, False)
    loss.backward()
    return loss.detach(), Xr.grad, lr.grad


def test_results_are_bitwise_equal_with_and_without_the_cache(monkeypatch):
    args = problem()
    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE", "0")
    off = run(*args)
    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE", "1")
    on = run(*args)
    on_again = run(*args)  # the second call starts from blocks the first one dirtied
    for a, b, c in zip(off, on, on_again):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_blocks_are_reused_within_a_call_and_released_after(monkeypatch):
    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE", "1")
    args = problem()
    before = stats()
    out = run(*args)
    after = stats()
    assert after[INSTALLED] == 1
    assert after[HITS] - before[HITS] > 0, "no block was reused across the steps"
    assert after[FREE_BYTES] == 0, "the cache kept free blocks after the engine call"
    assert after[SCOPES] == 0
    # Blocks handed out inside the call and still alive (the returned dL/dX) are freed normally later.
    live = after[LIVE]
    del out
    assert stats()[LIVE] < live or live == 0


def test_disabled_cache_does_not_reuse(monkeypatch):
    args = problem()
    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE", "1")
    run(*args)  # installs the wrapper so that the counters exist
    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE", "0")
    before = stats()
    run(*args)
    after = stats()
    assert after[HITS] == before[HITS] and after[MISSES] == before[MISSES]


def test_zero_cap_keeps_nothing(monkeypatch):
    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE", "1")
    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE_MB", "0")
    args = problem()
    before = stats()
    run(*args)
    after = stats()
    assert after[HITS] == before[HITS], "a zero-byte cap must free every block at once"
    assert after[MISSES] > before[MISSES]


def test_the_free_cap_counter_reads_the_variable_now(monkeypatch):
    """The last counter (and _ext.buffer_cache_free_cap, which the run's hold policy compares with a budget's spare
    bytes) is HABA_FAST_BUFFER_CACHE_MB in bytes as it is set now, 4096 MiB unset, 0 for 0 or less."""
    from haba_fast._ext import buffer_cache_free_cap

    for value, cap in (("12", 12 * MIB), ("0", 0), ("-5", 0), (None, 4096 * MIB)):
        if value is None:
            monkeypatch.delenv("HABA_FAST_BUFFER_CACHE_MB", raising=False)
        else:
            monkeypatch.setenv("HABA_FAST_BUFFER_CACHE_MB", value)
        assert stats()[FREE_CAP] == cap and buffer_cache_free_cap() == cap, value


def test_concurrent_calls_from_two_threads_give_the_same_results(monkeypatch):
    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE", "1")
    problems = [problem(seed=s) for s in (0, 1)]
    expected = [run(*p) for p in problems]
    got = [None, None]
    errors = []

    def work(i):
        try:
            got[i] = run(*problems[i])
        except Exception as exc:  # surfaced below: a thread's exception would otherwise be lost
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for e, g in zip(expected, got):
        for a, b in zip(e, g):
            assert torch.equal(a, b)
    assert stats()[FREE_BYTES] == 0 and stats()[SCOPES] == 0


def _fresh_process(code: str, env: dict) -> str:
    full_env = {k: v for k, v in os.environ.items() if k != "HABA_FAST_BUFFER_CACHE"}
    full_env.update(env)
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, cwd=here, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


def test_off_by_default_the_allocator_is_never_replaced():
    """A library call with no opt-in leaves c10's CPU allocator alone (a fresh process: nothing installed yet)."""
    out = _fresh_process(
        """
        import torch, test_buffer_cache as t
        args = t.problem()
        t.run(*args)
        print(list(torch.ops.haba_fast.buffer_cache_stats()))
        """,
        {"HABA_FAST_BUFFER_CACHE_MB": "4096"},
    )
    assert out == str([0] * 8 + [4096 << 20]), out  # the counters, and the free cap the cache would have


def test_cli_program_opts_in_for_its_own_process_and_main_does_not():
    code = """
        import os, sys
        from haba_fast import cli
        mode = sys.argv[1]
        sys.argv = ["haba-fast", "info"]
        if mode == "main":
            cli.main(["info"])  # a library call inside someone else's process: no opt-in
        else:
            try:
                cli.entry()
            except SystemExit:
                pass
        print(os.environ.get("HABA_FAST_BUFFER_CACHE"))
        """
    def out(mode, env):
        full_env = {k: v for k, v in os.environ.items() if k != "HABA_FAST_BUFFER_CACHE"}
        full_env.update(env)
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(code), mode], env=full_env, capture_output=True,
                           text=True, timeout=300, cwd=os.path.dirname(os.path.abspath(__file__)))
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout.strip().splitlines()[-1]

    assert out("entry", {}) == "1"
    assert out("entry", {"HABA_FAST_BUFFER_CACHE": "0"}) == "0", "an explicit choice must win"
    assert out("main", {}) == "None"


def test_other_threads_never_draw_from_the_cache(monkeypatch):
    """While an engine call runs on one thread, large tensors made by another thread are not cached blocks."""
    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE", "1")
    args = problem()
    run(*args)  # installed
    done = threading.Event()
    errors = []

    def engine():
        try:
            for _ in range(3):
                run(*args)
        except Exception as exc:  # surfaced below
            errors.append(exc)
        finally:
            done.set()

    th = threading.Thread(target=engine)
    live_before = stats()[LIVE]
    kept, overlapped = [], 0
    th.start()
    while not done.is_set():
        t = torch.ones(2 << 20, dtype=torch.uint8)  # 2 MiB: over the cache's threshold
        if stats()[SCOPES] > 0:
            overlapped += 1
            kept.append(t)
            kept = kept[-16:]
        done.wait(0.001)
    th.join()
    assert not errors, errors
    assert overlapped > 0, "the main thread never allocated while the engine ran"
    # Everything the engine allocated is freed (or returned); the main thread's tensors are still alive, and none
    # of them was counted as a cached block.
    assert stats()[LIVE] == live_before, (stats(), live_before)
    assert stats()[FREE_BYTES] == 0 and stats()[SCOPES] == 0


def _per_step_run(budget=0, seed=0):
    """(loss, dL/dX, dL/dlr) of the exact engine through the C++ per-step ops (the offloaded trajectory takes them
    at budget 0; a budget keeps steps), the path of HaBa's streamed batches."""
    from haba_fast.engines import get_adjoint_engine

    model = _convnet(channel=3, width=32, depth=2, im=16, k=3, dtype=torch.float32, seed=seed)
    X, Y, w_start, w_target = make_problem(model, n_steps=4, batch=32, im_size=(16, 16), dtype=torch.float32,
                                           seed=seed)
    eng = get_adjoint_engine("exact", "cpu", budget, offload_weights=budget == 0)
    Xr = X.clone().requires_grad_(True)
    lr = torch.tensor(0.05, requires_grad=True)
    loss = eng(model, Xr, Y, w_start, w_target, lr)
    loss.backward()
    return loss.detach(), Xr.grad, lr.grad


@pytest.mark.parametrize("budget", [0, "unlimited"])
def test_a_sweep_of_per_step_ops_holds_one_scope(monkeypatch, budget):
    """The engine holds the cache's scope for a whole sweep of per-step ops (haba_fast._ext.buffer_cache_scope):
    the steps reuse each other's blocks, the results are the cache-off results bit for bit, nothing is kept after."""
    from haba_fast.engines import adjoint

    monkeypatch.setattr(adjoint, "_retain_kept_blocks", lambda run: None)  # retention: the next tests
    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE", "0")
    off = _per_step_run(budget=budget)
    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE", "1")
    before = stats()
    on = _per_step_run(budget=budget)
    held = stats()
    with monkeypatch.context() as m:  # the same sweep with the scope only per op call
        m.setattr(adjoint, "_sweep_buffers", lambda run: adjoint.contextlib.nullcontext())
        per_call = _per_step_run(budget=budget)
    after = stats()
    for a, b, c in zip(off, on, per_call):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert held[FREE_BYTES] == 0 and held[SCOPES] == 0 and after[SCOPES] == 0
    # Held across the sweep, the steps reuse each other's blocks: more hits than with one scope per op call.
    assert held[HITS] - before[HITS] > after[HITS] - held[HITS]


def test_held_scope_is_balanced_and_leave_without_enter_raises(monkeypatch):
    from haba_fast._ext import buffer_cache_scope

    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE", "1")
    run(*problem())  # installs the wrapper
    with pytest.raises(ValueError, match="inside"):
        with buffer_cache_scope():
            assert stats()[SCOPES] == 1
            with buffer_cache_scope():
                assert stats()[SCOPES] == 2
            raise ValueError("inside")
    assert stats()[SCOPES] == 0 and stats()[FREE_BYTES] == 0
    with pytest.raises(RuntimeError, match="no scope entered on this thread"):
        torch.ops.haba_fast.buffer_cache_leave()


def _alloc_and_free(*mib):
    """Inside a scope: tensors of these many MiB, written and dropped (their blocks go to the free lists)."""
    ts = [torch.empty(m * MIB, dtype=torch.uint8).fill_(1) for m in mib]
    del ts


def test_retained_blocks_outlive_the_scope_and_serve_the_next_one(monkeypatch):
    """buffer_cache_retain(sizes): free blocks of those sizes (a multiset) survive the last scope, the others go
    back; the next scope draws from them; no sizes hands them back at once, or at the last leave while a scope is
    alive; blocks under the cache's 1 MiB threshold are ignored."""
    from haba_fast._ext import buffer_cache_retain, buffer_cache_scope

    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE", "1")
    buffer_cache_retain([6 * MIB, 2 * MIB, 1000])
    assert stats()[RETAINED] == 8 * MIB
    with buffer_cache_scope():
        _alloc_and_free(6, 3, 2, 2)
    assert stats()[FREE_BYTES] == 8 * MIB, "one 6 MiB and one 2 MiB block are retained; 3 MiB and the second 2 go"
    before = stats()
    with buffer_cache_scope():
        _alloc_and_free(6)
    after = stats()
    assert after[HITS] == before[HITS] + 1 and after[MISSES] == before[MISSES], "the retained block was not reused"
    with buffer_cache_scope():  # handing back while a scope is alive waits for its end
        buffer_cache_retain()
        assert stats()[FREE_BYTES] == 8 * MIB
    assert stats()[FREE_BYTES] == 0 and stats()[RETAINED] == 0
    buffer_cache_retain([2 * MIB] * 2)
    with buffer_cache_scope():
        _alloc_and_free(2, 2, 2)
    assert stats()[FREE_BYTES] == 4 * MIB, "two of the three 2 MiB blocks are retained"
    buffer_cache_retain([])  # no scope alive: at once
    assert stats()[FREE_BYTES] == 0
    with pytest.raises(RuntimeError, match="must be >= 0"):
        torch.ops.haba_fast.buffer_cache_retain([-1])
    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE", "0")
    buffer_cache_retain([8 * MIB])  # the cache switched off: nothing is retained
    assert stats()[RETAINED] == 0


def test_kept_unrolls_reuse_the_retained_blocks_and_budget_0_hands_them_back(monkeypatch):
    """The engine retains its kept steps' blocks between unrolls: the next unroll draws them instead of fresh pages,
    with the cache-off results bit for bit; an unroll at budget 0 retains nothing and hands them back."""
    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE", "0")
    off = _per_step_run(budget="unlimited")
    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE", "1")
    s0 = stats()
    first = _per_step_run(budget="unlimited")
    s1 = stats()
    second = _per_step_run(budget="unlimited")
    s2 = stats()
    for a, b, c in zip(off, first, second):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert 0 < s1[FREE_BYTES] <= s1[RETAINED]
    assert s2[MISSES] - s1[MISSES] < s1[MISSES] - s0[MISSES], "the second unroll did not draw the retained blocks"
    _per_step_run(budget=0)
    assert stats()[FREE_BYTES] == 0 and stats()[RETAINED] == 0


def test_held_blocks_outlive_every_scope_until_the_hold_ends(monkeypatch):
    """buffer_cache_hold(True): every free block survives the last scope (the cap still bounds them) and serves the
    next scope; releasing the hold trims to the retained sizes, at once with no scope alive, else at the last leave;
    switched off, holding does nothing."""
    from haba_fast._ext import buffer_cache_hold, buffer_cache_retain, buffer_cache_scope

    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE", "1")
    buffer_cache_hold(True)
    assert stats()[HELD] == 1
    with buffer_cache_scope():
        _alloc_and_free(6, 3, 2, 2)
    assert stats()[FREE_BYTES] == 13 * MIB, "held: every free block outlives the scope"
    before = stats()
    with buffer_cache_scope():
        _alloc_and_free(6, 3, 2, 2)
    after = stats()
    assert after[HITS] - before[HITS] == 4 and after[MISSES] == before[MISSES], "the held blocks were not reused"
    buffer_cache_retain([3 * MIB])
    with buffer_cache_scope():  # releasing while a scope is alive waits for its end
        buffer_cache_hold(False)
        assert stats()[FREE_BYTES] == 13 * MIB and stats()[HELD] == 0
    assert stats()[FREE_BYTES] == 3 * MIB, "released: only the retained 3 MiB block stays"
    buffer_cache_retain([])
    assert stats()[FREE_BYTES] == 0
    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE_MB", "4")  # the cap bounds what a held cache keeps free
    buffer_cache_hold(True)
    with buffer_cache_scope():
        _alloc_and_free(3, 2, 2)
    assert 0 < stats()[FREE_BYTES] <= 4 * MIB, "held beyond the 4 MiB cap"
    buffer_cache_hold(False)  # no scope alive: at once
    assert stats()[FREE_BYTES] == 0
    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE", "0")
    buffer_cache_hold(True)  # the cache switched off: nothing is held
    assert stats()[HELD] == 0


@pytest.mark.parametrize("budget", [0, "unlimited"])
def test_held_unrolls_reuse_each_others_blocks_with_the_same_results(monkeypatch, budget):
    """Held for a run (BufferCacheRun(hold=True), as distill() does), the second unroll draws its blocks -- the working
    set of both sweeps, not only kept steps -- from the first one's, bit for bit the cache-off results; at the end
    every block goes back."""
    from haba_fast._ext import BufferCacheRun

    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE", "0")
    off = _per_step_run(budget=budget)
    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE", "1")
    _per_step_run(budget=budget)  # not held: each sweep starts from an empty cache
    s0 = stats()
    _per_step_run(budget=budget)
    s1 = stats()
    with BufferCacheRun(hold=True):
        first = _per_step_run(budget=budget)
        s2 = stats()
        second = _per_step_run(budget=budget)
        s3 = stats()
        assert s3[HELD] == 1 and s3[FREE_BYTES] > 0
    for a, b, c in zip(off, first, second):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert s3[MISSES] - s2[MISSES] < s1[MISSES] - s0[MISSES], "the held unroll still allocated fresh blocks"
    if budget == 0:
        assert s3[MISSES] == s2[MISSES], "at budget 0 a held unroll allocates nothing new"
    assert stats()[FREE_BYTES] == 0 and stats()[RETAINED] == 0 and stats()[HELD] == 0


@pytest.mark.parametrize("budget, cap_mb", [("unlimited", None), ("0", None), ("8GB", None), ("8GB", "16384")])
def test_a_distill_run_holds_the_cache_and_hands_every_block_back_at_its_end(monkeypatch, digits, buffer,  # noqa: F811
                                                                             budget, cap_mb):
    """haba_fast.distill.distill holds the cache for its iterations and runs each step inside a scope: at budget
    unlimited from the first step, at a size from the step after the first unroll showed that the budget's spare
    bytes hold the cache's free cap (8GB with digits' small steps, unless the cap is 16 GiB); each kept unroll asks
    to retain its kept steps' block sizes; the run releases the hold and hands every block back when it ends. At
    budget 0, or a size without room for the cap, nothing is held and no step runs in a scope (the engine's sweeps
    hold their own). Digits' blocks are under the cache's threshold: the calls are what is checked."""
    from test_distill import _cfg

    from haba_fast import _ext
    from haba_fast import distill as distill_mod
    from haba_fast.engines import adjoint

    calls = []
    real_retain, real_hold = _ext.buffer_cache_retain, _ext.buffer_cache_hold

    def retain(sizes=()):
        calls.append(("retain", list(sizes)))
        real_retain(sizes)

    def hold(on):
        calls.append(("hold", on))
        real_hold(on)

    real_step = distill_mod._guarded_step
    scopes_in_steps = []

    def step(*args, **kwargs):
        scopes_in_steps.append(stats()[SCOPES])
        return real_step(*args, **kwargs)

    monkeypatch.setattr(adjoint, "buffer_cache_retain", retain)
    monkeypatch.setattr(_ext, "buffer_cache_retain", retain)
    monkeypatch.setattr(_ext, "buffer_cache_hold", hold)
    monkeypatch.setattr(distill_mod, "_guarded_step", step)
    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE", "1")
    if cap_mb is not None:
        monkeypatch.setenv("HABA_FAST_BUFFER_CACHE_MB", cap_mb)
    cfg = _cfg(engine="exact", memory_budget=budget, iterations=3)
    distill_mod.distill(cfg, digits, buffer, progress=False, evaluate=False, log=lambda m: None)
    assert stats()[RETAINED] == 0 and stats()[FREE_BYTES] == 0 and stats()[HELD] == 0
    assert calls[-1] == ("retain", []), "every block goes back at the end"
    kept_retains = [sizes for name, sizes in calls[:-1] if name == "retain"]
    assert len(kept_retains) == 3, calls  # one per unroll, before its backward sweep
    if budget == "0":
        assert scopes_in_steps == [0, 0, 0] and calls == [("retain", [])] * 4, "budget 0 holds and retains nothing"
        return
    for sizes in kept_retains:  # every kept step's storages, syn_steps kept steps
        assert sizes and len(sizes) % cfg.syn_steps == 0 and all(n > 0 for n in sizes)
    if cap_mb is not None:  # 8 GB minus the kept steps is less than the 16 GiB cap: never held
        assert scopes_in_steps == [0, 0, 0] and [c[0] for c in calls] == ["retain"] * 4, (scopes_in_steps, calls)
        return
    if budget == "unlimited":
        assert scopes_in_steps == [1, 1, 1], "each step runs inside one scope of the held cache"
        assert [c[0] for c in calls] == ["hold", "retain", "retain", "retain", "hold", "retain"], calls
    else:  # held from the step after the first unroll measured its kept steps
        assert scopes_in_steps == [0, 1, 1], scopes_in_steps
        assert [c[0] for c in calls] == ["retain", "hold", "retain", "retain", "hold", "retain"], calls
    assert [c for c in calls if c[0] == "hold"] == [("hold", True), ("hold", False)]


def test_bench_iteration_runs_held_and_counts_page_faults(monkeypatch, capsys):
    """``haba-fast bench iteration`` times its iterations as distill() runs them (held at budget unlimited, not at
    0, at 8GB from the second iteration unless the cache's free cap does not fit), and its row says so, with the
    minor page faults of the timed and the warm-up iterations; the hold ends with the run."""
    import argparse
    import json

    from haba_fast._ext import buffer_cache_is_held
    from haba_fast.benchmarks import iteration

    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE", "1")
    parser = argparse.ArgumentParser()
    iteration.add_arguments(parser)
    args = parser.parse_args(
        "--engine exact --ipc 2 --n-hallucinators 2 --syn-steps 2 --batch-syn 5 --width 32 --warmup 1 --repeats 2 "
        "--memory-budget unlimited --json".split()
    )
    assert iteration.run(args) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["buffer_cache_held"] is True and not buffer_cache_is_held()
    assert row["minor_faults_per_iter"] >= 0 and len(row["warmup_minor_faults"]) == 1
    assert stats()[FREE_BYTES] == 0 and stats()[RETAINED] == 0
    args.memory_budget = "0"
    assert iteration.run(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["buffer_cache_held"] is False
    args.memory_budget = "8GB"  # held from the iteration after the first: its spare bytes hold the 4 GiB cap
    assert iteration.run(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["buffer_cache_held"] is True
    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE_MB", "16384")  # a cap the 8 GB budget cannot hold
    assert iteration.run(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["buffer_cache_held"] is False
    monkeypatch.delenv("HABA_FAST_BUFFER_CACHE_MB")
    assert stats()[HELD] == 0
    args.memory_budget = "unlimited"
    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE", "0")
    assert iteration.run(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["buffer_cache_held"] is False


def _train(seed: int = 0, test: bool = True):
    """A short train_network run whose activations exceed the cache's 1 MiB threshold (conv outputs of 1-2 MiB):
    ConvNet width 32 on 88 16x16 images in batches of 32 (the ragged last one runs in the full ones' blocks), 2
    epochs with DSA, then a test pass; returns the trained weights and the history's numbers."""
    from haba_fast.models import flatten_params, get_network
    from haba_fast.training import train_network

    g = torch.Generator().manual_seed(seed)
    net = get_network("ConvNetW32", 3, 4, (16, 16), generator=torch.Generator().manual_seed(seed))
    x = torch.randn(88, 3, 16, 16, generator=g)  # batches of 32, 32 and a ragged 24 (in the full ones' blocks)
    y = torch.arange(88) % 4
    xt, yt = torch.randn(70, 3, 16, 16, generator=g), torch.arange(70) % 4  # test batches of 32, 32 and 6
    history = train_network(
        net,
        x,
        y,
        epochs=2,
        lr=0.01,
        momentum=0.9,
        batch_size=32,
        generator=g,
        test_data=(xt, yt) if test else None,
        test_batch_size=32,
    )
    numbers = [(e.loss, e.accuracy, e.test_loss, e.test_accuracy) for e in history.epochs]
    return flatten_params(net).detach(), numbers


def test_training_reuses_blocks_with_the_same_network(monkeypatch):
    """train_network (and its test passes) hold a scope over their batches (haba_fast._ext.BatchBuffers): the
    batches reuse each other's blocks, the trained weights and the history are bit for bit the cache-off ones, and
    no block stays free after it."""
    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE", "0")
    w_off, h_off = _train()
    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE", "1")
    before = stats()
    w_on, h_on = _train()
    after = stats()
    assert after[HITS] - before[HITS] > 0, "no block was reused across the batches"
    assert after[FREE_BYTES] == 0 and after[SCOPES] == 0
    assert torch.equal(w_off, w_on) and h_off == h_on


def test_training_leaves_a_held_cache_alone(monkeypatch):
    """While a run holds the cache (distill()'s iterations), an evaluation's training draws nothing from it and adds
    no block to it: its blocks of other sizes must not stay held beside the steps' ones."""
    from haba_fast._ext import buffer_cache_hold

    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE", "1")
    _train()  # the wrapper is installed, the counters exist
    buffer_cache_hold(True)
    before = stats()
    w_held, _ = _train()
    after = stats()
    buffer_cache_hold(False)
    assert after[HITS] == before[HITS] and after[MISSES] == before[MISSES]
    assert after[FREE_BYTES] == before[FREE_BYTES] == 0
    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE", "0")
    assert torch.equal(w_held, _train()[0])


def test_scope_is_open_for_full_batches_only(monkeypatch):
    """train_network holds the scope over its full batches, across epochs, and over a ragged last batch of at least
    half their size (served from their blocks: BatchBuffers.FIT); it hands it back before a smaller ragged batch and
    before each test pass (test_every=1), whose own full batches then hold one: blocks of two batch sizes are never
    held side by side. At the end nothing stays free."""
    import haba_fast.training as training
    from haba_fast.models import get_network

    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE", "1")
    seen = []
    g = torch.Generator().manual_seed(0)
    net = get_network("ConvNetW32", 3, 4, (16, 16), generator=torch.Generator().manual_seed(0))
    net.register_forward_pre_hook(lambda m, inp: seen.append((m.training, inp[0].shape[0], stats()[SCOPES])))
    x, y = torch.randn(72, 3, 16, 16, generator=g), torch.arange(4).repeat_interleave(18)
    xt, yt = torch.randn(70, 3, 16, 16, generator=g), torch.arange(70) % 4
    before = stats()
    training.train_network(net, x, y, epochs=2, lr=0.01, batch_size=32, generator=g, test_data=(xt, yt), test_every=1)
    train_pass = [(True, 32, 1), (True, 32, 1), (True, 8, 0)]  # 8 < 32 / FIT: closed
    test_pass = [(False, 70, 1)]  # all 70 test images in one batch (test batch size 256): a full batch
    assert seen == (train_pass + test_pass) * 2
    after = stats()
    assert after[HITS] > before[HITS] and after[FREE_BYTES] == 0 and after[SCOPES] == 0
    seen.clear()
    training.evaluate_loss_accuracy(net, xt, yt, batch_size=32)  # 32, 32, then a ragged 6
    assert seen == [(False, 32, 1), (False, 32, 1), (False, 6, 0)]
    seen.clear()
    x2, y2 = torch.randn(88, 3, 16, 16, generator=g), torch.arange(88) % 4
    misses = []
    hook = net.register_forward_pre_hook(lambda m, inp: misses.append(stats()[MISSES]))
    training.train_network(net, x2, y2, epochs=3, lr=0.01, batch_size=32, generator=g)
    hook.remove()
    assert seen == [(True, 32, 1), (True, 32, 1), (True, 24, 1)] * 3  # 24 >= 32 / FIT: the full batches' blocks
    after = stats()
    assert after[MISSES] == misses[3], "after the first epoch every block, the ragged batch's too, is a reused one"
    assert after[FREE_BYTES] == 0 and after[SCOPES] == 0


def test_a_request_with_no_block_of_its_size_takes_a_larger_one_within_the_fit_ratio(monkeypatch):
    """buffer_cache_fit(r) (per thread, default 1): a request that finds no free block of its size takes the smallest
    free block at most r times larger, which goes back to its own size's list; beyond r, or at 1, it misses. The
    ratio is checked, returned, and not seen by another thread."""
    from haba_fast._ext import buffer_cache_scope

    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE", "1")
    fit = torch.ops.haba_fast.buffer_cache_fit
    assert fit(1.0) == 1.0
    with buffer_cache_scope():
        _alloc_and_free(4, 8)
        s0 = stats()
        _alloc_and_free(3)  # exact sizes only: a miss
        s1 = stats()
        assert s1[MISSES] - s0[MISSES] == 1 and s1[FREE_BYTES] - s0[FREE_BYTES] == 3 * MIB
        assert fit(2.0) == 1.0
        try:
            t = torch.empty(5 * MIB, dtype=torch.uint8)  # no 5 MiB block: the 8 MiB one (<= 10 MiB)
            s2 = stats()
            assert s2[HITS] - s1[HITS] == 1 and s1[FREE_BYTES] - s2[FREE_BYTES] == 8 * MIB
            del t
            assert stats()[FREE_BYTES] == s1[FREE_BYTES], "the block went back under its own 8 MiB"
            u = torch.empty(int(2.1 * MIB), dtype=torch.uint8)  # 3 and 4 MiB fit (<= 4.2): the smaller one
            assert s1[FREE_BYTES] - stats()[FREE_BYTES] == 3 * MIB
            del u
            w = torch.empty(4 * MIB, dtype=torch.uint8)  # its own size first, not the 8 MiB block
            assert s1[FREE_BYTES] - stats()[FREE_BYTES] == 4 * MIB
            del w
            s3 = stats()
            v = torch.empty(9 * MIB, dtype=torch.uint8)  # nothing in [9, 18] MiB: a miss
            assert stats()[MISSES] - s3[MISSES] == 1
            del v
            other = []
            thread = threading.Thread(target=lambda: other.append(fit(1.0)))
            thread.start()
            thread.join()
            assert other == [1.0], "another thread has its own ratio"
        finally:
            assert fit(1.0) == 2.0
    for bad in (0.5, 17.0):
        with pytest.raises(RuntimeError, match="the ratio must be in"):
            fit(bad)


def test_scope_closed_for_callbacks_exceptions_and_a_new_batch_size(monkeypatch):
    """The callback runs with the scope handed back; a raising callback leaves no scope open; a per-epoch data
    provider whose sample count grows, or shrinks below 1 / FIT of it (a new full batch size), gets a fresh scope,
    the old size's blocks handed back first."""
    import haba_fast.training as training
    from haba_fast.models import get_network

    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE", "1")
    g = torch.Generator().manual_seed(0)
    net = get_network("ConvNetW32", 3, 4, (16, 16), generator=torch.Generator().manual_seed(0))
    x, y = torch.randn(64, 3, 16, 16, generator=g), torch.arange(4).repeat_interleave(16)
    in_callback = []
    training.train_network(
        net,
        x,
        y,
        epochs=2,
        lr=0.01,
        batch_size=64,
        generator=g,
        callback=lambda ep, n, s: in_callback.append((stats()[SCOPES], stats()[FREE_BYTES])),
    )
    assert in_callback == [(0, 0), (0, 0)]

    def boom(ep, n, s):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        training.train_network(net, x, y, epochs=2, lr=0.01, batch_size=64, generator=g, callback=boom)
    assert stats()[SCOPES] == 0

    def provider(ep, gen):  # every batch full; the full size shrinks within FIT, grows, then shrinks past FIT
        n = (64, 48, 64, 16)[ep]
        return x[:n], y[:n]

    from haba_fast._ext import BatchBuffers

    switches = []

    class Recorded(BatchBuffers):
        def batch(self, size, full_size):
            before = self._size
            super().batch(size, full_size)
            if self._size != before:
                switches.append((before, self._size))

    monkeypatch.setattr(training, "BatchBuffers", Recorded)
    seen = []
    hook = net.register_forward_pre_hook(lambda m, inp: seen.append((inp[0].shape[0], stats()[SCOPES])))
    try:
        training.train_network(net, provider, epochs=4, lr=0.01, batch_size=64, generator=g)
    finally:
        hook.remove()
    assert seen == [(64, 1), (48, 1), (64, 1), (16, 1)]
    assert switches == [(None, 64), (64, 48), (48, 64), (64, 16)], "a new full size must get a new scope"
    assert stats()[SCOPES] == 0 and stats()[FREE_BYTES] == 0
