"""Fuzzing the CLI's file inputs: `haba-fast eval`, `export` and `distill --buffer_path` on damaged files.

Every case writes one valid artefact (our synthetic-set file, a reference checkpoint directory, a reference replay
buffer, our memory-mapped buffer), damages it one way (truncated, empty, garbage bytes, wrong-typed or wrong-shaped
tensors, NaN/Inf, missing or extra entries, absurd sizes ...) and runs the command in a child process
(tests/fuzz_harness.py). The outcome must be success (only for damage that leaves a usable file, e.g. float64
tensors) or exit status 2 with a one-line `haba-fast CMD: error: ...`; never a traceback, crash or hang.
"""

from __future__ import annotations

import pytest
import torch
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


@pytest.mark.parametrize("target,command", [("synthetic", "eval"), ("synthetic", "export"), ("reference", "eval"),
                                            ("reference", "export"), ("replay", "distill"), ("haba", "distill")])
def test_unmutated_files_are_the_working_control(worker, target, command):
    """Each command works on the unmutated artefact (else every mutation "fails cleanly" and nothing is tested)."""
    _check(worker, {"seed": 0, "target": target, "mutation": "none", "command": command})


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


# Regressions found by the fuzzer, pinned (in-process: each is a clean ValueError now).
def _saved_haba(tmp_path):
    from fuzz_cases_files import _haba

    p = tmp_path / "s.pt"
    _haba().save(p, meta={"dataset": "digits", "lr": 0.01})
    return p, torch.load(p, weights_only=True)


@pytest.mark.parametrize("damage, match", [
    (lambda pl: pl["args"].update(num_classes=10**12), "does not match its args"),
    (lambda pl: pl["args"].update(n_hallucinators=10**9), "does not match its args"),
    (lambda pl: pl["state_dict"].update(bases=pl["state_dict"]["bases"].round().long()), "floating dtype"),
    (lambda pl: pl["state_dict"]["scale"].view(-1).__setitem__(0, float("nan")), "NaN or Inf"),
    (lambda pl: pl["meta"].update(lr=float("nan")), "finite number > 0"),
    (lambda pl: pl["meta"].update(lr=-1.0), "finite number > 0"),
    (lambda pl: pl["meta"].update(lr=torch.tensor(True)), "real number"),
    (lambda pl: pl.update(meta=[1, 2]), "'meta' must be a dict"),
    (lambda pl: pl.update(kind=["haba"]), "unknown synthetic-set kind"),
    (lambda pl: pl.update(dtype="int64"), "dtype entry"),
])
def test_damaged_synthetic_set_is_a_clear_error(tmp_path, damage, match):
    from haba_fast.factorization import load_synthetic

    p, payload = _saved_haba(tmp_path)
    damage(payload)
    torch.save(payload, p)
    with pytest.raises(ValueError, match=match) as e:
        load_synthetic(p)
    assert str(p) in str(e.value)


def test_damaged_reference_checkpoint_is_a_clear_error(tmp_path):
    from fuzz_cases_files import _haba

    from haba_fast.factorization import load_synthetic

    _haba().to_reference(tmp_path, it="best", lr=0.01)
    good = {n: torch.load(tmp_path / n, weights_only=True) for n in ("images_best.pt", "weights_best.pt")}
    for name, bad, match in (("syn_lr_best.pt", torch.tensor(float("nan")), "finite"),
                             ("syn_lr_best.pt", torch.tensor(True), "real number"),
                             ("images_best.pt", good["images_best.pt"].long(), "floating-point"),
                             ("weights_best.pt", {k: v.clone().fill_(float("inf")) for k, v in
                                                  good["weights_best.pt"].items()}, "NaN or Inf")):
        _haba().to_reference(tmp_path, it="best", lr=0.01)
        torch.save(bad, tmp_path / name)
        with pytest.raises(ValueError, match=match) as e:
            load_synthetic(tmp_path, num_classes=10)
        assert name in str(e.value)


def test_damaged_expert_snapshots_are_a_clear_error(tmp_path):
    from fuzz_cases_files import _net_snapshots

    from haba_fast.experts import load_buffer

    snaps = _net_snapshots(0)
    snaps[1][0] = snaps[1][0].clone().fill_(float("nan"))
    torch.save([snaps], tmp_path / "replay_buffer_0.pt")
    buf = load_buffer(tmp_path)
    buf.snapshot(0, 0)  # intact snapshots still read
    with pytest.raises(ValueError, match="trajectory 0 snapshot 1 contains NaN or Inf"):
        buf.snapshot(0, 1)
    snaps = _net_snapshots(0)
    snaps[2][1] = snaps[2][1].round().long()
    torch.save([snaps], tmp_path / "replay_buffer_0.pt")
    with pytest.raises(ValueError, match="non-floating"):
        load_buffer(tmp_path)
