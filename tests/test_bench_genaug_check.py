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


# ---- the GPU bandwidth model and report (they run on the CPU) ----------------------------------------------------
def test_minimal_bytes_by_hand():
    """n=2, M=3, c_b=1, C=2, 4x4, k=3, Hn=1, float32: every term counted by hand (see minimal_bytes' docstring)."""
    b = G.minimal_bytes(2, 3, 1, 2, 4, 4, 3, 1, 4)
    bases, params, dec_bias = 3 * 16 * 4, (2 * 9 + 2 + 2 * 2 * 4 + 2 * 2 * 9 + 2) * 4, 2 * 4
    indices, aug, images = 2 * 2 * 8, 2 * 4 * 4 + 2 * 4 * 8, 2 * 2 * 16 * 4
    assert b["forward"] == bases + params + indices + aug + images == 872
    assert b["backward"] == images + bases + (params - dec_bias) + indices + aug + bases + params == 1352
    assert b["total"] == 2224
    # float64 doubles every float term, not the int64 indices
    b64 = G.minimal_bytes(2, 3, 1, 2, 4, 4, 3, 1, 8)
    assert b64["total"] == 2 * 2224 - (2 * indices + 2 * 2 * 4 * 8)  # the int64 bytes, fwd + bwd


def test_gpu_rows_get_bandwidth_and_their_own_table(tmp_path, monkeypatch):
    import argparse
    import json

    parser = argparse.ArgumentParser()
    G.add_arguments(parser)
    args = parser.parse_args(["--batch", "4", "--size", "8", "--bases", "6", "--families", "color,flip",
                              "--warmup", "0", "--repeats", "1", "--backend", "torch"])
    row = G.run_benchmark(args)
    assert "copy_gbps" not in row and "achieved_gbps" not in row["families"]["color"]  # CPU: no bandwidth fields
    monkeypatch.setattr(G, "copy_bandwidth", lambda device: {"copy_bytes": 2, "copy_s": 1.0, "copy_gbps": 2000.0})
    G._add_bandwidth(row, args, 3, "cuda")
    total = G.minimal_bytes(4, 6, 3, 3, 8, 8, 3, 5, 4)["total"]
    assert row["families"]["flip"]["achieved_gbps"] == total / row["families"]["flip"]["fwd_bwd_s"] / 1e9
    assert row["bandwidth_fraction"] == row["mean_achieved_gbps"] / 2000.0
    gpu = dict(row, device="cuda", env=dict(row["env"], gpu="Fake H100"))
    (tmp_path / "cpu.json").write_text(json.dumps(G.run_benchmark(args)) + "\n")
    (tmp_path / "gpu.json").write_text(json.dumps(gpu) + "\n")
    doc = G.report(str(tmp_path / "cpu.json"), str(tmp_path / "gpu.json"))
    assert doc.index("| family | fused fwd+bwd (s) |") < doc.index("# GPU") < doc.index("| GB/s | of copy |")
    assert "Fake H100" in doc and "2000 GB/s" in doc and doc.count("| **mean** |") == 2
