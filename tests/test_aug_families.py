"""The augmentation family registry (haba_fast.aug_families) and the ``noise`` family on every backend.

The noise oracle below draws ε with its own loop of per-sample CPU generators (the documented semantics), sharing
no code with the library.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from utils import assert_close

from haba_fast import _reference, aug_families, ops
from haba_fast.augment import FAMILIES, AugParams, DSAConfig, apply, parse_strategy, sample, strategy_families
from haba_fast.backend import BackendUnavailableError

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(1, 8, 8), (3, 7, 9), (2, 5, 13)]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def images(n, C, H, W, dtype=torch.float64, seed=1):
    return torch.randn(n, C, H, W, generator=gen(seed), dtype=dtype)


def oracle_noise(x, seeds, stds):
    out = x.detach().clone()
    for i, (s, sd) in enumerate(zip(seeds.tolist(), stds.tolist())):
        eps = torch.randn(tuple(x.shape[1:]), generator=torch.Generator().manual_seed(s), dtype=torch.float32)
        out[i] += sd * eps.to(x.dtype)
    return out


# ---- registry ------------------------------------------------------------------------------------------
def test_registry_names_every_family_once():
    assert set(FAMILIES) | {"noise", "identity"} == set(aug_families.registered_families())
    assert set(strategy_families()) == set(FAMILIES) | {"noise"}
    for name in aug_families.registered_families():
        fam = aug_families.family(name)
        assert fam.name == name and set(fam.int_keys) <= set(fam.keys)
    with pytest.raises(ValueError, match="unknown augmentation family 'blur'"):
        aug_families.family("blur")


def test_register_family_rejects_bad_or_duplicate_names():
    class Dup(aug_families.AugFamily):
        name = "flip"

    class Under(aug_families.AugFamily):
        name = "my_family"

    with pytest.raises(ValueError, match="already registered"):
        aug_families.register_family(Dup)
    with pytest.raises(ValueError, match="without '_'"):
        aug_families.register_family(Under)


def test_kernel_codes_match_the_cpp_enum():
    """KernelCode (Python) and `enum Family` (csrc/genaug_types.h) must agree: the kernels read these numbers."""
    text = (ROOT / "csrc" / "genaug_types.h").read_text()
    body = re.search(r"enum Family : int64_t \{([^}]*)\}", text).group(1)
    cpp = {m.group(1).upper(): int(m.group(2)) for m in re.finditer(r"k(\w+) = (\d+)", body)}
    assert cpp == {c.name: int(c) for c in aug_families.KernelCode}


@pytest.mark.parametrize("family", FAMILIES)
def test_research_formulation_equals_reference(family):
    """The benchmark's research-code path computes the same values and gradients as the reference apply."""
    x = images(4, 3, 9, 11).requires_grad_(True)
    p = sample(family, 4, (9, 11), generator=gen(5))
    fam = aug_families.family(family)
    ref, res = fam.apply(x, p), fam.apply_research(x, p)
    # The research code takes cos/sin of the float32 draws (the reference: in the images' dtype): float32 tolerance.
    assert_close(res, ref, dtype=torch.float32)
    gy = images(4, 3, 9, 11, seed=2)
    assert_close(torch.autograd.grad(res, x, gy)[0], torch.autograd.grad(ref, x, gy)[0], dtype=torch.float32)


# ---- noise ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("C,H,W", SHAPES)
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noise_matches_oracle(C, H, W, n, dtype):
    p = sample("noise", n, (H, W), generator=gen(n + H))
    assert p.values["seed"].dtype == torch.int64 and p.values["std"].dtype == torch.float32
    assert torch.all(p.values["std"] == 0.05)  # DSA's ratio_noise
    x = images(n, C, H, W, dtype=dtype)
    out = _reference.augment_reference(x, p)
    assert_close(out, oracle_noise(x, p.values["seed"], p.values["std"]))
    assert not torch.equal(out, x)


def test_noise_gradient_is_identity_and_gradcheck():
    p = AugParams.noise(torch.tensor([3, 7, 11]), torch.tensor([0.5, 1.0, 2.0]))
    x = images(3, 2, 5, 6).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: apply(t, p), (x,))
    gy = images(3, 2, 5, 6, seed=4)
    assert_close(torch.autograd.grad(apply(x, p), x, gy)[0], gy)


def test_noise_replay_siamese_subsets_and_same_on_batch():
    p = sample("noise", 5, (6, 7), generator=gen(1), config=DSAConfig(noise=0.3))
    a, b = images(5, 3, 6, 7, seed=1), images(5, 3, 6, 7, seed=2)
    da, db = apply(a, p) - a, apply(b, p) - b
    assert_close(da, db)  # Siamese: the same noise on both batches
    assert_close(apply(a, p), apply(a, p))  # replay
    assert_close(apply(a[1:4], p[1:4]) - a[1:4], da[1:4])  # a subset keeps each sample's noise
    assert 0.2 < float(da.std()) < 0.4
    q = sample("noise", 4, (6, 7), generator=gen(2), same_on_batch=True)
    d = apply(a[:4], q) - a[:4]
    assert_close(d, d[:1].expand_as(d))
    r = sample("noise", 4, (6, 7), generator=gen(3))
    assert not torch.allclose(apply(a[:4], r), apply(a[:4], q))


def test_noise_in_strategies_and_config():
    assert parse_strategy("crop_noise") == ("crop", "noise")
    chain = sample("crop_noise", 3, (8, 8), generator=gen(0), mode="M")
    assert [p.family for p in chain] == ["crop", "noise"]
    x = images(3, 2, 8, 8)
    expect = _reference.augment_reference(_reference.augment_reference(x, chain[0]), chain[1])
    assert_close(apply(x, chain), expect)
    with pytest.raises(ValueError, match="noise"):
        DSAConfig(noise=-0.1)
    with pytest.raises(TypeError, match="integer"):
        AugParams.noise(torch.tensor([0.5]), torch.tensor([1.0]))


def test_noise_routes_to_torch_with_a_reason(monkeypatch):
    """The fused backends cannot run noise: auto picks torch (equal to the reference), a forced one says why."""
    from haba_fast import backend

    monkeypatch.setattr(backend, "_warned", set())  # the fallback warns once per process
    x = images(3, 2, 6, 6)
    p = sample("noise", 3, (6, 6), generator=gen(4))
    chain = [sample("flip", 3, (6, 6), generator=gen(5)), p]
    with pytest.warns(RuntimeWarning, match="noise"):
        out = ops.augment(x, chain)
    assert_close(out, _reference.augment_reference(x, chain))
    for name in ("cpu", "triton"):
        with pytest.raises(BackendUnavailableError, match="family 'noise'"):
            ops.augment(x, p, backend=name)
    from test_ops_generate import make_inputs

    tensors, bidx, hidx = make_inputs(3, 4, 2, 2, 6, 6, 3, 2, dtype=torch.float64)
    out = ops.generate_augment(*tensors, bidx, hidx, chain[::-1])
    ref = _reference.augment_reference(_reference.generate_reference(*tensors, bidx, hidx), chain[::-1])
    assert_close(out, ref)


def test_a_new_family_is_one_class(monkeypatch):
    """Registering a family is enough for sample, AugParams, apply, ops (routed to torch) and the strategies."""
    monkeypatch.setattr(aug_families, "_REGISTRY", dict(aug_families._REGISTRY))

    @aug_families.register_family
    class Invert(aug_families.AugFamily):
        name = "invert"
        keys = ("w",)
        no_kernel = "family 'invert' is a test family without kernels"

        def sample(self, n, size, g, same, cfg):
            return {"w": torch.rand(1 if same else n, generator=g).expand(n).clone()}

        def apply(self, x, p):
            return x * (1 - 2 * p.values["w"].to(x).view(-1, 1, 1, 1))

    chain = sample("flip_invert", 4, (5, 6), generator=gen(0), mode="M")
    assert [p.family for p in chain] == ["flip", "invert"] and chain[1][1:3].n == 2
    x = images(4, 2, 5, 6).requires_grad_(True)
    w = chain[1].values["w"].double().view(-1, 1, 1, 1)
    out = apply(x, chain)
    assert_close(out, _reference.augment_reference(x, chain[:1]) * (1 - 2 * w))
    gy = images(4, 2, 5, 6, seed=3)
    assert_close(torch.autograd.grad(out, x, gy)[0], _reference.augment_reference(gy * (1 - 2 * w), chain[:1]))
    with pytest.raises(BackendUnavailableError, match="test family without kernels"):
        ops.augment(x, chain, backend="cpu")
