"""``haba-fast bench genaug`` compares the fused gradients with the research-code path before it times anything."""

from __future__ import annotations

import argparse

import pytest
import torch

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


def test_float64_reference_keeps_every_bit():
    """The research-code path holds the float64 parameters exactly (not rounded through float32 modules), so a
    float64 benchmark meets its 1e-10 check."""
    prob = G.make_problem(3, 6, 2, 2, 3, 2, 4, "cpu", torch.float64)
    mods = G.reference_modules(prob)
    assert all(p.dtype == torch.float64 for p in mods.parameters())
    for h, m in enumerate(mods):
        assert torch.equal(m.enc.weight, prob["enc_weight"][h]) and torch.equal(m.dec.weight, prob["dec_weight"][h])
        assert torch.equal(m.scale[0], prob["scale"][h]) and torch.equal(m.shift[0], prob["shift"][h])
    args = _args("--dtype", "float64")
    args.families = ",".join(G.FAMILIES)  # rotate and scale build their matrices from the sampled values
    row = G.run_benchmark(args)
    for fam in G.FAMILIES:
        assert row["families"][fam]["max_rel_grad_err"] < G.GRAD_RTOL["float64"], fam
