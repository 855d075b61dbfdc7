"""``haba-fast bench genaug | iteration | objective``: bad flags are a one-line error (exit 2) before any work.

Every case runs through ``haba_fast.cli.main`` with the benchmark's work replaced by a function that fails the test
(``no_work``): a check that only fired once the work began would fail here, and nothing real runs.
"""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from haba_fast import ops, timing
from haba_fast.benchmarks import genaug, iteration, objective
from haba_fast.cli import main
from haba_fast.devices import device_memory_bytes

GA = ["bench", "genaug", "--batch", "10", "--size", "8", "--channels", "1", "--bases", "10", "--hallucinators", "1",
      "--warmup", "0", "--repeats", "1", "--families", "color"]  # fmt: skip
IT = ["bench", "iteration", "--ipc", "2", "--n-hallucinators", "2", "--syn-steps", "2", "--batch-syn", "10",
      "--width", "32", "--warmup", "0", "--repeats", "1"]  # fmt: skip
OB = ["bench", "objective", "--ipc", "1", "--batch-real", "2", "--syn-steps", "2", "--width", "32", "--warmup", "0",
      "--repeats", "1", "--no-loop"]  # fmt: skip
TOO_BIG_SEED = str(2**64)
TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def no_work(monkeypatch):
    """The benchmarks' work (building the problem or the distiller, timing) fails the test if it is reached."""

    def work(*args, **kwargs):
        raise AssertionError("the benchmark started its work before refusing the flags")

    for module, name in ((genaug, "make_problem"), (iteration, "build_distiller"), (iteration, "engine_only_fn"),
                         (objective, "build_distiller"), (timing, "measure")):  # fmt: skip
        monkeypatch.setattr(module, name, work)


def _refused(argv, message, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("haba-fast bench: error: ") and message in line, err
    return line


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--channels", "0"], "--channels must be >= 1, got 0"),
        (["--k", "0"], "--k must be >= 1, got 0"),
        (["--hallucinators", "0"], "--hallucinators must be >= 1, got 0"),
        (["--bases", "0"], "--bases must be >= 1, got 0"),
        (["--base-channels", "0"], "--base-channels must be >= 1, got 0"),  # was quietly --channels
        (["--families", ","], "--families ',' names no family: choose from color, crop"),
        (["--repeats", "0"], "--repeats must be >= 1, got 0"),
        (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
        (["--k", "9"], "--size 8 must be >= --k 9"),
        (["--seed", TOO_BIG_SEED], f"--seed must be between {-(2**63)} and {2**64 - 2}, got {TOO_BIG_SEED}"),
        pytest.param(
            ["--backend", "triton"],
            "--backend triton --device cpu: backend 'triton' cannot run generate_augment",
            marks=pytest.mark.skipif(TRITON_ON_CPU, reason="TRITON_INTERPRET=1: Triton runs on the CPU"),
        ),
    ],
)
def test_genaug_refuses(extra, message, no_work, capsys):
    _refused(GA + extra, message, capsys)


def test_genaug_refuses_tensors_larger_than_the_memory(no_work, capsys):
    """--size 10**7: 4e15 bytes of bases alone; refused from the shapes, naming the flags and the memory."""
    line = _refused(GA + ["--size", "10000000"], "the benchmark's tensors need at least", capsys)
    assert "--batch 10 --size 10000000 --channels 1 --base-channels 1 --k 3 --hallucinators 1 --bases 10" in line
    assert "of this machine's memory (RAM); use smaller sizes" in line


def test_genaug_memory_is_the_cuda_devices_on_cuda(monkeypatch):
    """On CUDA the bound is held against the card's total memory (a fake 0.1 GB card here), on a CPU the RAM's."""
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert device_memory_bytes(torch.device("cpu")) == (pages, "this machine's memory (RAM)")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: argparse.Namespace(total_memory=10**8))
    assert device_memory_bytes(torch.device("cuda:0")) == (10**8, "cuda:0's memory")
    parser = argparse.ArgumentParser()
    genaug.add_arguments(parser)
    args = parser.parse_args(GA[2:] + ["--size", "1024"])  # 4 x 50 MB of problem, 2 x 42 MB of images
    with pytest.raises(ValueError, match=r"need at least 0\.3 GB, more than the 0\.1 GB of cuda:0's memory"):
        genaug.check_args(args, torch.device("cuda:0"))
    assert genaug.check_args(args, torch.device("cpu")) == (1, ["color"])


def test_genaug_memory_bound_counts_the_tensors_it_allocates():
    """least_resident_bytes: the problem's tensors, their clones, their gradients and the reference path's copies
    (4x), the output and its gradient, the two index vectors: the nbytes of the tensors make_problem returns."""
    n, M, cb, C, size, k, Hn = 5, 4, 2, 3, 7, 3, 2
    for dtype, elem in ((torch.float32, 4), (torch.float64, 8)):
        prob = genaug.make_problem(n, size, C, cb, k, Hn, M, "cpu", dtype)
        floats = sum(prob[name].nbytes for name in genaug._PARAM_NAMES)
        indices = prob["base_idx"].nbytes + prob["hall_idx"].nbytes
        images = n * C * size * size * elem
        assert genaug.least_resident_bytes(n, M, cb, C, size, size, k, Hn, elem) == 4 * floats + 2 * images + indices
        assert genaug.least_resident_bytes(n, M, cb, C, size, size, k, Hn, elem, reference=False) == (
            3 * floats + 2 * images + indices
        )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--baseline-rss-mb", "nan"], "--baseline-rss-mb must be a finite number, got nan"),  # was NaN in the JSON
        (["--baseline-rss-mb", "-5"], "--baseline-rss-mb must be >= 0.0, got -5.0"),
        (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
        (["--max-seconds", "nan"], "--max-seconds must be a finite number, got nan"),
        (["--max-seconds", "inf"], "--max-seconds must be a finite number, got inf"),
        (["--max-seconds", "-1"], "--max-seconds must be >= 0.0, got -1.0"),
        (["--seed", TOO_BIG_SEED], f"--seed must be between {-(2**63)} and {2**64 - 2}"),
        (["--backend", "bogus"], "unknown backend 'bogus'"),
        (["--backend", "triton"], "--backend triton --device cpu: backend 'triton' cannot run trajectory_match"),
        (["--backend", "torch", "--block-kernels", "aten"], "--block-kernels chooses how the C++ op runs its blocks"),
        (["--compile-step", "--block-kernels", "default"], "--backend torch and --compile-step run the torch step"),
    ],
)
def test_iteration_refuses(extra, message, no_work, capsys):
    _refused(IT + extra, message, capsys)


@pytest.mark.parametrize("by_flag", [True, False])
def test_iteration_refuses_triton_blocks_without_a_kernel_for_the_device(by_flag, no_work, monkeypatch, capsys):
    """``--block-kernels triton`` (or the C++ op's variable) on a CPU without the interpreter: the op's own
    explanation as one line, before the first iteration (it raised a RuntimeError from inside the op)."""
    from haba_fast._ext import extension_available

    if not extension_available():
        pytest.skip("needs the C++ extension (its op runs the block kernels)")
    if "CPU" in ops.trajectory_block_kernel_devices():
        pytest.skip("Triton block kernels registered for CPU tensors (TRITON_INTERPRET=1)")
    monkeypatch.delenv(ops.BLOCK_KERNELS_ENV, raising=False)
    if by_flag:
        argv, asked = IT + ["--block-kernels", "triton"], "--block-kernels triton"
    else:
        monkeypatch.setenv(ops.BLOCK_KERNELS_ENV, "triton")
        argv, asked = IT, f"{ops.BLOCK_KERNELS_ENV}=triton"
    line = _refused(argv, f"{asked} --device cpu: no Triton block kernel for cpu tensors (Triton runs on CUDA", capsys)
    assert "TRITON_INTERPRET=1" in line


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
        (["--objectives", ","], "--objectives ',' names no objective: choose among mtt, dc, dsa, dm"),
        (["--parameterizations", ","], "--parameterizations ',' names no parameterization: choose among pixels"),
        (["--objectives", "dm,bogus"], "unknown objective 'bogus'"),  # was found after dm's rows ran
        (["--parameterizations", "pixels,bogus"], "unknown parameterization 'bogus'"),
        (["--objectives", "dm", "--engine", "bogus"], "unknown engine 'bogus'"),
        (["--objectives", "mtt,dc", "--outer-loop", "0"], "--outer-loop must be >= 1, got 0"),
        (["--objectives", "dm", "--inner-loop", "2"], "--outer-loop / --inner-loop apply to the dc and dsa objectives"),
        (["--seed", TOO_BIG_SEED], f"--seed must be between {-(2**63)} and {2**64 - 2}"),
    ],
)
def test_objective_refuses(extra, message, no_work, capsys):
    _refused(OB + extra, message, capsys)


def test_objective_loops_reach_only_the_dc_and_dsa_rows():
    """``--objectives mtt,dc --outer-loop 2``: the mtt row's config gets no loops (DistillConfig refuses them for mtt,
    which stopped the run at its mtt row)."""
    parser = argparse.ArgumentParser()
    objective.add_arguments(parser)
    args = parser.parse_args(OB[2:] + ["--objectives", "mtt,dc", "--outer-loop", "2", "--inner-loop", "1"])
    assert objective.check_args(args) == (["mtt", "dc"], ["pixels", "haba"])
    assert objective.build_distiller(args, "mtt", "pixels").cfg.outer_loop is None
    assert objective.build_distiller(args, "dc", "pixels").cfg.outer_loop == 2
