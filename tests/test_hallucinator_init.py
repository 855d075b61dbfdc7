"""Near-identity hallucinators (``--hallucinator-init identity``): samples start as their bases.

Oracles: the bases themselves (noise 0: every sample equals its basis on the interior, 0 on the border), and the
reference init's own draws (``noise`` times them, plus the centered deltas).
"""

from __future__ import annotations

import pytest
import torch

from haba_fast import data
from haba_fast.distill import DistillConfig, build_synthetic
from haba_fast.factorization import HaBa


def _haba(C, cb, k, H=9, W=7, seed=0):
    return HaBa(num_classes=2, bpc=3, channels=C, im_size=(H, W), n_hallucinators=4, kernel_size=k,
                base_channels=cb, generator=torch.Generator().manual_seed(seed)).double()


@pytest.mark.parametrize("C, cb", [(1, 1), (3, 3), (3, 1), (2, 2)])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_noise_zero_gives_the_bases_on_the_interior(C, cb, k):
    syn = _haba(C, cb, k).init_hallucinators_identity(noise=0.0)
    n = syn.num_bases
    m = k // 2
    H, W = syn.im_size
    for h in range(syn.n_hallucinators):
        out = syn.generate(torch.arange(n), h)
        want = syn.bases.expand(n, C, H, W) if cb == 1 else syn.bases
        inner = (slice(None), slice(None), slice(m, H - m), slice(m, W - m))
        torch.testing.assert_close(out[inner], want[inner], rtol=0, atol=1e-12)
        border = torch.ones(H, W, dtype=torch.bool)
        border[m:H - m, m:W - m] = False
        assert out[:, :, border].abs().max().item() == 0.0 if m else True


def test_noise_scales_the_reference_draws():
    g_ref = torch.Generator().manual_seed(7)
    g_id = torch.Generator().manual_seed(7)
    ref = _haba(3, 3, 3).reset_hallucinators(g_ref)
    ide = _haba(3, 3, 3).init_hallucinators_identity(noise=0.25, generator=g_id)
    delta = torch.zeros(3, 3, 3, 3, dtype=torch.float64)
    for c in range(3):
        delta[c, c, 1, 1] = 1.0
    for h in range(ide.n_hallucinators):
        torch.testing.assert_close(ide.enc_weight[h], 0.25 * ref.enc_weight[h] + delta, rtol=0, atol=1e-15)
        torch.testing.assert_close(ide.dec_weight[h], 0.25 * ref.dec_weight[h] + delta, rtol=0, atol=1e-15)
    torch.testing.assert_close(ide.enc_bias, 0.25 * ref.enc_bias, rtol=0, atol=0)
    torch.testing.assert_close(ide.dec_bias, 0.25 * ref.dec_bias, rtol=0, atol=0)
    assert torch.equal(ide.scale, torch.ones_like(ide.scale)) and torch.equal(ide.shift, torch.zeros_like(ide.shift))
    # the hallucinators differ, and each sample stays near its basis
    a, b = ide.generate(torch.arange(6), 0), ide.generate(torch.arange(6), 1)
    assert (a - b).abs().max() > 1e-3
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    rel = (a - ide.bases)[inner].norm() / ide.bases[inner].norm()
    assert rel < 1.0


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="odd kernel_size"):
        _haba(1, 1, 2).init_hallucinators_identity()
    with pytest.raises(ValueError, match="noise must be >= 0"):
        _haba(1, 1, 3).init_hallucinators_identity(noise=-1.0)
    with pytest.raises(ValueError, match="noise must be >= 0"):
        _haba(1, 1, 3).init_hallucinators_identity(noise=float("nan"))
    with pytest.raises(ValueError, match="hallucinator-init"):
        DistillConfig(hallucinator_init="zeros").validate()


def test_distill_config_and_flag_pick_the_same_bases():
    """``--hallucinator-init identity``: the same seed picks the same bases as the reference init; only the
    hallucinators differ (near-identity)."""
    from haba_fast.cli import build_parser
    from haba_fast.commands.distill import config_from_args

    args = build_parser().parse_args(["distill", "--dataset", "digits", "--hallucinator-init", "identity"])
    cfg = config_from_args(args)
    assert cfg.hallucinator_init == "identity"
    assert config_from_args(build_parser().parse_args(["distill", "--dataset", "digits"])).hallucinator_init == \
        "reference"
    ds = data.load("digits")
    syns = {}
    for init in ("reference", "identity"):
        c = DistillConfig(dataset="digits", ipc=2, n_hallucinators=3, hallucinator_init=init)
        syns[init] = build_synthetic(c, ds, torch.Generator().manual_seed(3), torch.device("cpu"))
    assert torch.equal(syns["reference"].bases, syns["identity"].bases)
    assert not torch.equal(syns["reference"].enc_weight, syns["identity"].enc_weight)
    ide = syns["identity"]
    m = ide.kernel_size // 2
    assert torch.all(ide.enc_weight[:, 0, 0, m, m] > 0.5)  # the delta dominates the 0.1-scaled draw
