"""Fuzzing the public ops and the engine op with hypothesis, every case in a child process.

The outcome of every case must be a correct result (equal to the torch reference, values and gradients) or a
clean exception with a message (ValueError/TypeError from the public ops; RuntimeError from the raw C++ ops'
HF_CHECKs); never a crash, hang, silent acceptance of a bad input, or a stray exception type
(tests/fuzz_harness.py classifies them). Cases run in a persistent child (restarted if it dies), so a segfault
fails the test that found it. The default profile is a few hundred tiny cases; ``-m slow`` runs a long profile and
prints how many cases ran and how many crashed.
"""

from __future__ import annotations

import pytest
from fuzz_harness import BAD, Worker, drive, report
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from utils import requires_ext

from haba_fast.augment import FAMILIES

CI = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
SPECIALS = st.sampled_from([None, None, None, None, "nan", "inf", "-inf", "huge", "tiny"])
CHAINS = st.lists(st.sampled_from((*FAMILIES, "identity")), min_size=1, max_size=3)
GEN_BAD = ["base_oob", "hall_oob", "negative_idx", "float_idx", "int32_idx", "2d_idx", "len_mismatch",
           "scale_shape", "dec_shape", "enc_rank", "dtype_mix", "bf16", "int_bases", "list_arg", "params_n"]
AUG_BAD = ["int_images", "bf16_images", "rank3", "not_params", "params_n"]
ENGINE_BAD = ["label_oob", "label_neg", "P_mismatch", "X_rank", "X_channels", "spec_depth", "spec_norm",
              "spec_negative", "spec_short", "Y_float", "mixed_dtype", "same_target", "nan_X", "inf_w", "nan_lr",
              "empty_batch", "zero_steps"]


def _maybe_bad(options):
    """Half the cases valid, the other half one of ``options`` (uniformly)."""
    return st.sampled_from([None] * len(options) + list(options))


def _with_backend(fields: dict, bad_options, backends, torch_accepts=()):
    """``fields`` plus "bad" (:func:`_maybe_bad`) and "backend". On the torch backend haba_fast.ops returns
    haba_fast._reference's result, the oracle itself, so the torch backend gets bad inputs only (its input checks are
    what it can get wrong) and every valid case, or one the torch backend takes (``torch_accepts``: any floating
    dtype), goes to a kernel backend (C++ or Triton)."""
    kernels = [b for b in backends if b != "torch"] or list(backends)

    def backend_for(bad):
        pool = kernels if bad is None or bad in torch_accepts else list(backends)
        return st.sampled_from(pool).map(lambda b: (bad, b))

    return st.tuples(st.fixed_dictionaries(fields), _maybe_bad(bad_options).flatmap(backend_for)).map(
        lambda t: {**t[0], "bad": t[1][0], "backend": t[1][1]}
    )


def gen_cases(backends=("cpu", "torch"), small=False):
    dim = st.integers(1, 5 if small else 7)
    return _with_backend({
        "seed": st.integers(0, 2**16), "dtype": st.sampled_from(["f32", "f64"]),
        "n": st.integers(0, 3 if small else 5), "M": st.integers(1, 3), "cb": st.integers(1, 2),
        "C": st.integers(1, 2 if small else 3), "H": dim, "W": dim, "k": st.integers(1, 4), "Hn": st.integers(1, 3),
        "special": SPECIALS, "noncontig": st.booleans(), "aug": st.booleans(), "families": CHAINS,
        "extreme": st.sampled_from([False, False, True]),  # only meaningful with "aug"
        "special_aug": st.sampled_from(["huge", "nan", "inf"]), "aug_f32": st.booleans(),
    }, GEN_BAD, backends, torch_accepts=("bf16",))


def aug_cases(backends=("cpu", "torch"), small=False):
    dim = st.integers(1, 5 if small else 9)
    return _with_backend({
        "seed": st.integers(0, 2**16), "dtype": st.sampled_from(["f32", "f64"]),
        "n": st.integers(0, 3 if small else 5), "C": st.integers(1, 3), "H": dim, "W": dim,
        "special": SPECIALS, "noncontig": st.booleans(), "families": CHAINS, "extreme": st.booleans(),
        "special_aug": st.sampled_from(["huge", "nan", "inf"]), "aug_f32": st.booleans(),
    }, AUG_BAD, backends, torch_accepts=("bf16_images",))


RAW_CASES = st.fixed_dictionaries({
    "seed": st.integers(0, 2**16), "dtype": st.sampled_from(["f32", "f64"]),
    "n": st.integers(0, 4), "C": st.integers(1, 3), "H": st.integers(1, 8), "W": st.integers(1, 8),
    "family": st.integers(-2, 7), "fscale": st.sampled_from([1.0, 10.0, 1e6, 1e30]),
    "ispan": st.sampled_from([1, 8, 1000, 2**40]), "imax": st.sampled_from([0, 2**62, -(2**62), 2**63 - 1, -(2**63)]),
    "special": SPECIALS, "adjoint": st.booleans(),
})

ENGINE_CASES = st.fixed_dictionaries({
    "seed": st.integers(0, 2**16), "dtype": st.sampled_from(["f32", "f64"]),
    "channel": st.integers(1, 2), "classes": st.integers(2, 4), "width": st.integers(1, 4), "depth": st.integers(1, 2),
    "norm": st.sampled_from(["instancenorm", "groupnorm", "layernorm", "none"]),
    "act": st.sampled_from(["relu", "sigmoid", "leakyrelu"]),
    "pool": st.sampled_from(["avgpooling", "maxpooling", "none"]),
    "im": st.integers(4, 8), "N": st.integers(1, 3), "B": st.integers(1, 3),
    # no lr = 0 here: dL/dX is exactly 0 there on both sides (it took 9 of the 20 valid draws); ENGINE_LR0 pins it
    "lr": st.sampled_from([0.01, 0.1, -0.05, 3.0]), "first_order": st.booleans(),
    "bad": _maybe_bad(ENGINE_BAD),
})
# lr = 0: w_N = w_start, so the loss is 1 and dL/dX must be exactly 0 (fuzz_cases_ops._close: an all-zero reference
# needs an all-zero result); dL/dlr is not 0.
ENGINE_LR0 = {"seed": 7, "dtype": "f64", "channel": 2, "classes": 3, "width": 2, "depth": 2, "norm": "instancenorm",
              "act": "relu", "pool": "avgpooling", "im": 6, "N": 2, "B": 2, "lr": 0.0, "first_order": False,
              "bad": None}


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


def _check(worker, fn, case):
    out = worker.run(fn, case)
    assert out["status"] not in BAD, f"{out['status']}: {out.get('message')}\n{out.get('trace', '')}\ncase={case}"


# Valid C++ cases whose output and every gradient are not all zero: most drawn valid cases are tiny images that
# crop/cutout erase or extreme parameters saturate (exactly-zero gradients), so these two pin a value check.
GEN_VALUES = {
    "seed": 11, "dtype": "f32", "n": 5, "M": 3, "cb": 2, "C": 3, "H": 7, "W": 6, "k": 3, "Hn": 2, "special": None,
    "noncontig": True, "aug": False, "families": ["identity"], "extreme": False, "special_aug": "huge",
    "aug_f32": False, "bad": None, "backend": "cpu",
}
GENAUG_VALUES = {**GEN_VALUES, "seed": 12, "dtype": "f64", "noncontig": False, "aug": True,
                 "families": ["rotate", "color", "flip"]}


@settings(max_examples=90, **CI)
@given(case=gen_cases())
@example(case=GEN_VALUES)
@example(case=GENAUG_VALUES)
def test_fuzz_generate(worker, case):
    _check(worker, "fuzz_cases_ops:run_generate", case)


@settings(max_examples=90, **CI)
@given(case=aug_cases())
def test_fuzz_augment(worker, case):
    _check(worker, "fuzz_cases_ops:run_augment", case)


@requires_ext
@settings(max_examples=60, **CI)
@given(case=RAW_CASES)
def test_fuzz_raw_cpp_augment(worker, case):
    _check(worker, "fuzz_cases_ops:run_raw_genaug", case)


@requires_ext
@settings(max_examples=40, **CI)
@given(case=ENGINE_CASES)
@example(case=ENGINE_LR0)
@example(case={**ENGINE_LR0, "first_order": True, "dtype": "f32"})
def test_fuzz_engine_op(worker, case):
    _check(worker, "fuzz_cases_ops:run_engine", case)


@pytest.fixture(scope="module")
def triton_worker():
    pytest.importorskip("triton")
    w = Worker(env={"TRITON_INTERPRET": "1"}, timeout=300)
    yield w
    w.close()


@settings(max_examples=6, **CI)
@given(case=aug_cases(backends=("triton",), small=True))
def test_fuzz_augment_triton_interpreter(triton_worker, case):
    _check(triton_worker, "fuzz_cases_ops:run_augment", case)


# c_b = C = 2 at least once (a swapped in/out channel index reads the same address at c_b = C = 1).
TRITON_TWO_CHANNELS = {
    "seed": 5, "dtype": "f64", "n": 3, "M": 2, "cb": 2, "C": 2, "H": 4, "W": 5, "k": 2, "Hn": 2, "special": None,
    "noncontig": False, "aug": False, "families": ["identity"], "extreme": False, "special_aug": "huge",
    "aug_f32": False, "bad": None, "backend": "triton",
}


@settings(max_examples=3, **CI)
@given(case=gen_cases(backends=("triton",), small=True))
@example(case=TRITON_TWO_CHANNELS)
def test_fuzz_generate_triton_interpreter(triton_worker, case):
    _check(triton_worker, "fuzz_cases_ops:run_generate", case)


# Regressions found by the fuzzer, pinned.
@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("hw", [(1, 2), (2, 1), (1, 5), (5, 1)])
def test_regression_rotate_on_a_size_one_axis(request, backend, hw):
    """affine_grid puts a size-1 axis at 0, not -1: rotations of 1-pixel-high/wide images used to differ."""
    w = request.getfixturevalue("triton_worker" if backend == "triton" else "worker")
    case = {"seed": 1, "dtype": "f64", "n": 3, "C": 2, "H": hw[0], "W": hw[1], "special": None, "noncontig": False,
            "bad": None, "backend": backend, "families": ["rotate", "scale"], "extreme": False}
    _check(w, "fuzz_cases_ops:run_augment", case)


@pytest.mark.parametrize("family, seed, dtype, hw", [("rotate", 627, "f32", (7, 7)), ("scale", 24, "f64", (7, 3))])
def test_regression_nan_pixel_at_an_exact_integer_sampling_point(worker, family, seed, dtype, hw):
    """A NaN pixel that the reference reads with weight 0 (an exact-integer sampling coordinate: 0 * NaN = NaN)
    where the kernel's coordinate rounds to the other side of the integer and skips it: the kernel's finite value is
    the right one (fuzz_cases_ops._nonfinite_oracle); the check used to call it a hidden NaN."""
    case = {"seed": seed, "dtype": dtype, "n": 2, "C": 1, "H": hw[0], "W": hw[1], "special": "nan",
            "noncontig": False, "bad": None, "backend": "cpu", "families": [family], "extreme": False}
    _check(worker, "fuzz_cases_ops:run_augment", case)


def test_regression_nonfinite_aug_params_are_refused(worker):
    """A NaN rotation or scale used to give zeros on the fused kernels (the reference gives NaN)."""
    for fam in ("rotate", "scale", "color", "flip"):
        case = {"seed": 2, "dtype": "f32", "n": 2, "C": 1, "H": 4, "W": 4, "special": None, "noncontig": False,
                "bad": None, "backend": "cpu", "families": [fam], "extreme": True, "special_aug": "nan"}
        out = worker.run("fuzz_cases_ops:run_augment", case)
        assert out["status"] == "error" and "NaN or Inf" in out["message"], out


@pytest.mark.slow
def test_fuzz_ops_long_profile(capsys):
    """Thousands of cases over every runner; reports the count and the crashes (must be 0)."""
    w = Worker()
    tw = Worker(env={"TRITON_INTERPRET": "1"}, timeout=600)
    plan = [(w, "run_generate", gen_cases(), 1500), (w, "run_augment", aug_cases(), 1500),
            (w, "run_raw_genaug", RAW_CASES, 1000), (w, "run_engine", ENGINE_CASES, 400),
            (tw, "run_augment", aug_cases(backends=("triton",), small=True), 40),
            (tw, "run_generate", gen_cases(backends=("triton",), small=True), 15)]
    try:
        for wk, fn, strategy, n in plan:
            drive(wk, f"fuzz_cases_ops:{fn}", strategy, n)
    finally:
        w.close()
        tw.close()
    stats = w.stats + tw.stats
    bad = w.bad + tw.bad
    with capsys.disabled():
        print(f"\nfuzz ops long profile: {stats['cases']} cases, {stats['ok']} correct results, "
              f"{stats['error']} clean errors, {stats['crash']} crashes, {stats['hang']} hangs, "
              f"{stats['wrong']} wrong results, {stats['unclear']} unclear errors")
    assert not bad, f"{len(bad)} bad outcomes, listed in {report('ops', stats, bad)}"
