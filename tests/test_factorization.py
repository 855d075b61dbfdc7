"""Pixels / HaBa parameterizations, storage accounting, and checkpoint formats (reference + our own)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from utils import assert_close, devices

from haba_fast.factorization import (
    FORMAT,
    HaBa,
    Pixels,
    Storage,
    budget_bpc,
    hallucinator_floats,
    load_synthetic,
    reference_file_names,
)

# (K, bpc, C, c_b, H, W, k, Hn): odd and prime sizes, single-channel bases, non-square images.
SHAPES = [
    (3, 2, 3, 3, 7, 11, 3, 4),
    (2, 3, 1, 1, 5, 5, 2, 2),
    (3, 1, 3, 1, 13, 8, 5, 3),
    (5, 2, 2, 2, 6, 9, 1, 1),
]


def make(shape, seed=0, dtype=torch.float32):
    K, bpc, C, cb, H, W, k, Hn = shape
    g = torch.Generator().manual_seed(seed)
    haba = HaBa(K, bpc, C, (H, W), n_hallucinators=Hn, kernel_size=k, base_channels=cb, generator=g).to(dtype)
    with torch.no_grad():  # scale/shift away from their 1/0 init so a wrong use of them shows
        haba.scale.uniform_(0.5, 1.5, generator=g)
        haba.shift.normal_(0, 0.3, generator=g)
    return haba


def manual_sample(haba, b, h):
    """dec(scale ⊙ enc(basis) + shift) for one pair, with plain F.conv2d / F.conv_transpose2d."""
    z = F.conv2d(haba.bases[b : b + 1], haba.enc_weight[h], haba.enc_bias[h])
    z = haba.scale[h] * z + haba.shift[h]
    return F.conv_transpose2d(z, haba.dec_weight[h], haba.dec_bias[h])[0]


class RefStyle(nn.Module):
    """The reference hallucinator's structure (enc Conv2d, scale/shift [1, C, H-k+1, W-k+1], dec ConvTranspose2d)."""

    def __init__(self, cb, C, H, W, k):
        super().__init__()
        self.enc = nn.Conv2d(cb, C, k)
        self.scale = nn.Parameter(torch.rand(1, C, H - k + 1, W - k + 1) + 0.5)
        self.shift = nn.Parameter(torch.randn(1, C, H - k + 1, W - k + 1))
        self.dec = nn.ConvTranspose2d(C, C, k)

    def forward(self, x):
        return self.dec(self.scale * self.enc(x) + self.shift)


# ------------------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_generate_matches_per_sample_convs(shape, dtype):
    haba = make(shape, dtype=dtype)
    M, Hn = haba.num_bases, haba.n_hallucinators
    g = torch.Generator().manual_seed(1)
    # Repeated bases, mixed hallucinators, unsorted.
    base_idx = torch.cat([torch.randint(M, (7,), generator=g), torch.tensor([0, 0, M - 1])])
    hall_idx = torch.randint(Hn, (base_idx.numel(),), generator=g)
    hall_idx[-2] = Hn - 1
    out = haba.generate(base_idx, hall_idx)
    assert out.shape == (base_idx.numel(), haba.channels, *haba.im_size) and out.dtype == dtype
    expected = torch.stack([manual_sample(haba, int(b), int(h)) for b, h in zip(base_idx, hall_idx)])
    assert_close(out, expected)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_generate_gradients_match_per_sample_convs(shape):
    haba = make(shape, dtype=torch.float64)
    base_idx = torch.tensor([1, 0, 1, haba.num_bases - 1])
    hall_idx = torch.tensor([0, haba.n_hallucinators - 1, 0, 0])
    w = torch.randn(len(base_idx), haba.channels, *haba.im_size, dtype=torch.float64)
    params = list(haba.parameters())
    g1 = torch.autograd.grad((haba.generate(base_idx, hall_idx) * w).sum(), params)
    manual = torch.stack([manual_sample(haba, int(b), int(h)) for b, h in zip(base_idx, hall_idx)])
    g2 = torch.autograd.grad((manual * w).sum(), params)
    for a, b, p in zip(g1, g2, params):
        assert_close(a, b), p.shape


def test_generate_gradcheck_float64():
    haba = make((2, 1, 2, 1, 5, 4, 3, 2), dtype=torch.float64)
    base_idx, hall_idx = torch.tensor([0, 1, 1]), torch.tensor([1, 0, 1])

    def gen(bases, enc_w, enc_b, scale, shift, dec_w, dec_b):
        # HaBa.generate reads its own Parameters: functional_call swaps the inputs in (forward = generate).
        return torch.func.functional_call(
            haba, {"bases": bases, "enc_weight": enc_w, "enc_bias": enc_b, "scale": scale, "shift": shift,
                   "dec_weight": dec_w, "dec_bias": dec_b}, (base_idx, hall_idx))

    inputs = tuple(p.detach().clone().requires_grad_(True) for p in haba.hallucinator_parameters())
    inputs = (haba.bases.detach().clone().requires_grad_(True),) + inputs
    assert torch.autograd.gradcheck(gen, inputs, fast_mode=True)


def test_generate_int_hall_and_index_errors():
    haba = make(SHAPES[0])
    b = torch.tensor([2, 0, 2])
    assert torch.equal(haba.generate(b, 1), haba.generate(b, torch.tensor([1, 1, 1])))
    with pytest.raises(ValueError, match="base_idx out of range"):
        haba.generate(torch.tensor([haba.num_bases]), 0)
    with pytest.raises(ValueError, match="hall_idx out of range"):
        haba.generate(b, haba.n_hallucinators)
    with pytest.raises(ValueError, match="same length"):
        haba.generate(b, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer"):
        haba.generate(torch.tensor([0.0]), 0)
    with pytest.raises(ValueError, match="1-D"):
        haba.generate(torch.tensor([[0]]), 0)


def test_labels_pairs_sample_batch_materialize():
    K, bpc, Hn = 3, 2, 4
    haba = make((K, bpc, 3, 3, 7, 11, 3, Hn))
    assert haba.base_labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(haba.labels, haba.base_labels) and haba.num_samples == K * bpc and haba.num_pairs == K * bpc * Hn
    x, y = haba.all_pairs()
    assert x.shape == (K * bpc * Hn, 3, 7, 11)
    for r in (0, 5, Hn * 3 + 2, K * bpc * Hn - 1):  # row b*Hn + h
        b, h = divmod(r, Hn)
        assert_close(x[r], manual_sample(haba, b, h))
        assert y[r] == b // bpc

    xb, yb = haba.sample_batch(torch.tensor([5, 1, 1]), torch.Generator().manual_seed(3))
    assert yb.tolist() == [2, 0, 0]
    matches = [h for h in range(Hn) if torch.allclose(xb, haba.generate(torch.tensor([5, 1, 1]), h))]
    assert len(matches) == 1, "one hallucinator for the whole batch"
    xh, _ = haba.sample_batch(torch.tensor([5, 1]), hall=torch.tensor([0, 3]))
    assert_close(xh, torch.stack([manual_sample(haba, 5, 0), manual_sample(haba, 1, 3)]))

    m1, l1 = haba.materialize(torch.Generator().manual_seed(4))
    m2, _ = haba.materialize(torch.Generator().manual_seed(4))
    assert torch.equal(m1, m2) and not m1.requires_grad and torch.equal(l1, haba.base_labels)
    with torch.no_grad():
        table = torch.stack([torch.stack([manual_sample(haba, b, h) for h in range(Hn)]) for b in range(K * bpc)])
    used = set()
    for s in range(4, 8):
        m, _ = haba.materialize(torch.Generator().manual_seed(s))
        for b in range(K * bpc):
            hs = [h for h in range(Hn) if torch.allclose(m[b], table[b, h], atol=1e-6)]
            assert len(hs) == 1
            used.add(hs[0])
    assert len(used) > 1  # drawn per basis, not one for all
    with pytest.raises(TypeError, match="torch.Generator"):
        haba.sample_batch(torch.tensor([0]), 3)


# ------------------------------------------------------------------------------------------ init
def test_default_init_distributions_and_determinism():
    C, cb, k, Hn = 3, 1, 3, 20
    a, b, c = (HaBa(4, 2, C, 9, n_hallucinators=Hn, kernel_size=k, base_channels=cb,
                    generator=torch.Generator().manual_seed(s)) for s in (5, 5, 6))
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if name not in ("scale", "shift"):
            assert not torch.equal(pa, pc), name
    enc_bound, dec_bound = 1 / math.sqrt(cb * k * k), 1 / math.sqrt(C * k * k)
    for p, bound in ((a.enc_weight, enc_bound), (a.enc_bias, enc_bound), (a.dec_weight, dec_bound),
                     (a.dec_bias, dec_bound)):
        assert p.abs().max() <= bound and p.abs().max() > 0.8 * bound
        assert abs(p.mean().item()) < 0.25 * bound
    # PyTorch's own default init has the same bounds (checks the fan-in convention for ConvTranspose2d).
    ref_dec = nn.ConvTranspose2d(C, C, k)
    ref_enc = nn.Conv2d(cb, C, k)
    assert ref_dec.weight.abs().max() <= dec_bound and ref_enc.weight.abs().max() <= enc_bound
    assert torch.equal(a.scale, torch.ones_like(a.scale)) and torch.equal(a.shift, torch.zeros_like(a.shift))
    assert abs(a.bases.std().item() - 1) < 0.15


@pytest.mark.parametrize("cb", [3, 1])
def test_init_from_real(cb):
    K, bpc, C, H, W = 3, 2, 3, 5, 7
    g = torch.Generator().manual_seed(0)
    images = torch.randn(40, C, H, W, generator=g)
    labels = torch.arange(40) % K
    haba = HaBa(K, bpc, C, (H, W), n_hallucinators=2, base_channels=cb)
    haba.init_from_real(images, labels, torch.Generator().manual_seed(1))
    src = images if cb == C else images.mean(dim=1, keepdim=True)
    chosen = []
    for i in range(K * bpc):
        hits = [j for j in range(40) if torch.equal(haba.bases[i], src[j])]
        assert len(hits) == 1 and labels[hits[0]] == i // bpc
        chosen.append(hits[0])
    assert len(set(chosen)) == K * bpc  # distinct images
    again = HaBa(K, bpc, C, (H, W), n_hallucinators=2, base_channels=cb).init_from_real(
        images, labels, torch.Generator().manual_seed(1))
    assert torch.equal(again.bases, haba.bases)

    class DS:  # anything with the Dataset attributes
        train_images, train_labels = images, labels

    ds_init = HaBa(K, bpc, C, (H, W), n_hallucinators=2, base_channels=cb).init_from_real(
        DS(), generator=torch.Generator().manual_seed(1))
    assert torch.equal(ds_init.bases, haba.bases)
    positional = HaBa(K, bpc, C, (H, W), n_hallucinators=2, base_channels=cb).init_from_real(
        DS(), torch.Generator().manual_seed(1))
    assert torch.equal(positional.bases, haba.bases)

    pix = Pixels(K, 4, C, (H, W)).init_from_real(images, labels, torch.Generator().manual_seed(2))
    for i in range(K * 4):
        assert any(torch.equal(pix.images[i], images[j]) and labels[j] == i // 4 for j in range(40))


def test_init_from_real_errors():
    haba = HaBa(3, 2, 3, 5, n_hallucinators=1)
    images, labels = torch.randn(10, 3, 5, 5), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    with pytest.raises(ValueError, match=r"class 1 has 1 real images, 2 are needed"):
        haba.init_from_real(images, torch.tensor([0, 0, 0, 1, 2, 2, 2, 2, 2, 2]))
    with pytest.raises(ValueError, match=r"images must be \[N, 3, 5, 5\]"):
        haba.init_from_real(torch.randn(10, 1, 5, 5), labels)
    with pytest.raises(ValueError, match="labels must be"):
        haba.init_from_real(images, labels[:5])
    with pytest.raises(TypeError, match="integer"):
        haba.init_from_real(images, labels.float())
    with pytest.raises(TypeError, match="Generator"):
        haba.init_from_real(images, labels, generator=3)


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"bpc": 0}, "bpc must be a positive int, got 0"),
        ({"kernel_size": 9}, r"kernel_size 9 is larger than the image \(8x8\)"),
        ({"n_hallucinators": -1}, "n_hallucinators must be a positive int, got -1"),
        ({"im_size": (5,)}, r"im_size must be an int or a pair \(H, W\) of positive ints, got \(5,\)"),
    ],
)
def test_constructor_errors(bad, match):
    kw = {"num_classes": 2, "bpc": 1, "channels": 3, "im_size": 8, "n_hallucinators": 2, "kernel_size": 3}
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        HaBa(**kw)


# ------------------------------------------------------------------------------------------ storage
def test_storage_hand_counts():
    haba = HaBa(10, 2, 3, 32, n_hallucinators=5, kernel_size=3)
    # bases 10*2*3*32*32 = 61,440; one hallucinator: enc 3*3*9+3 = 84, scale+shift 2*3*30*30 = 5,400,
    # dec 3*3*9+3 = 84 -> 5,568; five of them 27,840. Total 89,280 = 29.0625 images of 3*32*32.
    assert hallucinator_floats(3, 3, 3, 32) == 5568
    s = haba.storage(50000)
    assert s == Storage(89280, 89280 / 3072, 100 * (89280 / 3072) / 50000)
    assert str(s) == "89,280 floats = 29.1 images (0.058% of the training set)"
    assert haba.storage().percent_of_train is None and str(haba.storage()) == "89,280 floats = 29.1 images"
    single = HaBa(10, 2, 3, 32, n_hallucinators=5, kernel_size=3, base_channels=1)
    assert single.storage().floats == 10 * 2 * 1024 + 5 * (3 * 1 * 9 + 3 + 5400 + 84)
    pix = Pixels(10, 3, 1, 28)
    assert pix.storage(60000) == Storage(30 * 784, 30.0, 0.05)
    assert str(pix.storage(60000)) == "23,520 floats = 30.0 images (0.05% of the training set)"
    with pytest.raises(ValueError, match="train_size"):
        pix.storage(0)


def test_budget_bpc_paper_table_and_bounds():
    # CIFAR-10, 5 hallucinators, k=3: the paper's BPC 9 / 49 at IPC 10 / 50 ...
    assert budget_bpc(10, 5, 3, 3, 3, 32, num_classes=10) == 9
    assert budget_bpc(50, 5, 3, 3, 3, 32, num_classes=10) == 49
    # ... but its BPC 1 at IPC 1 exceeds an exact count (30,720 + 27,840 > 30,720 floats).
    with pytest.raises(ValueError, match=r"IPC >= 1\.91"):
        budget_bpc(1, 5, 3, 3, 3, 32, num_classes=10)
    assert budget_bpc(1, 1, 3, 3, 1, 32, num_classes=10) == 2  # (30,720 - 5,514) // 10,240
    # The answer is the largest bpc whose actual storage fits, on odd shapes too.
    for ipc, Hn, k, C, cb, size, K in [(3, 2, 3, 3, 1, (7, 11), 3), (5, 4, 2, 1, 1, 13, 7), (10, 1, 5, 3, 3, 9, 2)]:
        bpc = budget_bpc(ipc, Hn, k, C, cb, size, num_classes=K)
        H, W = (size, size) if isinstance(size, int) else size
        budget = K * ipc * C * H * W
        fits = HaBa(K, bpc, C, size, n_hallucinators=Hn, kernel_size=k, base_channels=cb).storage().floats
        over = HaBa(K, bpc + 1, C, size, n_hallucinators=Hn, kernel_size=k, base_channels=cb).storage().floats
        assert fits <= budget < over
    with pytest.raises(ValueError, match="ipc"):
        budget_bpc(0, 5, 3, 3, 3, 32, num_classes=10)


# ------------------------------------------------------------------------------------------ reference format
def _state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("it", ["best", 7])
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_reference_round_trip_bit_exact(tmp_path, shape, it):
    haba = make(shape)
    haba.meta["lr"] = 0.0123
    paths = haba.to_reference(tmp_path, it=it)
    names = reference_file_names(it)
    assert [p.name for p in paths] == [names["images"], names["styles"], names["lr"]]
    assert names["styles"] == ("weights_best.pt" if it == "best" else "styles_7.pt")
    loaded = HaBa.load_reference_dir(tmp_path, it=it, num_classes=shape[0])
    _state_equal(haba, loaded)
    assert loaded.meta["lr"] == 0.0123
    again = HaBa.from_reference(paths[0], paths[1], num_classes=shape[0])
    _state_equal(haba, again)
    via_images_file = load_synthetic(paths[0], num_classes=shape[0])
    _state_equal(haba, via_images_file)
    # What the files hold is what the reference's torch.save(...) writes: a tensor and a ModuleList state dict.
    raw_images = torch.load(paths[0])
    assert isinstance(raw_images, torch.Tensor) and raw_images.shape == haba.bases.shape
    raw = torch.load(paths[1])
    assert sorted(raw) == sorted(f"{i}.{f}" for i in range(shape[-1]) for f in
                                 ("enc.weight", "enc.bias", "scale", "shift", "dec.weight", "dec.bias"))


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_reference_modulelist_state_dict_generates_the_same(shape):
    K, bpc, C, cb, H, W, k, Hn = shape
    torch.manual_seed(3)
    styles = nn.ModuleList([RefStyle(cb, C, H, W, k) for _ in range(Hn)])
    images = torch.randn(K * bpc, cb, H, W)
    haba = HaBa.from_reference(images, styles.state_dict(), K)
    assert (haba.bpc, haba.channels, haba.base_channels, haba.kernel_size, haba.n_hallucinators) == (bpc, C, cb, k, Hn)
    assert torch.equal(haba.bases, images)
    b = torch.tensor([0, K * bpc - 1, 0])
    for h in range(Hn):
        with torch.no_grad():
            assert_close(haba.generate(b, h), styles[h](images[b]))
    # ... and back: the exported state dict loads into the reference's module structure.
    fresh = nn.ModuleList([RefStyle(cb, C, H, W, k) for _ in range(Hn)])
    fresh.load_state_dict(haba.reference_styles())
    for p, q in zip(fresh.parameters(), styles.parameters()):
        assert torch.equal(p, q)


def test_reference_syn_lr_optional_and_in_styles(tmp_path):
    haba = make(SHAPES[1])
    haba.to_reference(tmp_path)  # no lr known -> no lr file
    assert not (tmp_path / "syn_lr_best.pt").exists()
    assert "lr" not in HaBa.load_reference_dir(tmp_path, num_classes=2).meta
    torch.save(torch.tensor(0.03), tmp_path / "syn_lr_best.pt")
    assert HaBa.load_reference_dir(tmp_path, num_classes=2).meta["lr"] == pytest.approx(0.03)
    sd = dict(haba.reference_styles(), syn_lr=torch.tensor(0.5))
    assert HaBa.from_reference(haba.bases.detach(), sd, 2).meta["lr"] == 0.5


def test_reference_errors(tmp_path):
    haba = make(SHAPES[0])  # K=3, 3 channels, 7x11, k=3, 4 hallucinators
    images, styles = haba.bases.detach(), haba.reference_styles()
    missing = dict(styles)
    del missing["2.dec.bias"]
    with pytest.raises(ValueError, match=r"missing key '2\.dec\.bias'"):
        HaBa.from_reference(images, missing, 3)
    extra = dict(styles, **{"0.enc.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected key '0\.enc\.extra'"):
        HaBa.from_reference(images, extra, 3)
    with pytest.raises(ValueError, match=r"scale.*expected \[1, 3, 7, 5\]"):  # styles from a 9x11 run
        HaBa.from_reference(torch.randn(6, 3, 9, 7), styles, 3)
    with pytest.raises(ValueError, match="input channels"):
        HaBa.from_reference(images[:, :1], styles, 3)
    with pytest.raises(ValueError, match="multiple of num_classes=4"):
        HaBa.from_reference(images, styles, 4)
    bad = dict(styles)
    bad["1.enc.bias"] = torch.zeros(5)
    with pytest.raises(ValueError, match="differs in shape"):
        HaBa.from_reference(images, bad, 3)
    with pytest.raises(ValueError, match=r"images must be \[K\*bpc"):
        HaBa.from_reference(images[0], styles, 3)
    with pytest.raises(ValueError, match="no hallucinator keys"):
        HaBa.from_reference(images, {}, 3)

    haba.to_reference(tmp_path)
    (tmp_path / "weights_best.pt").unlink()
    with pytest.raises(FileNotFoundError, match="weights_best.pt"):
        HaBa.load_reference_dir(tmp_path, num_classes=3)
    with pytest.raises(FileNotFoundError, match=r"images_5\.pt not found.*images_best\.pt"):
        HaBa.load_reference_dir(tmp_path, it=5, num_classes=3)
    with pytest.raises(FileNotFoundError, match="not found"):
        HaBa.load_reference_dir(tmp_path / "nope")
    (tmp_path / "weights_best.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="corrupt"):
        HaBa.load_reference_dir(tmp_path, num_classes=3)
    torch.save({"a": 1}, tmp_path / "weights_best.pt")
    with pytest.raises(ValueError, match="unexpected key 'a'"):
        HaBa.load_reference_dir(tmp_path, num_classes=3)
    torch.save(styles, tmp_path / "weights_best.pt")
    with pytest.raises(ValueError, match="styles.*file"):
        load_synthetic(tmp_path / "weights_best.pt")
    with pytest.raises(ValueError, match="iteration"):
        reference_file_names(-1)


def test_pixels_reference_round_trip(tmp_path):
    pix = Pixels(4, 3, 1, (5, 7), generator=torch.Generator().manual_seed(0))
    assert pix.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    paths = pix.to_reference(tmp_path, it=3)
    assert [p.name for p in paths] == ["images_3.pt", "labels_3.pt"]
    back = load_synthetic(tmp_path, it=3)
    assert isinstance(back, Pixels)
    _state_equal(pix, back)
    torch.save(torch.tensor([1, 0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3]), tmp_path / "labels_3.pt")
    with pytest.raises(ValueError, match="class-major"):
        load_synthetic(tmp_path, it=3)
    with pytest.raises(ValueError, match="needs labels or num_classes"):
        Pixels.from_reference(pix.images.detach())
    assert Pixels.from_reference(pix.images.detach(), num_classes=4).ipc == 3


# ------------------------------------------------------------------------------------------ own format
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_own_format_round_trip(tmp_path, dtype):
    haba = make(SHAPES[2], dtype=dtype)
    zca = {"mean": torch.randn(12), "transform": torch.randn(12, 12)}
    meta = {"dataset": "cifar10", "lr": 0.017, "zca": zca, "iteration": 42, "mean": [0.5, 0.4, 0.3]}
    path = haba.save(tmp_path / "syn.pt", meta)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and raw["kind"] == "haba"
    back = load_synthetic(path)
    assert isinstance(back, HaBa) and back.extra_repr() == haba.extra_repr()
    _state_equal(haba, back)
    assert back.meta["dataset"] == "cifar10" and back.meta["lr"] == 0.017 and back.meta["iteration"] == 42
    assert torch.equal(back.meta["zca"]["transform"], zca["transform"])
    assert isinstance(HaBa.load(path), HaBa)
    with pytest.raises(ValueError, match="not a Pixels"):
        Pixels.load(path)

    pix = Pixels(3, 2, 3, 4, generator=torch.Generator().manual_seed(1)).to(dtype)
    pix.save(tmp_path / "pix.pt", {"dataset": "digits"})
    pback = load_synthetic(tmp_path / "pix.pt")
    assert isinstance(pback, Pixels) and pback.meta == {"dataset": "digits"}
    _state_equal(pix, pback)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_own_format_errors(tmp_path):
    haba = make(SHAPES[1])
    with pytest.raises(TypeError, match=r"meta\['obj'\] is a object"):
        haba.save(tmp_path / "x.pt", {"obj": object()})
    assert not (tmp_path / "x.pt").exists()
    with pytest.raises(FileNotFoundError, match="not found"):
        load_synthetic(tmp_path / "missing.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt"):
        load_synthetic(tmp_path / "corrupt.pt")
    payload = torch.load(haba.save(tmp_path / "ok.pt"), weights_only=True)
    torch.save(dict(payload, format="haba_fast/99"), tmp_path / "future.pt")
    with pytest.raises(ValueError, match="haba_fast/99"):
        load_synthetic(tmp_path / "future.pt")
    torch.save(dict(payload, kind="gan"), tmp_path / "kind.pt")
    with pytest.raises(ValueError, match="unknown synthetic-set kind 'gan'"):
        load_synthetic(tmp_path / "kind.pt")
    sd = dict(payload["state_dict"])
    sd["bases"] = sd["bases"][:1]
    torch.save(dict(payload, state_dict=sd), tmp_path / "shape.pt")
    with pytest.raises(ValueError, match="does not match its args"):
        load_synthetic(tmp_path / "shape.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="images_<it>.pt"):
        load_synthetic(tmp_path / "tensor.pt")
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a synthetic-set checkpoint"):
        load_synthetic(tmp_path / "other.pt")


# ------------------------------------------------------------------------------------------ devices
@pytest.mark.parametrize("device", devices())
def test_haba_on_device_matches_cpu_and_saves(tmp_path, device):
    cpu = make(SHAPES[0])
    dev = make(SHAPES[0]).to(device)
    b, h = torch.tensor([0, 5, 5, 2]), torch.tensor([3, 0, 1, 3])
    out = dev.generate(b.to(device), h.to(device))
    assert out.device.type == torch.device(device).type
    assert_close(out.cpu(), cpu.generate(b, h))
    x, y = dev.materialize(torch.Generator().manual_seed(0))  # CPU generator, device module
    xc, yc = cpu.materialize(torch.Generator().manual_seed(0))
    assert_close(x.cpu(), xc)
    assert torch.equal(y.cpu(), yc)
    dev.to_reference(tmp_path / "ref")
    dev.save(tmp_path / "own.pt")
    _state_equal(cpu, load_synthetic(tmp_path / "ref", num_classes=3))
    _state_equal(cpu, load_synthetic(tmp_path / "own.pt"))
