"""``haba-fast bench genaug`` compares the fused gradients with the research-code path before it times anything."""

from __future__ import annotations

import argparse

import pytest

from haba_fast.benchmarks import genaug as G


def _args(*extra):
    parser = argparse.ArgumentParser()
    G.add_arguments(parser)
    return parser.parse_args(["--batch", "3", "--size", "6", "--bases", "4", "--hallucinators", "2", "--families",
                              "rotate", "--warmup", "0", "--repeats", "1", "--backend", "torch", *extra])


def test_wrong_gradients_stop_the_benchmark(monkeypatch):
    row = G.run_benchmark(_args())
    assert row["families"]["rotate"]["max_rel_grad_err"] < G.GRAD_RTOL["float32"]
    fused = G.fused_step
    monkeypatch.setattr(G, "fused_step", lambda *a: tuple(2 * g for g in fused(*a)))
    with pytest.raises(RuntimeError, match="rotate gradients of the torch backend differ"):
        G.run_benchmark(_args())
    assert "max_rel_grad_err" not in G.run_benchmark(_args("--no-reference"))["families"]["rotate"]
