"""Files from other people never run code when read.

Each crafted file holds an object whose unpickling writes a marker file (``__reduce__`` -> ``exec(open(...).write)``).
Every reader of other people's files (reference replay buffers, reference checkpoints, our synthetic-set format,
CIFAR's python batches) must refuse it with a ValueError that names the file and says why, and the marker must not
appear. A control test proves the crafted file is live: read unsafely, it does write the marker.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from haba_fast import io as hio
from haba_fast.experts import FORMAT_TAG, FORMAT_VERSION, HEADER_NAME, load_buffer
from haba_fast.factorization import HaBa, Pixels, load_synthetic


class _Plant:
    """Unpickled, writes ``path``: the payload of every crafted file below."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "reading the crafted file ran its code"


def _snapshots(P=(3, 2)):
    return [[torch.randn(*P), torch.randn(P[0])] for _ in range(3)]


def _refused(exc_info, path):
    msg = str(exc_info.value)
    assert str(path) in msg, msg
    assert "refused" in msg and "GLOBAL" in msg, msg


def test_the_crafted_file_is_live(tmp_path):
    """Control: without weights_only the payload runs, so the refusals below are what stop it."""
    m = tmp_path / "PWNED"
    p = tmp_path / "evil.pt"
    torch.save({"x": _Plant(m)}, p)
    torch.load(p, weights_only=False)
    assert m.read_text() == "pwned"


@pytest.mark.parametrize("where", ["trajectory", "snapshot", "top level"])
def test_reference_replay_buffer_is_refused(tmp_path, marker, where):
    trajs = [_snapshots(), _snapshots()]
    if where == "trajectory":
        trajs.append(_Plant(marker))
    elif where == "snapshot":
        trajs[0][1].append(_Plant(marker))
    else:
        trajs = {"buffer": trajs, "x": _Plant(marker)}
    p = tmp_path / "replay_buffer_0.pt"
    torch.save(trajs, p)
    for path in (tmp_path, p):
        with pytest.raises(ValueError) as e:
            load_buffer(path)
        _refused(e, p)


def test_legacy_format_replay_buffer_is_refused(tmp_path, marker):
    p = tmp_path / "replay_buffer_0.pt"
    torch.save([_snapshots(), _Plant(marker)], p, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError) as e:
        load_buffer(tmp_path)
    _refused(e, p)


@pytest.mark.parametrize("evil_file", ["images_best.pt", "weights_best.pt", "syn_lr_best.pt", "labels_best.pt"])
def test_reference_checkpoint_is_refused(tmp_path, marker, evil_file):
    haba = HaBa(3, 2, 3, (8, 8), n_hallucinators=2, kernel_size=3, base_channels=2)
    if evil_file == "labels_best.pt":
        pix = Pixels(3, 2, 3, (8, 8))
        pix.to_reference(tmp_path, it="best")
        (tmp_path / "weights_best.pt").unlink(missing_ok=True)
    else:
        haba.to_reference(tmp_path, it="best", lr=0.01)
    torch.save({"v": _Plant(marker)}, tmp_path / evil_file)
    with pytest.raises(ValueError) as e:
        load_synthetic(tmp_path, num_classes=3)
    _refused(e, tmp_path / evil_file)
    if evil_file == "images_best.pt":
        with pytest.raises(ValueError) as e:
            load_synthetic(tmp_path / evil_file, num_classes=3)
        _refused(e, tmp_path / evil_file)


@pytest.mark.parametrize("where", ["meta", "args", "state_dict"])
def test_synthetic_set_file_is_refused(tmp_path, marker, where):
    haba = HaBa(3, 2, 3, (8, 8), n_hallucinators=2, kernel_size=3, base_channels=2)
    good = tmp_path / "synthetic.pt"
    haba.save(good, meta={"dataset": "digits", "lr": 0.01})
    payload = torch.load(good, weights_only=True)
    payload[where]["planted"] = _Plant(marker)
    bad = tmp_path / "synthetic_bad.pt"
    torch.save(payload, bad)
    with pytest.raises(ValueError) as e:
        load_synthetic(bad)
    _refused(e, bad)


def test_our_formats_hold_only_plain_values(tmp_path):
    """Everything we write loads under weights_only=True: tensors, numbers, strings, lists, dicts."""
    g = torch.Generator().manual_seed(0)
    haba = HaBa(3, 2, 3, (8, 8), n_hallucinators=2, kernel_size=3, base_channels=2, generator=g)
    zca = {"mean": torch.randn(5), "proj": torch.randn(5, 5)}
    haba.save(tmp_path / "s.pt", meta={"dataset": "digits", "lr": 0.01, "zca": zca, "mean": (0.5,), "it": 3})
    back = load_synthetic(tmp_path / "s.pt")
    for (k, a), (_, b) in zip(haba.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    assert torch.equal(back.meta["zca"]["proj"], zca["proj"])
    with pytest.raises(TypeError, match="state_dict"):
        haba.save(tmp_path / "t.pt", meta={"obj": _Plant(tmp_path / "never")})
    assert not (tmp_path / "t.pt").exists() and not (tmp_path / "never").exists()


def test_finished_expert_is_refused(tmp_path, marker):
    from haba_fast.experts import PROGRESS_NAME, _ReferenceWriter

    torch.save([_snapshots(), _Plant(marker)], tmp_path / "pending_expert_0.pt")
    progress = {"completed": 0, "pending": ["pending_expert_0.pt"]}
    (tmp_path / PROGRESS_NAME).write_text(json.dumps(progress))
    with pytest.raises(ValueError, match="refused") as e:
        _ReferenceWriter(tmp_path, progress, save_interval=10)
    assert "pending_expert_0.pt" in str(e.value)


def test_torch_load_names_file_and_reason(tmp_path, marker):
    p = tmp_path / "x.pt"
    torch.save(_Plant(marker), p)
    with pytest.raises(ValueError, match=r"my file .*x\.pt was refused.*GLOBAL (builtins\.)?exec"):
        hio.torch_load(p, what="my file")
    with pytest.raises(ValueError, match="is a directory"):
        hio.torch_load(tmp_path)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="corrupt or not a torch file"):
        hio.torch_load(tmp_path / "empty.pt")


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/hostname", "sub/expert.bin", "..", ""])
def test_buffer_header_cannot_point_outside_its_directory(tmp_path, name):
    (tmp_path / "outside.bin").write_bytes(b"\x00" * 48)
    d = tmp_path / "buf"
    d.mkdir()
    header = {"format": FORMAT_TAG, "version": FORMAT_VERSION, "num_params": 6, "num_epochs": 1,
              "dtype": "float32", "trajectories": [{"file": name}]}
    (d / HEADER_NAME).write_text(json.dumps(header))
    with pytest.raises(ValueError, match="plain file name"):
        load_buffer(d)


def test_cifar_pickle_refuses_code(tmp_path, marker):
    """CIFAR's python batches are pickles by format: they go through a restricted unpickler (numpy arrays only)."""
    from haba_fast.data import _read_pickle

    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps({b"data": _Plant(marker)}, protocol=2))
    with pytest.raises(ValueError, match=r"refusing to load (__builtin__|builtins)\.exec") as e:
        _read_pickle(p)
    assert str(p) in str(e.value)
