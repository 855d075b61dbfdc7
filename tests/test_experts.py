"""Expert trajectories (haba_fast.experts): both buffer formats, memmap reads, bf16, corruption, aliasing, resume."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from haba_fast import data, experts, models
from haba_fast.experts import ExpertConfig, expert_dir, expert_generator, load_buffer, train_experts
from haba_fast.training import train_network

MODEL = "MLP"  # cheap (a ConvNet costs ~10x more on this 2-core machine); the CLI test trains a ConvNet


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", subset_per_class=4, generator=torch.Generator().manual_seed(0))


def _cfg(**kw):
    base = {
        "model": MODEL,
        "num_experts": 2,
        "epochs": 2,
        "batch_size": 16,
        "seed": 3,
        "save_interval": 2,
        "device": "cpu",
        "test_every": 0,
    }
    base.update(kw)
    return ExpertConfig(**base)


@pytest.fixture(scope="module")
def haba_buffer(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("haba") / "buf"
    train_experts(digits, _cfg(), out, progress=False)
    return out


@pytest.fixture(scope="module")
def reference_buffer(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "buf"
    train_experts(digits, _cfg(num_experts=3), out, fmt="reference", progress=False)
    return out


def _oracle_trajectory(ds, cfg, index):
    """An expert trained directly with train_network, snapshots flattened by hand: what the buffer must hold."""
    g = expert_generator(cfg.seed, index)
    net = models.get_network(cfg.model, ds.channels, ds.num_classes, ds.im_size, generator=g)
    snaps = [torch.cat([p.detach().reshape(-1).clone() for p in net.parameters()])]
    train_network(
        net,
        ds.train_images,
        ds.train_labels,
        epochs=cfg.epochs,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        dsa=cfg.dsa,
        dsa_strategy=cfg.dsa_strategy,
        generator=g,
        callback=lambda ep, n, s: snaps.append(torch.cat([p.detach().reshape(-1).clone() for p in n.parameters()])),
    )
    return torch.stack(snaps)


def assert_distinct_snapshots(buf):
    """The aliasing check: consecutive snapshots differ and no start/target pair is at distance 0."""
    for t in range(buf.num_trajectories):
        traj = buf.trajectory(t)
        for e in range(buf.num_epochs):
            assert not torch.equal(traj[e], traj[e + 1]), f"trajectory {t}: snapshots {e} and {e + 1} are identical"
        assert (traj[0] - traj[-1]).norm() > 0


def test_haba_format_holds_the_trained_trajectories(digits, haba_buffer):
    buf = load_buffer(haba_buffer)
    net = models.get_network(MODEL, digits.channels, digits.num_classes, digits.im_size)
    assert isinstance(buf, experts.MemmapExpertBuffer)
    assert (buf.num_trajectories, buf.num_epochs, buf.num_params) == (2, 2, models.num_params(net))
    buf.check_model(net)
    for t in range(2):
        torch.testing.assert_close(buf.trajectory(t), _oracle_trajectory(digits, _cfg(), t), rtol=0, atol=0)
    header = json.loads((haba_buffer / experts.HEADER_NAME).read_text())
    assert header["model"] == MODEL and header["dataset"] == "digits" and header["dtype"] == "float32"
    assert all(t["test_accuracy"] is not None for t in header["trajectories"])


def test_memmap_reads_the_right_rows(haba_buffer):
    buf = load_buffer(haba_buffer / experts.HEADER_NAME)  # the header file works as well as the directory
    header = json.loads((haba_buffer / experts.HEADER_NAME).read_text())
    for t, entry in enumerate(header["trajectories"]):
        raw = np.fromfile(haba_buffer / entry["file"], dtype=np.float32).reshape(buf.num_epochs + 1, buf.num_params)
        for e in (2, 0, 1):
            row = buf.snapshot(t, e)
            assert row.dtype == torch.float32 and row.shape == (buf.num_params,)
            assert torch.equal(row, torch.from_numpy(raw[e].copy()))
    # Snapshots are new memory, not views of the (read-only) map.
    s = buf.snapshot(0, 1)
    s.zero_()
    assert buf.snapshot(0, 1).abs().sum() > 0
    assert isinstance(buf._map(0), np.memmap)


def test_snapshots_are_copies(haba_buffer, reference_buffer):
    assert_distinct_snapshots(load_buffer(haba_buffer))
    assert_distinct_snapshots(load_buffer(reference_buffer))


@pytest.mark.parametrize("fmt", ["haba", "reference"])
def test_aliasing_check_catches_the_reference_bug(digits, tmp_path, monkeypatch, fmt):
    # The reference snapshots with p.detach().cpu(), which aliases CPU parameters: every snapshot = final weights.
    monkeypatch.setattr(experts, "snapshot_params", lambda net: [p.detach().cpu() for p in net.parameters()])
    train_experts(digits, _cfg(num_experts=1), tmp_path / "b", fmt=fmt, progress=False)
    buf = load_buffer(tmp_path / "b")
    assert torch.equal(buf.snapshot(0, 0), buf.snapshot(0, 2))
    with pytest.raises(AssertionError, match="identical"):
        assert_distinct_snapshots(buf)


def test_reference_format_layout_and_values(digits, reference_buffer, haba_buffer):
    # save_interval 2, 3 experts: replay_buffer_0.pt holds 2, replay_buffer_1.pt the remainder 1.
    files = sorted(p.name for p in reference_buffer.glob("replay_buffer_*.pt"))
    assert files == ["replay_buffer_0.pt", "replay_buffer_1.pt"]
    first = torch.load(reference_buffer / "replay_buffer_0.pt", weights_only=True)
    net = models.get_network(MODEL, digits.channels, digits.num_classes, digits.im_size)
    assert isinstance(first, list) and len(first) == 2
    assert all(len(traj) == 3 for traj in first)  # epochs + 1 snapshots
    assert [tuple(p.shape) for p in first[0][0]] == [tuple(p.shape) for p in net.parameters()]
    assert len(torch.load(reference_buffer / "replay_buffer_1.pt", weights_only=True)) == 1
    ref = load_buffer(reference_buffer)
    assert isinstance(ref, experts.ReferenceExpertBuffer)
    assert (ref.num_trajectories, ref.num_epochs) == (3, 2)
    ours = load_buffer(haba_buffer)  # same seed and settings: the same trajectories in both formats
    for t in range(2):
        torch.testing.assert_close(ref.trajectory(t), ours.trajectory(t), rtol=0, atol=0)
    # A single replay_buffer file opens too.
    single = load_buffer(reference_buffer / "replay_buffer_1.pt")
    torch.testing.assert_close(single.snapshot(0, 2), ref.snapshot(2, 2), rtol=0, atol=0)


def test_bf16_storage_round_trip(digits, haba_buffer, tmp_path):
    out = tmp_path / "bf16"
    train_experts(digits, _cfg(), out, dtype=torch.bfloat16, progress=False)
    b16, b32 = load_buffer(out), load_buffer(haba_buffer)
    assert b16.storage_dtype == torch.bfloat16
    for t in range(2):
        for e in range(3):
            s16, s32 = b16.snapshot(t, e), b32.snapshot(t, e)
            assert s16.dtype == torch.float32
            torch.testing.assert_close(s16, s32.to(torch.bfloat16).float(), rtol=0, atol=0)
            torch.testing.assert_close(s16, s32, rtol=1e-2, atol=1e-3)
    assert (out / "expert_00000.bin").stat().st_size * 2 == (haba_buffer / "expert_00000.bin").stat().st_size


def test_sample_pair(haba_buffer):
    buf = load_buffer(haba_buffer)
    g = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(30):
        w0, w1, meta = buf.sample_pair(g, max_start_epoch=2, expert_epochs=1)
        assert 0 <= meta["start_epoch"] < 2 and meta["target_epoch"] == meta["start_epoch"] + 1
        assert torch.equal(w0, buf.snapshot(meta["trajectory"], meta["start_epoch"]))
        assert torch.equal(w1, buf.snapshot(meta["trajectory"], meta["target_epoch"]))
        starts.add(meta["start_epoch"])
    assert starts == {0, 1}
    with pytest.raises(ValueError, match="too short"):
        buf.sample_pair(g, max_start_epoch=2, expert_epochs=2)
    with pytest.raises(ValueError, match="max_start_epoch"):
        buf.sample_pair(g, max_start_epoch=0, expert_epochs=1)
    with pytest.raises(ValueError, match="out of range"):
        buf.snapshot(5, 0)


def test_corrupt_and_mismatched_buffers(haba_buffer, reference_buffer, tmp_path, digits):
    import shutil

    # Truncated trajectory file -> ValueError naming it.
    bad = tmp_path / "trunc"
    shutil.copytree(haba_buffer, bad)
    raw = (bad / "expert_00001.bin").read_bytes()
    (bad / "expert_00001.bin").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="expert_00001.bin"):
        load_buffer(bad)
    # Garbage header.
    (bad / experts.HEADER_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="experts.json"):
        load_buffer(bad)
    # Garbage replay buffer, a replay buffer of the wrong structure, and mixed shapes.
    rb = tmp_path / "rb"
    rb.mkdir()
    (rb / "replay_buffer_0.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="replay_buffer_0.pt"):
        load_buffer(rb)
    torch.save({"not": "a list"}, rb / "replay_buffer_0.pt")
    with pytest.raises(ValueError, match="replay_buffer_0.pt"):
        load_buffer(rb)
    traj = [[torch.zeros(3), torch.zeros(2)] for _ in range(3)]
    torch.save([traj, [[torch.zeros(4), torch.zeros(2)] for _ in range(3)]], rb / "replay_buffer_0.pt")
    with pytest.raises(ValueError, match="replay_buffer_0.pt"):
        load_buffer(rb)
    # A buffer for another model.
    net = models.get_network("ConvNetW32", digits.channels, digits.num_classes, digits.im_size)
    with pytest.raises(ValueError, match="parameters"):
        load_buffer(haba_buffer).check_model(net)
    # Missing things.
    with pytest.raises(FileNotFoundError):
        load_buffer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="replay_buffer_0.pt"):
        load_buffer(tmp_path / "empty")


def test_hand_written_reference_buffer_with_gap(tmp_path):
    # The reference reads replay_buffer_0, 1, ... and stops at the first missing number.
    def traj(v):
        return [[torch.full((2, 3), float(v + e)), torch.full((4,), -float(v + e))] for e in range(4)]

    torch.save([traj(0), traj(10)], tmp_path / "replay_buffer_0.pt")
    torch.save([traj(20)], tmp_path / "replay_buffer_1.pt")
    torch.save([traj(30)], tmp_path / "replay_buffer_3.pt")
    buf = load_buffer(tmp_path)
    assert (buf.num_trajectories, buf.num_epochs, buf.num_params) == (3, 3, 10)
    assert buf.param_shapes == [(2, 3), (4,)]
    torch.testing.assert_close(buf.snapshot(2, 1), torch.tensor([21.0] * 6 + [-21.0] * 4))
    torch.testing.assert_close(buf.snapshot(1, 3), torch.tensor([13.0] * 6 + [-13.0] * 4))


@pytest.mark.parametrize("fmt", ["haba", "reference"])
def test_resume_after_kill(digits, tmp_path, fmt):
    cfg = _cfg(num_experts=2)
    # Uninterrupted run for comparison.
    full = tmp_path / "full"
    train_experts(digits, cfg, full, fmt=fmt, progress=False)

    out = tmp_path / "killed"

    def kill(expert, epoch, stats):
        if expert == 1 and epoch == 0:
            raise KeyboardInterrupt  # as a user's Ctrl-C (or a crash) in the middle of expert 1

    with pytest.raises(KeyboardInterrupt):
        train_experts(digits, cfg, out, fmt=fmt, progress=False, callback=kill)
    leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    if fmt == "haba":
        assert len(load_buffer(out).header["trajectories"]) == 1
    else:
        assert json.loads((out / experts.PROGRESS_NAME).read_text())["completed"] == 1
        assert not list(out.glob("replay_buffer_*.pt"))  # expert 0 waits in its pending file (save_interval 2)

    trained = []
    train_experts(digits, cfg, out, fmt=fmt, progress=False, callback=lambda i, e, s: trained.append(i))
    assert sorted(set(trained)) == [1]  # expert 0 was not retrained
    a, b = load_buffer(out), load_buffer(full)
    assert a.num_trajectories == b.num_trajectories == 2
    for t in range(2):
        torch.testing.assert_close(a.trajectory(t), b.trajectory(t), rtol=0, atol=0)

    # A finished run resumes to nothing; asking for more experts continues it.
    trained.clear()
    train_experts(digits, cfg, out, fmt=fmt, progress=False, callback=lambda i, e, s: trained.append(i))
    assert trained == []
    if fmt == "haba":
        train_experts(digits, _cfg(num_experts=3), out, progress=False, callback=lambda i, e, s: trained.append(i))
        assert sorted(set(trained)) == [2] and load_buffer(out).num_trajectories == 3


@pytest.mark.parametrize("when", ["before_write", "after_write"])
def test_reference_resume_after_kill_while_writing_a_replay_buffer(digits, tmp_path, monkeypatch, when):
    cfg = _cfg(num_experts=2)  # save_interval 2: the second expert triggers writing replay_buffer_0.pt
    full = tmp_path / "full"
    train_experts(digits, cfg, full, fmt="reference", progress=False)
    out = tmp_path / "killed"
    with monkeypatch.context() as m:
        if when == "before_write":
            real_save = experts.atomic_torch_save

            def save(obj, path):
                if "replay_buffer" in str(path):
                    raise KeyboardInterrupt
                real_save(obj, path)

            m.setattr(experts, "atomic_torch_save", save)
        else:

            def flushed(self, name):
                raise KeyboardInterrupt

            m.setattr(experts._ReferenceWriter, "_flushed", flushed)
        with pytest.raises(KeyboardInterrupt):
            train_experts(digits, cfg, out, fmt="reference", progress=False)
    assert (out / "replay_buffer_0.pt").exists() == (when == "after_write")
    trained = []
    train_experts(digits, cfg, out, fmt="reference", progress=False, callback=lambda i, e, s: trained.append(i))
    assert trained == []  # both experts had finished
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".pt") == ["replay_buffer_0.pt"]  # no duplicate file
    a, b = load_buffer(out), load_buffer(full)
    assert a.num_trajectories == 2
    for t in range(2):
        torch.testing.assert_close(a.trajectory(t), b.trajectory(t), rtol=0, atol=0)


def test_resume_refuses_other_settings(digits, haba_buffer, tmp_path):
    import shutil

    out = tmp_path / "b"
    shutil.copytree(haba_buffer, out)
    with pytest.raises(ValueError, match="lr"):
        train_experts(digits, _cfg(lr=0.02), out, progress=False)
    with pytest.raises(ValueError, match="dtype"):
        train_experts(digits, _cfg(), out, dtype=torch.bfloat16, progress=False)
    with pytest.raises(ValueError, match="already exists"):
        train_experts(digits, _cfg(), out, resume=False, progress=False)


@pytest.mark.parametrize("fmt", ["haba", "reference"])
def test_resume_refuses_other_training_data(digits, haba_buffer, reference_buffer, tmp_path, fmt):
    """Experts trained on other images (another subset, split or data path, same name and shapes) are never
    continued as this data's: more experts would be appended to a buffer of mixed data."""
    import shutil

    from haba_fast.experts import load_experts

    out = tmp_path / "b"
    shutil.copytree(haba_buffer if fmt == "haba" else reference_buffer, out)
    other = data.load("digits", subset_per_class=4, generator=torch.Generator().manual_seed(1))  # other images
    assert other.name == digits.name and other.train_images.shape == digits.train_images.shape
    n = 2 if fmt == "haba" else 3
    with pytest.raises(ValueError, match="training images or labels"):
        train_experts(other, _cfg(num_experts=n + 1), out, fmt=fmt, progress=False)
    train_experts(digits, _cfg(num_experts=n), out, fmt=fmt, progress=False)  # its own data: accepted
    assert load_experts(out, n).num_trajectories == n
    with pytest.raises(ValueError, match=f"holds {n} experts, this run asks for {n - 1}"):
        load_experts(out, n - 1)


@pytest.mark.parametrize("key,value,shown", [("zca", True, "zca True (this run: False)"),
                                              ("dataset", "mnist", "dataset 'mnist' (this run: 'digits')"),
                                              ("model", "ConvNet", "model 'ConvNet' (this run: 'MLP')")])
def test_mtt_refuses_a_buffer_recorded_for_other_data_or_model(digits, haba_buffer, tmp_path, key, value, shown):
    """Our buffer's header says what its experts were trained on: ZCA-space or another dataset's trajectories are
    never matched with this run's images (same shapes, so nothing else would fail)."""
    import shutil

    from haba_fast.distill import DistillConfig, Distiller
    from haba_fast.experts import HEADER_NAME, load_buffer

    cfg = DistillConfig(dataset="digits", model=MODEL, ipc=1, parameterization="pixels", syn_steps=2,
                        expert_epochs=1, max_start_epoch=1, iterations=1, engine="naive", device="cpu", num_eval=0)
    Distiller(cfg, digits, load_buffer(haba_buffer), device="cpu")  # its own buffer: accepted
    out = tmp_path / "b"
    shutil.copytree(haba_buffer, out)
    header = json.loads((out / HEADER_NAME).read_text())
    header[key] = value
    (out / HEADER_NAME).write_text(json.dumps(header))
    with pytest.raises(ValueError, match="was trained with " + re.escape(shown)):
        Distiller(cfg, digits, load_buffer(out), device="cpu")


def test_reference_folder_without_progress_gets_new_experts_appended(digits, reference_buffer, tmp_path):
    """The reference's buffer.py appends experts on every run. Ours, seeded from (seed, index), append beside
    files no progress record covers with the indices after the trajectories found: the experts a longer run would
    have trained there, never a repeat of the ones found."""
    import shutil

    from haba_fast.experts import PROGRESS_NAME

    out = tmp_path / "b"
    shutil.copytree(reference_buffer, out)
    (out / PROGRESS_NAME).unlink()  # as after deleting it, or a folder the reference's buffer.py wrote
    notes = []
    train_experts(digits, _cfg(num_experts=2), out, fmt="reference", progress=False, log=notes.append)
    assert notes == [f"appending to {out}: 3 experts found there; the new ones are seeded from index 3 on"]
    buf = load_buffer(out)
    assert buf.num_trajectories == 3 + 2
    whole = tmp_path / "whole"
    train_experts(digits, _cfg(num_experts=5), whole, fmt="reference", progress=False)  # the oracle: one run of 5
    oracle = load_buffer(whole)
    for t in range(5):
        for e in range(buf.num_epochs + 1):
            assert torch.equal(buf.snapshot(t, e), oracle.snapshot(t, e)), (t, e)
    # Resumed after a kill, the appended run keeps its offset (recorded in its progress file).
    assert json.loads((out / PROGRESS_NAME).read_text())["index_offset"] == 3


def test_a_finished_folder_says_nothing_was_trained(digits, haba_buffer, tmp_path):
    import shutil

    out = tmp_path / "b"
    shutil.copytree(haba_buffer, out)
    notes = []
    train_experts(digits, _cfg(), out, progress=False, log=notes.append)
    assert len(notes) == 1 and "nothing to train" in notes[0] and "raise it to add more" in notes[0]
    assert load_buffer(out).num_trajectories == 2


@pytest.mark.skipif(not Path(data.FASHION_MNIST_ROOT).is_dir(), reason="Fashion-MNIST not installed")
def test_a_fashion_zca_buffer_whitened_from_pixels_is_refused(tmp_path):
    """Since MNIST / Fashion-MNIST ZCA whitens the normalized images (the reference's order), a buffer recorded
    without that (made before) is refused by MTT, and cannot be resumed with the new data."""
    import json

    from haba_fast.distill import DistillConfig, Distiller
    from haba_fast.experts import HEADER_NAME

    fm = data.load("fashion-mnist", zca=True, subset_per_class=3, generator=torch.Generator().manual_seed(0))
    out = tmp_path / "b"
    train_experts(fm, _cfg(num_experts=1, epochs=1), out, progress=False)
    header = json.loads((out / HEADER_NAME).read_text())
    assert header["zca"] is True and header["zca_input"] == "normalized"
    cfg = DistillConfig(dataset="fashion-mnist", model=MODEL, ipc=1, parameterization="pixels", syn_steps=2,
                        expert_epochs=1, max_start_epoch=1, iterations=1, engine="naive", device="cpu", num_eval=0,
                        zca=True)
    Distiller(cfg, fm, load_buffer(out), device="cpu")  # its own buffer: accepted
    del header["zca_input"]  # as a buffer written before the change records it
    (out / HEADER_NAME).write_text(json.dumps(header))
    with pytest.raises(ValueError, match=r"ZCA of \[0, 1\] pixels"):
        Distiller(cfg, fm, load_buffer(out), device="cpu")
    with pytest.raises(ValueError, match="zca_input: None -> 'normalized'"):
        train_experts(fm, _cfg(num_experts=2, epochs=1), out, progress=False)


def test_bad_arguments(digits, tmp_path):
    with pytest.raises(ValueError, match="fmt"):
        train_experts(digits, _cfg(), tmp_path, fmt="npz", progress=False)
    with pytest.raises(TypeError, match="dtype"):
        train_experts(digits, _cfg(), tmp_path, dtype=torch.float16, progress=False)
    with pytest.raises(ValueError, match="bfloat16"):
        train_experts(digits, _cfg(), tmp_path, fmt="reference", dtype=torch.bfloat16, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        train_experts(digits, _cfg(epochs=0), tmp_path, progress=False)


def test_expert_dir_naming():
    assert expert_dir("b", "cifar10", "ConvNet").as_posix() == "b/CIFAR10_NO_ZCA/ConvNet"
    assert expert_dir("b", "CIFAR100", "ConvNet", zca=True).as_posix() == "b/CIFAR100/ConvNet"
    assert expert_dir("b", "fashion-mnist", "ConvNet").as_posix() == "b/FashionMNIST/ConvNet"
    assert expert_dir("b", "FashionMNIST", "ConvNetD4").as_posix() == "b/FashionMNIST/ConvNetD4"
    assert expert_dir("b", "svhn", "ConvNet").as_posix() == "b/SVHN/ConvNet"


def test_cli_buffer_both_spellings(tmp_path, capsys):
    from haba_fast.cli import build_parser, main

    a = build_parser().parse_args(
        [
            "buffer",
            "--num_experts",
            "3",
            "--lr_teacher",
            "0.02",
            "--train_epochs",
            "4",
            "--batch_train",
            "32",
            "--buffer_path",
            "x",
            "--dsa",
            "False",
            "--mom",
            "0.5",
        ]
    )
    b = build_parser().parse_args(
        [
            "buffer",
            "--num-experts",
            "3",
            "--lr-teacher",
            "0.02",
            "--train-epochs",
            "4",
            "--batch-size",
            "32",
            "--buffer-path",
            "x",
            "--dsa",
            "false",
            "--mom",
            "0.5",
        ]
    )
    for args in (a, b):
        assert (args.num_experts, args.lr_teacher, args.train_epochs, args.batch_train) == (3, 0.02, 4, 32)
        assert (args.buffer_path, args.dsa, args.mom, args.dataset, args.fmt) == ("x", False, 0.5, "CIFAR10", "haba")

    rc = main(
        [
            "buffer",
            "--dataset",
            "digits",
            "--model",
            "ConvNetW32",
            "--num_experts",
            "1",
            "--train_epochs",
            "1",
            "--batch_train",
            "64",
            "--subset-per-class",
            "3",
            "--buffer_path",
            str(tmp_path),
            "--quiet",
            "--format",
            "reference",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    buf = load_buffer(tmp_path / "digits" / "ConvNetW32")
    assert (buf.num_trajectories, buf.num_epochs) == (1, 1)
    net = models.get_network("ConvNetW32", 1, 10, (8, 8))
    buf.check_model(net)  # reference layout: parameters() order and shapes of the ConvNet
    assert_distinct_snapshots(buf)
    assert "1 trajectories" in capsys.readouterr().out
    rc = main(
        [
            "buffer",
            "--dataset",
            "digits",
            "--model",
            MODEL,
            "--num-experts",
            "1",
            "--train-epochs",
            "1",
            "--subset-per-class",
            "3",
            "--out",
            str(tmp_path / "ours"),
            "--bf16",
            "--quiet",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0 and load_buffer(tmp_path / "ours").storage_dtype == torch.bfloat16
    assert main(["buffer", "--train_epochs", "0", "--out", str(tmp_path / "z"), "--quiet"]) == 2


def test_cli_buffer_without_dataset_reads_cifar10_as_the_reference(tmp_path, capsys):
    """The reference's buffer.py defaults to CIFAR10 under --data_path: so does ours (no silent digits)."""
    from haba_fast.cli import main

    assert main(["buffer", "--model", "MLP", "--num_experts", "1", "--train_epochs", "1", "--data_path",
                 str(tmp_path / "data"), "--out", str(tmp_path / "b"), "--quiet"]) == 2
    assert "CIFAR-10 not found" in capsys.readouterr().err and not (tmp_path / "b").exists()
    assert main(["buffer", "--dataset", "digits", "--model", "MLP", "--num_experts", "1", "--train_epochs", "1",
                 "--out", str(tmp_path / "c"), "--quiet"]) == 0


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda h: h.update(version="abc"), "version must be an integer, got 'abc'"),
        (lambda h: h.update(config="x"), "config must be an object, got 'x'"),
        (lambda h: h["trajectories"].append(dict(h["trajectories"][0])), "lists a trajectory file twice"),
    ],
)
def test_a_corrupt_header_field_is_named(haba_buffer, tmp_path, edit, message):
    import json
    import shutil

    bad = tmp_path / "buf"
    shutil.copytree(haba_buffer, bad)
    header = json.loads((bad / experts.HEADER_NAME).read_text())
    edit(header)
    (bad / experts.HEADER_NAME).write_text(json.dumps(header))
    with pytest.raises(ValueError, match=message):
        load_buffer(bad)


def test_cli_buffer_says_it_keeps_a_last_partial_group(tmp_path, capsys):
    """The reference's buffer.py saves only full --save_interval groups; ours keeps the rest and says so."""
    from haba_fast.cli import main

    argv = ["buffer", "--dataset", "digits", "--model", "MLP", "--train_epochs", "1", "--save_interval", "2",
            "--quiet", "--out"]
    assert main([*argv, str(tmp_path / "a"), "--num_experts", "3"]) == 0
    assert "the last 1 expert(s) are kept here as a smaller group" in capsys.readouterr().out
    assert load_buffer(tmp_path / "a").num_trajectories == 3
    assert main([*argv, str(tmp_path / "b"), "--num_experts", "2"]) == 0
    assert "smaller group" not in capsys.readouterr().out
