"""`haba-fast info` and `haba-fast export`, run in-process through haba_fast.cli.main; plus haba_fast.visualize."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from haba_fast import visualize
from haba_fast.cli import main
from haba_fast.factorization import HaBa, Pixels

OPS = ("generate", "augment", "generate_augment", "trajectory_match")


# ------------------------------------------------------------------------------------------ info
def test_info_text(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out and "python" in out and "triton" in out
    assert "C++ extension" in out
    for op in OPS:
        assert op in out


def test_info_json(capsys, monkeypatch):
    monkeypatch.delenv("HABA_FAST_BACKEND", raising=False)
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["torch"] == torch.__version__
    assert info["devices"]["cpu"]["torch_threads"] == torch.get_num_threads()
    assert info["devices"]["cuda"]["available"] == torch.cuda.is_available()
    assert isinstance(info["extension"]["loaded"], bool)
    assert ("ops" in info["extension"]) == info["extension"]["loaded"]
    assert set(info["backends"]) == set(OPS)
    for op in OPS:
        assert info["backends"][op]["cpu"]["backend"] in ("torch", "cpu")
        if info["backends"][op]["cpu"]["backend"] == "torch":
            assert info["backends"][op]["cpu"]["note"]  # a fallback says why


def test_info_reports_the_trajectory_block_implementation(capsys, monkeypatch):
    from haba_fast import _ext

    if not _ext.extension_available():
        pytest.skip("the C++ extension is not built")
    monkeypatch.setenv("HABA_FAST_TRAJECTORY_FUSED", "0")
    assert main(["info", "--json"]) == 0
    blocks = json.loads(capsys.readouterr().out)["extension"]["trajectory_blocks"]
    assert blocks["mode"] == "aten"
    if importlib.util.find_spec("triton"):  # CPU too when TRITON_INTERPRET=1 was set as the extension loaded
        assert blocks["triton_kernels_for"][0] == "CUDA"
    else:
        assert blocks["triton_kernels_for"] == []
    monkeypatch.setenv("HABA_FAST_TRAJECTORY_FUSED", "triton")
    assert main(["info"]) == 0
    assert "trajectory blocks: triton (" in capsys.readouterr().out


def test_info_reports_a_forced_backend_that_cannot_run(capsys, monkeypatch):
    monkeypatch.setenv("HABA_FAST_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["environment"]["HABA_FAST_BACKEND"] == "triton"
    cpu = info["backends"]["generate"]["cpu"]
    assert cpu["backend"] is None and "triton" in cpu["error"]


def test_info_when_the_extension_did_not_load(capsys, monkeypatch):
    from haba_fast import _ext

    monkeypatch.delenv("HABA_FAST_BACKEND", raising=False)
    monkeypatch.setattr(_ext, "extension_available", lambda: False)
    monkeypatch.setattr(_ext, "extension_error", lambda: "ImportError: undefined symbol: _ZN3c10")
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["extension"] == {"loaded": False, "error": "ImportError: undefined symbol: _ZN3c10"}
    for op in OPS:
        cpu = info["backends"][op]["cpu"]
        assert cpu["backend"] == "torch" and "undefined symbol" in cpu["note"]
    assert main(["info"]) == 0
    assert "not loaded: ImportError: undefined symbol" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ export
def _haba(K=3, bpc=2, C=3, size=(8, 9), Hn=2, cb=None):
    return HaBa(K, bpc, C, size, n_hallucinators=Hn, base_channels=cb, generator=torch.Generator().manual_seed(0))


def _check_outputs(out_dir, n, C, size):
    with Image.open(out_dir / "grid.png") as im:
        im.load()
        assert im.mode == ("L" if C == 1 else "RGB") and min(im.size) >= 64
    npz = np.load(out_dir / "samples.npz")
    assert npz["images"].shape == (n, C, *size) and npz["images"].dtype == np.float32
    assert npz["labels"].shape == (n,) and npz["labels"].dtype == np.int64
    pt = torch.load(out_dir / "samples.pt", weights_only=True)
    assert torch.equal(pt["images"], torch.from_numpy(npz["images"]))
    return pt, npz


def test_export_own_haba(tmp_path, capsys):
    haba = _haba()
    haba.save(tmp_path / "syn.pt", {"dataset": "cifar10", "mean": [0.5] * 3, "std": [0.25] * 3})
    assert main(["export", str(tmp_path / "syn.pt"), "--out", str(tmp_path / "out")]) == 0
    assert "HaBa" in capsys.readouterr().out
    pt, npz = _check_outputs(tmp_path / "out", 3 * 2 * 2, 3, (8, 9))
    with torch.no_grad():
        x, y = haba.all_pairs()
    torch.testing.assert_close(pt["images"], x)
    assert torch.equal(pt["labels"], y) and pt["labels"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert pt["base_idx"].tolist()[:4] == [0, 0, 1, 1] and pt["hall_idx"].tolist()[:4] == [0, 1, 0, 1]
    # The recorded mean/std were used: "pixels" = clamp(x * std + mean, 0, 1).
    torch.testing.assert_close(torch.from_numpy(npz["pixels"]), (x * 0.25 + 0.5).clamp(0, 1))


def test_export_reference_dir_and_files(tmp_path):
    haba = _haba(K=2, bpc=1, C=3, size=(6, 6), Hn=3, cb=1)
    haba.to_reference(tmp_path / "run", it=4)
    assert main(["export", str(tmp_path / "run"), "--it", "4", "--num-classes", "2", "--out", str(tmp_path / "a")]) == 0
    pt_a, _ = _check_outputs(tmp_path / "a", 2 * 3, 3, (6, 6))
    assert main(["export", "--reference-images", str(tmp_path / "run" / "images_4.pt"), "--reference-styles",
                 str(tmp_path / "run" / "styles_4.pt"), "--num-classes", "2", "--out", str(tmp_path / "b"),
                 "--denormalize-dataset", "cifar10"]) == 0
    pt_b, npz_b = _check_outputs(tmp_path / "b", 2 * 3, 3, (6, 6))
    assert torch.equal(pt_a["images"], pt_b["images"])
    assert npz_b["pixels"].min() >= 0 and npz_b["pixels"].max() <= 1


def test_export_pixels_grayscale(tmp_path):
    pix = Pixels(4, 2, 1, 8, generator=torch.Generator().manual_seed(0))
    pix.save(tmp_path / "pix.pt")
    assert main(["export", str(tmp_path / "pix.pt"), "--out", str(tmp_path / "o"), "--denormalize-dataset",
                 "fashion-mnist"]) == 0
    pt, npz = _check_outputs(tmp_path / "o", 8, 1, (8, 8))
    assert torch.equal(pt["images"], pix.images.detach()) and torch.equal(pt["labels"], pix.labels)
    torch.testing.assert_close(torch.from_numpy(npz["pixels"]), (pix.images.detach() * 0.3530 + 0.2861).clamp(0, 1))


def test_export_uses_recorded_zca_and_dataset(tmp_path):
    from haba_fast.data import ZCA

    haba = _haba(K=2, bpc=1, C=3, size=(4, 4), Hn=2)
    zca = ZCA().fit(torch.rand(20, 3, 4, 4, generator=torch.Generator().manual_seed(1)))
    haba.save(tmp_path / "z.pt", {"dataset": "cifar10", "zca": zca.state_dict()})
    assert main(["export", str(tmp_path / "z.pt"), "--out", str(tmp_path / "z")]) == 0
    pt, npz = _check_outputs(tmp_path / "z", 4, 3, (4, 4))
    expected = zca.inverse(pt["images"]).float().clamp(0, 1)
    torch.testing.assert_close(torch.from_numpy(npz["pixels"]), expected)
    # ZCA fit on normalized images (the reference's MNIST / FashionMNIST): the inverse ZCA, then the mean/std.
    gray = _haba(K=2, bpc=1, C=1, size=(4, 4), Hn=2)
    zca1 = ZCA().fit(torch.randn(20, 1, 4, 4, generator=torch.Generator().manual_seed(2)))
    gray.save(tmp_path / "f.pt", {"dataset": "fashion-mnist", "zca": zca1.state_dict(), "mean": [0.2861],
                                  "std": [0.3530]})
    assert main(["export", str(tmp_path / "f.pt"), "--out", str(tmp_path / "f")]) == 0
    pt, npz = _check_outputs(tmp_path / "f", 4, 1, (4, 4))
    expected = (zca1.inverse(pt["images"]).float() * 0.3530 + 0.2861).clamp(0, 1)
    torch.testing.assert_close(torch.from_numpy(npz["pixels"]), expected)
    # --denormalize-dataset with a recorded ZCA: the inverse ZCA, then that dataset's mean/std (not ignored).
    argv = ["export", str(tmp_path / "f.pt"), "--out", str(tmp_path / "fm"), "--denormalize-dataset", "mnist"]
    assert main(argv) == 0
    pt, npz = _check_outputs(tmp_path / "fm", 4, 1, (4, 4))
    expected = (zca1.inverse(pt["images"]).float() * 0.3081 + 0.1307).clamp(0, 1)
    torch.testing.assert_close(torch.from_numpy(npz["pixels"]), expected)
    # No ZCA, no mean/std: the recorded dataset name gives the reference's normalization.
    haba.save(tmp_path / "d.pt", {"dataset": "CIFAR10"})
    assert main(["export", str(tmp_path / "d.pt"), "--out", str(tmp_path / "d")]) == 0
    pt, npz = _check_outputs(tmp_path / "d", 4, 3, (4, 4))
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)
    torch.testing.assert_close(torch.from_numpy(npz["pixels"]), (pt["images"] * std + mean).clamp(0, 1))


@pytest.mark.parametrize("argv, message", [
    (["export", "{tmp}/missing.pt", "--out", "{tmp}/o"], "not found"),
    (["export", "--out", "{tmp}/o"], "give a CHECKPOINT"),
    (["export", "--reference-images", "{tmp}/images_best.pt", "--out", "{tmp}/o"], "ambiguous"),
    (["export", "--reference-styles", "{tmp}/weights_best.pt", "--out", "{tmp}/o"], "need --reference-images"),
    (["export", "{tmp}/corrupt.pt", "--out", "{tmp}/o"], "corrupt"),
])
def test_export_errors(tmp_path, capsys, argv, message):
    (tmp_path / "corrupt.pt").write_bytes(b"nope")
    _haba().to_reference(tmp_path)
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.startswith("haba-fast export: error:")
    assert not (tmp_path / "o" / "samples.npz").exists()


# ------------------------------------------------------------------------------------------ visualize
def test_save_grid_layout_and_upsampling(tmp_path):
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    visualize.save_grid(x, tmp_path / "g.png", nrow=2)
    with Image.open(tmp_path / "g.png") as im:
        # 8x8 tiles upsampled x8 to 64; 2 columns, 3 rows, 2-pixel padding.
        assert im.size == (2 * 66 + 2, 3 * 66 + 2) and im.mode == "RGB"
        arr = np.asarray(im)
    tile = arr[2:66, 2:66]  # first image, upsampled
    expected = (x[0].permute(1, 2, 0) * 255 + 0.5).to(torch.uint8).repeat_interleave(8, 0).repeat_interleave(8, 1)
    assert np.array_equal(tile, expected.numpy())
    for bad, match in ((torch.rand(2, 2, 4, 4), "1 or 3 channels"), (torch.rand(3, 4, 4), r"\[N, C, H, W\]"),
                       (torch.rand(0, 3, 4, 4), "no images")):
        with pytest.raises(ValueError, match=match):
            visualize.save_grid(bad, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_haba_grid_blocks(tmp_path):
    haba = _haba(K=3, bpc=2, C=3, size=(8, 8), Hn=2, cb=1)
    visualize.haba_grid(haba, tmp_path / "h.png", ncol=4)
    with Image.open(tmp_path / "h.png") as im:
        # 6 bases at 4 per row -> 2 rows per block; 1 + 2 blocks -> 6 rows of 66 px.
        assert im.size == (4 * 66 + 2, 6 * 66 + 2)
        arr = np.asarray(im).astype(int)
    first_basis = arr[2:66, 2:66]
    assert (first_basis[..., 0] == first_basis[..., 1]).all()  # single-channel bases are gray
    assert (arr[66 + 2:66 + 66, 2 * 66 + 2:3 * 66] == 255).all()  # unused slot after the 6th basis is blank


def test_to_unit_and_denormalizer():
    x = torch.tensor([[[[-1.0, 1.0]], [[0.0, 2.0]]]])  # [1, 2, 1, 2]
    torch.testing.assert_close(visualize.to_unit(x), torch.tensor([[[[0.0, 2 / 3]], [[1 / 3, 1.0]]]]))
    d = visualize.denormalizer([0.5, 0.0], [0.5, 0.25])
    torch.testing.assert_close(visualize.to_unit(x, d), torch.tensor([[[[0.0, 1.0]], [[0.0, 0.5]]]]))
    with pytest.raises(ValueError, match="channels"):
        d(torch.zeros(1, 3, 1, 1))
