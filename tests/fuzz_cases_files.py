"""Fuzz case runners for the CLI's file inputs (run inside tests/fuzz_harness.py's child process).

A case names a valid artefact (our synthetic-set file, a reference checkpoint directory, a reference replay buffer,
our memory-mapped expert buffer), a mutation, and a command (``eval``, ``export``, ``distill --buffer_path``). The
runner writes the mutated artefact, runs ``haba_fast.cli.main`` in-process and checks the outcome: exit 0 (only
for mutations that leave a usable file), or exit 2 with a one-line ``haba-fast CMD: error: ...`` message. An
exception escaping ``main`` (a traceback for the user) is a failure, so ``ALLOWED`` is empty.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import shutil
import tempfile
from pathlib import Path

import torch

ROOT = Path(tempfile.mkdtemp(prefix="haba_fuzz_files_"))
K, IM = 10, (8, 8)  # digits: 10 classes, 1 x 8 x 8

# Mutations whose result is still a usable input (the command may succeed); every other one must fail cleanly.
USABLE = {
    "synthetic": {"none", "f64", "bf16", "mixed_dtype", "noncontig", "extra_meta", "lr_int", "dataset_unknown"},
    "reference": {"none", "f64", "bf16", "mixed_dtype", "noncontig"},
    "replay": {"none", "f64", "bf16", "mixed_dtype", "noncontig"},
    "haba": {"none"},
}
# The learned lr is one number: a 1-element tensor of any real dtype is still one.
USABLE_LR = {"rank", "int", "f64", "bf16", "noncontig", "mixed_dtype", "delete"}
# Flipped bits in a tensor's data leave a valid file with other values: any clean outcome.
MAY_PASS = {"flip_bytes", "args_missing"}  # a missing arg whose default matches loads
_usable = {"now": False}


def _haba(seed=0):
    from haba_fast.factorization import HaBa

    return HaBa(K, 1, 1, IM, n_hallucinators=2, kernel_size=3, base_channels=1,
                generator=torch.Generator().manual_seed(seed))


def _net_snapshots(seed, epochs=3):
    from haba_fast.models import get_network

    net = get_network("ConvNet", 1, K, IM, generator=torch.Generator().manual_seed(seed))
    base = [p.detach().clone() for p in net.parameters()]
    g = torch.Generator().manual_seed(seed + 1)
    return [[p + 0.01 * e * torch.randn(p.shape, generator=g) for p in base] for e in range(epochs + 1)]


def _poison(t, value):
    t = t.clone()
    if t.numel():
        t.view(-1)[0] = value
    return t


def _mutate_tensor(t: torch.Tensor, m: str, rng: random.Random) -> torch.Tensor:
    if m == "nan":
        return _poison(t, math.nan)
    if m == "inf":
        return _poison(t, math.inf)
    if m == "int":
        return t.round().to(torch.int64)
    if m == "bool":
        return t > 0
    if m == "complex":
        return t.to(torch.complex64)
    if m == "f64":
        return t.double()
    if m == "bf16":
        return t.to(torch.bfloat16)
    if m == "empty":
        return t.reshape(-1)[:0]
    if m == "shape":  # always a different shape: one element fewer, flattened
        return t.reshape(-1)[: max(t.numel() - 1, 0)]
    if m == "rank":
        return t.unsqueeze(0)
    if m == "noncontig":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t
    raise AssertionError(m)


def _corrupt_bytes(path: Path, m: str, rng: random.Random) -> None:
    data = path.read_bytes()
    if m == "truncate":
        path.write_bytes(data[: rng.randrange(max(len(data), 1))])
    elif m == "empty_file":
        path.write_bytes(b"")
    elif m == "garbage":
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))))
    elif m == "flip_bytes":
        b = bytearray(data)
        for _ in range(8):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(b))
    else:
        raise AssertionError(m)


BYTE_MUTATIONS = ("truncate", "empty_file", "garbage", "flip_bytes")
TENSOR_MUTATIONS = ("nan", "inf", "int", "bool", "complex", "f64", "bf16", "empty", "shape", "rank", "noncontig")


# ---- artefacts -------------------------------------------------------------------------------------------------
def make_synthetic(d: Path, m: str, rng: random.Random) -> Path:
    """Our synthetic-set file, mutated."""
    p = d / "synthetic.pt"
    _haba().save(p, meta={"dataset": "digits", "lr": 0.01})
    if m == "none" or m in BYTE_MUTATIONS:
        if m != "none":
            _corrupt_bytes(p, m, rng)
        return p
    payload = torch.load(p, weights_only=True)
    state, args = payload["state_dict"], payload["args"]
    key = rng.choice(sorted(state))
    if m in TENSOR_MUTATIONS:
        state[key] = _mutate_tensor(state[key], m, rng)
    elif m == "mixed_dtype":
        state[key] = state[key].double()
    elif m == "missing_key":
        del state[key]
    elif m == "extra_key":
        state["surprise"] = torch.zeros(2)
    elif m == "not_tensor":
        state[key] = [1.0, 2.0]
    elif m == "args_missing":
        del args[rng.choice(sorted(args))]
    elif m == "args_str":
        args[rng.choice(sorted(args))] = "ten"
    elif m == "args_negative":
        args[rng.choice(["num_classes", "bpc", "channels", "n_hallucinators"])] = -3
    elif m == "args_huge":
        args[rng.choice(["num_classes", "bpc", "n_hallucinators", "im_size"])] = 10**7 if rng.random() < 0.5 else 10**12
    elif m == "args_float":
        args["bpc"] = 1.5
    elif m == "args_list":
        payload["args"] = [1, 2, 3]
    elif m == "kind":
        payload["kind"] = rng.choice(["foo", 3, ["haba"], None])
    elif m == "format":
        payload["format"] = rng.choice(["haba_fast-synthetic-v99", 7, None])
    elif m == "dtype_entry":
        payload["dtype"] = rng.choice(["int64", "complex64", "nonsense", 5])
    elif m == "meta_type":
        payload["meta"] = rng.choice([[1, 2], "x", 5])
    elif m == "lr_nan":
        payload["meta"]["lr"] = math.nan
    elif m == "lr_negative":
        payload["meta"]["lr"] = -0.5
    elif m == "lr_str":
        payload["meta"]["lr"] = "fast"
    elif m == "lr_int":
        payload["meta"]["lr"] = 1
    elif m == "lr_tensor2":
        payload["meta"]["lr"] = torch.tensor([0.1, 0.2])
    elif m == "extra_meta":
        payload["meta"]["notes"] = {"a": [1, 2.5, "x"]}
    elif m == "dataset_unknown":
        payload["meta"]["dataset"] = "nonexistent-set"
    elif m == "bare_tensor":
        payload = state["bases"]
    elif m == "list_payload":
        payload = [state]
    else:
        raise AssertionError(m)
    torch.save(payload, p)
    return p


SYNTHETIC_MUTATIONS = (("none",) + BYTE_MUTATIONS + TENSOR_MUTATIONS + (
    "mixed_dtype", "missing_key", "extra_key", "not_tensor", "args_missing", "args_str", "args_negative",
    "args_huge", "args_float", "args_list", "kind", "format", "dtype_entry", "meta_type", "lr_nan", "lr_negative",
    "lr_str", "lr_int", "lr_tensor2", "extra_meta", "dataset_unknown", "bare_tensor", "list_payload"))


def make_reference_dir(d: Path, m: str, rng: random.Random) -> Path:
    """A reference HaBa checkpoint directory (images_best.pt, weights_best.pt, syn_lr_best.pt), one file mutated."""
    ref = d / "ref"
    _haba().to_reference(ref, it="best", lr=0.01)
    if m == "none":
        return ref
    name = rng.choice(["images_best.pt", "weights_best.pt", "syn_lr_best.pt"])
    p = ref / name
    # Without weights_best.pt the images read as a pixel set (reference MTT directories have no labels file).
    _usable["now"] = (m in USABLE["reference"] or m in MAY_PASS or (name == "syn_lr_best.pt" and m in USABLE_LR)
                      or (name == "weights_best.pt" and m == "delete"))
    if m in BYTE_MUTATIONS:
        _corrupt_bytes(p, m, rng)
        return ref
    obj = torch.load(p, weights_only=True)
    if m in TENSOR_MUTATIONS:
        if isinstance(obj, dict):
            k = rng.choice(sorted(obj))
            obj[k] = _mutate_tensor(obj[k], m, rng)
        else:
            obj = _mutate_tensor(obj, m, rng)
    elif m == "missing_key" and isinstance(obj, dict):
        del obj[rng.choice(sorted(obj))]
    elif m == "not_tensor":
        obj = {k: "x" for k in obj} if isinstance(obj, dict) else "x"
    elif m == "wrong_container":
        obj = [obj]
    elif m == "delete":
        p.unlink()
        return ref
    elif m == "mixed_dtype":
        obj = obj.double() if isinstance(obj, torch.Tensor) else {k: v.double() for k, v in obj.items()}
    else:  # not applicable to this file (a key of a tensor file): the checkpoint is intact
        _usable["now"] = True
    torch.save(obj, p)
    return ref


REFERENCE_MUTATIONS = ("none",) + BYTE_MUTATIONS + TENSOR_MUTATIONS + ("missing_key", "not_tensor", "wrong_container",
                                                                       "delete", "mixed_dtype")


def make_replay_buffer(d: Path, m: str, rng: random.Random) -> Path:
    """A reference replay buffer for ConvNet on digits (2 trajectories x 4 snapshots), mutated."""
    buf = d / "buffer"
    buf.mkdir()
    trajs = [_net_snapshots(0), _net_snapshots(1)]
    p = buf / "replay_buffer_0.pt"
    if m in ("nan", "inf"):
        # Where every run reads (epochs 0-1 of every trajectory): a damaged snapshot no run reads is not an error.
        i = rng.randrange(len(trajs[0][0]))
        for tr in trajs:
            for e in (0, 1):
                tr[e][i] = _mutate_tensor(tr[e][i], m, rng)
    elif m in TENSOR_MUTATIONS:
        t, e = rng.randrange(2), rng.randrange(4)
        i = rng.randrange(len(trajs[t][e]))
        trajs[t][e][i] = _mutate_tensor(trajs[t][e][i], m, rng)
        if m in ("f64", "noncontig"):
            trajs = [[[_mutate_tensor(x, m, rng) for x in s] for s in tr] for tr in trajs]
    elif m == "empty_list":
        trajs = []
    elif m == "empty_trajectory":
        trajs[0] = []
    elif m == "ragged":
        trajs[1] = trajs[1][:2]
    elif m == "not_tensor":
        trajs[0][1][0] = "weights"
    elif m == "dict":
        trajs = {"trajectories": trajs}
    elif m == "other_model":
        from haba_fast.models import get_network

        net = get_network("MLP", 1, K, IM, generator=torch.Generator().manual_seed(0))
        trajs = [[[p.detach().clone() + e for p in net.parameters()] for e in range(4)]]
    elif m == "identical":
        trajs = [[[x.clone() for x in trajs[0][0]] for _ in range(4)]]
    elif m == "short":
        trajs = [tr[:1] for tr in trajs]
    elif m == "mixed_dtype":
        trajs[0] = [[x.double() for x in s] for s in trajs[0]]
    torch.save(trajs, p)
    if m in BYTE_MUTATIONS:
        _corrupt_bytes(p, m, rng)
    return buf


BUFFER_MUTATIONS = ("none",) + BYTE_MUTATIONS + TENSOR_MUTATIONS + (
    "empty_list", "empty_trajectory", "ragged", "not_tensor", "dict", "other_model", "identical", "short",
    "mixed_dtype")


def make_haba_buffer(d: Path, m: str, rng: random.Random) -> Path:
    """Our memory-mapped expert buffer (experts.json + expert_<i>.bin), mutated."""
    from haba_fast.experts import FORMAT_TAG, FORMAT_VERSION, HEADER_NAME

    buf = d / "buffer"
    buf.mkdir()
    snaps = _net_snapshots(0)
    flat = torch.stack([torch.cat([p.reshape(-1) for p in s]) for s in snaps])
    if m == "nan":  # where the run reads (epochs 0-1)
        flat[rng.randrange(2), rng.randrange(flat.shape[1])] = math.nan
    flat.numpy().tofile(buf / "expert_00000.bin")
    header = {"format": FORMAT_TAG, "version": FORMAT_VERSION, "num_params": flat.shape[1], "num_epochs": 3,
              "dtype": "float32", "param_shapes": [list(p.shape) for p in snaps[0]],
              "trajectories": [{"file": "expert_00000.bin"}], "model": "ConvNet", "dataset": "digits"}
    if m == "num_params":
        header["num_params"] = rng.choice([flat.shape[1] + 1, 0, -5, "many", 10**15])
    elif m == "num_epochs":
        header["num_epochs"] = rng.choice([0, 99, -1, None])
    elif m == "dtype":
        header["dtype"] = rng.choice(["int8", "float16", None, ["float32"]])
    elif m == "shapes":
        header["param_shapes"] = rng.choice([[[1, 2]], "x", [["a"]], [[-1, 5]]])
    elif m == "no_trajectories":
        header["trajectories"] = []
    elif m == "traj_type":
        header["trajectories"] = rng.choice(["expert_00000.bin", [5], [{"file": 7}]])
    elif m == "version":
        header["version"] = rng.choice([99, "x"])
    elif m == "truncate_bin":
        data = (buf / "expert_00000.bin").read_bytes()
        (buf / "expert_00000.bin").write_bytes(data[: rng.randrange(len(data))])
    (buf / HEADER_NAME).write_text(json.dumps(header))
    if m in ("header_" + b for b in BYTE_MUTATIONS):
        _corrupt_bytes(buf / HEADER_NAME, m[len("header_"):], rng)
    return buf


HABA_BUFFER_MUTATIONS = ("none", "nan", "num_params", "num_epochs", "dtype", "shapes", "no_trajectories",
                         "traj_type", "version", "truncate_bin") + tuple("header_" + b for b in BYTE_MUTATIONS)


# ---- commands --------------------------------------------------------------------------------------------------
def _cli(argv: list[str]) -> tuple[int, str]:
    from haba_fast.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    return rc, err.getvalue()


def run_file_case(c):
    """Build the mutated artefact for c["target"], run c["command"] on it, check the outcome."""
    rng = random.Random(c["seed"])
    d = ROOT / f"case{c['seed']}_{rng.randrange(10**9)}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    try:
        m = c["mutation"]
        _usable["now"] = m in USABLE[c["target"]] or m in MAY_PASS
        if c["target"] in ("synthetic", "reference"):
            path = (make_synthetic if c["target"] == "synthetic" else make_reference_dir)(d, m, rng)
            if c["command"] == "eval":
                argv = ["eval", str(path), "--dataset", "digits", "--epochs", "1", "--num-eval", "1",
                        "--subset-per-class", "2", "--device", "cpu", "--quiet", "--json"]
            else:
                argv = ["export", str(path), "--out", str(d / "export")]
        else:
            path = (make_replay_buffer if c["target"] == "replay" else make_haba_buffer)(d, m, rng)
            argv = ["distill", "--dataset", "digits", "--buffer_path", str(path), "--ipc", "1", "--n_style", "2",
                    "--Iteration", "1", "--syn_steps", "2", "--expert_epochs", "1", "--max_start_epoch", "1",
                    "--num_eval", "0", "--batch_syn", "5", "--device", "cpu",
                    "--out", str(d / "run"), "--no-progress"]
        rc, err = _cli(argv)
        lines = [ln for ln in err.splitlines() if ln.strip() and "Warning" not in ln and not ln.startswith(" ")]
        # The unmutated artefact is the control: the command itself must work on it, or no case tests anything.
        assert m != "none" or rc == 0, f"`{argv[0]}` failed on the unmutated {c['target']} (exit {rc}): {err[-1000:]}"
        if rc == 0:
            assert _usable["now"], f"mutation {m!r} of the {c['target']} was accepted by `{argv[0]}` (exit 0)"
            return {"rc": 0}
        assert rc == 2, f"exit status {rc}: {err[-1000:]}"
        errors = [ln for ln in lines if ln.startswith(f"haba-fast {argv[0]}: error: ")]
        assert errors, f"exit 2 without a one-line error message: {err[-1000:]}"
        return {"rc": 2, "message": errors[-1][:300]}
    finally:
        shutil.rmtree(d, ignore_errors=True)


run_file_case.ALLOWED = ()
