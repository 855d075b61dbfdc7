"""Fuzzing the CLI's file inputs: `haba-fast eval`, `export` and `distill --buffer_path` on damaged files.

Every case writes one valid artefact (our synthetic-set file, a reference checkpoint directory, a reference replay
buffer, our memory-mapped buffer), damages it one way (truncated, empty, garbage bytes, wrong-typed or wrong-shaped
tensors, NaN/Inf, missing or extra entries, absurd sizes ...) and runs the command in a child process
(tests/fuzz_harness.py). The outcome must be success (only for damage that leaves a usable file, e.g. float64
tensors) or exit status 2 with a one-line `haba-fast CMD: error: ...`; never a traceback, crash or hang.
"""

from __future__ import annotations

import pytest
from fuzz_cases_files import BUFFER_MUTATIONS, HABA_BUFFER_MUTATIONS, REFERENCE_MUTATIONS, SYNTHETIC_MUTATIONS
from fuzz_harness import BAD, Worker, drive, report
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CI = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


def cases(target, mutations, commands):
    return st.fixed_dictionaries({"seed": st.integers(0, 2**16), "target": st.just(target),
                                  "mutation": st.sampled_from(mutations), "command": st.sampled_from(commands)})


SYNTHETIC = cases("synthetic", SYNTHETIC_MUTATIONS, ("eval", "export"))
REFERENCE = cases("reference", REFERENCE_MUTATIONS, ("eval", "export"))
REPLAY = cases("replay", BUFFER_MUTATIONS, ("distill",))
HABA = cases("haba", HABA_BUFFER_MUTATIONS, ("distill",))


@pytest.fixture(scope="module")
def worker():
    w = Worker(timeout=300)
    yield w
    w.close()


def _check(worker, case):
    out = worker.run("fuzz_cases_files:run_file_case", case)
    assert out["status"] not in BAD, f"{out['status']}: {out.get('message')}\n{out.get('trace', '')}\ncase={case}"


@settings(max_examples=25, **CI)
@given(case=SYNTHETIC)
def test_fuzz_synthetic_set_file(worker, case):
    _check(worker, case)


@settings(max_examples=15, **CI)
@given(case=REFERENCE)
def test_fuzz_reference_checkpoint(worker, case):
    _check(worker, case)


@settings(max_examples=15, **CI)
@given(case=REPLAY)
def test_fuzz_reference_replay_buffer(worker, case):
    _check(worker, case)


@settings(max_examples=10, **CI)
@given(case=HABA)
def test_fuzz_memmap_buffer(worker, case):
    _check(worker, case)


@pytest.mark.slow
def test_fuzz_files_long_profile(capsys):
    """Every mutation of every artefact several times; reports the count and the crashes (must be 0)."""
    w = Worker(timeout=600)
    try:
        for strategy, n in ((SYNTHETIC, 300), (REFERENCE, 200), (REPLAY, 150), (HABA, 100)):
            drive(w, "fuzz_cases_files:run_file_case", strategy, n)
    finally:
        w.close()
    s = w.stats
    with capsys.disabled():
        print(f"\nfuzz files long profile: {s['cases']} cases, {s['ok']} clean outcomes, {s['crash']} crashes, "
              f"{s['hang']} hangs, {s['wrong']} wrong outcomes, {s['unclear']} tracebacks")
    assert not w.bad, f"{len(w.bad)} bad outcomes, listed in {report('files', s, w.bad)}"
