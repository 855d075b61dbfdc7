"""Checkpoints and resume of a distillation run: the state, its files, the resume checks and the history log.

A run's ``--out`` folder holds (see ``docs/ARCHITECTURE.md``, "Resume and failure"):

- ``checkpoint.pt``: the resume state (:func:`distiller_state`). It holds only tensors and plain values (optimizer
  state dicts, generator states as uint8 tensors, the config as a dict), so it loads with
  ``torch.load(weights_only=True)``: a crafted file cannot run code. Written last and atomically, so it always
  points at files that exist.
- ``synthetic_<it>.pt``, ``synthetic_last.pt`` (our format), ``reference/`` (the reference's files).
- ``history.jsonl``: one JSON line of metrics per iteration (a skipped step is a line with ``"skipped"``).
  Appended as the run goes; on resume it is read tolerantly (a torn last line from a kill is dropped) and
  rewritten to hold exactly the iterations before the resumed one.

Resume compares the whole result-changing configuration (:func:`result_keys`) and a fingerprint of the inputs
(training images and labels, expert buffer). A difference is an error naming the flags; ``allow_changed``
continues with the new values (new optimizer learning rates included). Every random stream of a run is saved
(the distillation generator and the evaluation generator; nothing draws from torch's global generator, which a
library must not reseed), so a run killed at any point and resumed ends bitwise equal to an uninterrupted one on
the CPU.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import itertools
import json
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from haba_fast import dist

if TYPE_CHECKING:  # pragma: no cover
    from haba_fast.distill import DistillConfig, Distiller

__all__ = [
    "CHECKPOINT_NAME",
    "FORMAT",
    "FORMATS",
    "GUARD_KEYS",
    "HISTORY_NAME",
    "INIT_ONLY_KEYS",
    "NON_RESULT_KEYS",
    "STRUCTURAL_KEYS",
    "History",
    "check_resume",
    "distiller_state",
    "flag_name",
    "inputs_fingerprint",
    "load_checkpoint",
    "load_distiller_state",
    "result_keys",
    "save_checkpoint",
    "save_reference",
    "synthetic_meta",
    "train_content",
    "writing",
]

CHECKPOINT_NAME = "checkpoint.pt"
HISTORY_NAME = "history.jsonl"
FORMAT = "haba_fast.distill/2"
FORMATS = ("haba_fast.distill/1", FORMAT)  # every resume-state format this version reads

# DistillConfig keys that never change what a run computes: where it runs and writes, how often it checkpoints
# or evaluates, and when it stops (``iterations``: a run may be extended). Inputs given by path (data_path,
# buffer_path) are compared by content instead (:func:`inputs_fingerprint`), so a moved folder resumes and a
# changed one does not.
NON_RESULT_KEYS = frozenset(
    {
        "device",
        "checkpoint_every",
        "eval_it",
        "iterations",
        "data_path",
        "buffer_path",
        "memory_budget",  # what the engine keeps vs recomputes: same gradients, other memory and time
        "offload_weights",  # where the engine keeps the w_t: the same gradients (streamed batches: bit for bit)
        "cuda_graphs",  # the engine's step kernels replayed from CUDA graphs: the same kernels, the same gradients
    }
)
# Guard settings: they change nothing while the run is healthy, only where it skips or stops.
GUARD_KEYS = frozenset({"max_loss", "max_bad_steps"})
# Keys that shape the saved tensors: a change cannot be applied to a checkpoint, even with allow_changed.
STRUCTURAL_KEYS = (
    "parameterization",
    "ipc",
    "budget_ipc",
    "n_hallucinators",
    "kernel_size",
    "model",
    "single_channel",
    "batch_syn",
    "lr_param",
    "objective",
    "soft_labels",
)
# Keys used only to initialize (iteration 0): the checkpoint's random state and learned lr replace their effect.
INIT_ONLY_KEYS = frozenset({"seed", "lr_teacher", "pix_init", "hallucinator_init"})
# Pseudo-keys of the inputs' fingerprint (allow_changed accepts them too).
_INPUT_KEYS = {"dataset_content": "dataset", "buffer_content": "buffer_path"}


def _config_fields() -> List[str]:
    from haba_fast.distill import DistillConfig

    return [f.name for f in dataclasses.fields(DistillConfig)]


def result_keys() -> Tuple[str, ...]:
    """Every DistillConfig key that changes a run's result (compared on resume)."""
    return tuple(k for k in _config_fields() if k not in NON_RESULT_KEYS and k not in GUARD_KEYS)


def flag_name(key: str) -> str:
    """The command-line spelling of a DistillConfig key (``n_hallucinators`` -> ``--n_style``)."""
    try:
        from haba_fast.commands.distill import _FLAGS

        for dest, names, _kwargs, _help in _FLAGS:
            if dest == key:
                return names[0]
    except ImportError:  # pragma: no cover - the CLI is always installed with the library
        pass
    return "--" + key


# ----------------------------------------------------------------------------------------------------------------------
# The state


def _generator_state(g: Optional[torch.Generator]) -> Optional[Tensor]:
    return None if g is None else g.get_state().clone()  # uint8 [S]


def distiller_state(distiller: "Distiller", *, inputs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Everything resume needs, as tensors and plain values (loads with ``weights_only=True``).

    A deep copy: optimizer states would otherwise share their momentum tensors with the running distiller.
    """
    d = distiller
    state = {
        "format": FORMAT,
        "iteration": int(d.iteration),
        "config": d.cfg.to_dict(),
        "inputs": inputs,
        "synthetic": {k: v.detach().cpu() for k, v in d.synthetic.state_dict().items()},
        "syn_lr": d.syn_lr.detach().cpu(),
        "lr_param": d.lr_param.detach().cpu() if d.lr_param is not d.syn_lr else None,
        "opt_img": d.opt_img.state_dict(),
        "opt_style": d.opt_style.state_dict() if d.opt_style is not None else None,
        "opt_lr": d.opt_lr.state_dict() if d.opt_lr is not None else None,
        "opt_label": d.opt_label.state_dict() if d.opt_label is not None else None,
        "objective": d.objective.state_dict(),
        "adversary": d.adversary.state_dict() if d.adversary is not None else None,
        "opt_adv": d.opt_adv.state_dict() if d.opt_adv is not None else None,
        "stream": d.stream.state_dict(),
        "bad_steps": int(d.bad_steps),
        "world_size": dist.world_size(),  # processes of the run (haba_fast.dist); a resume needs as many
        "rng": {
            "distill": _generator_state(d.generator),
            "eval": _generator_state(d.eval_generator),
        },
    }
    return copy.deepcopy(state)


def _structural_mismatch(saved: Dict[str, Any], cfg: "DistillConfig") -> List[str]:
    out = []
    for key in STRUCTURAL_KEYS:
        default = getattr(type(cfg)(), key)
        if saved.get(key, default) != getattr(cfg, key):
            out.append(f"{flag_name(key)} ({key}) {saved.get(key, default)!r} -> {getattr(cfg, key)!r}")
    return out


def load_distiller_state(distiller: "Distiller", state: Dict[str, Any]) -> None:
    """Restore ``distiller`` from :func:`distiller_state`'s output.

    The optimizers' learning rates come from ``distiller.cfg`` (not from the saved state), so a value changed
    on resume (``allow_changed``) is applied.

    Raises:
        ValueError: not a distillation state, or one whose tensors have other shapes (``STRUCTURAL_KEYS``).
    """
    d = distiller
    if not isinstance(state, dict) or state.get("format") not in FORMATS:
        raise ValueError(f"not a haba_fast distillation checkpoint (missing format tag {FORMAT})")
    mismatch = _structural_mismatch(state.get("config", {}), d.cfg)
    if mismatch:
        raise ValueError(
            f"the checkpoint was made with other shapes: {'; '.join(mismatch)}; "
            "resume with the same settings or start a new --out folder"
        )
    with torch.no_grad():
        d.synthetic.load_state_dict(state["synthetic"])
        d.syn_lr.copy_(state["syn_lr"].to(d.device))
        if state.get("lr_param") is not None and d.lr_param is not d.syn_lr:
            d.lr_param.copy_(state["lr_param"].to(d.device))
    d.opt_img.load_state_dict(state["opt_img"])
    if d.opt_style is not None:
        d.opt_style.load_state_dict(state["opt_style"])
    if d.opt_lr is not None:
        d.opt_lr.load_state_dict(state["opt_lr"])
    if d.opt_label is not None:
        d.opt_label.load_state_dict(state["opt_label"])
    d.objective.load_state_dict(state.get("objective") or {})
    if d.adversary is not None:
        d.adversary.load_state_dict(state["adversary"])
        d.opt_adv.load_state_dict(state["opt_adv"])
    d.set_optimizer_lrs()
    d.stream.load_state_dict(state["stream"])
    rng = state.get("rng")
    if rng is None:  # format 1: the distillation generator only
        d.generator.set_state(state["generator"])
    else:
        d.generator.set_state(rng["distill"])
        if rng.get("eval") is not None:
            d.eval_generator.set_state(rng["eval"])
    d.bad_steps = int(state.get("bad_steps", 0))
    d.iteration = int(state["iteration"])


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Read a resume state with ``weights_only=True`` (tensors and plain values only; nothing is executed).

    Raises:
        FileNotFoundError: no file. ValueError: corrupt, not a checkpoint, or holding anything but tensors and
        plain values (a crafted or foreign pickle).
    """
    from haba_fast.io import unpickling_detail

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"distillation checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's weights-only error advises re-running with weights_only=False: not advice for a damaged or crafted
        # file, so only its useful line is kept (as haba_fast.io.torch_load does).
        if isinstance(exc, pickle.UnpicklingError):
            detail = unpickling_detail(exc)
        else:
            detail = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(
            f"distillation checkpoint {path} is corrupt or holds more than tensors and plain values, and was "
            f"not loaded ({type(exc).__name__}: {detail}); delete it to start over, or resume from a copy you trust"
        ) from exc
    if not isinstance(state, dict) or state.get("format") not in FORMATS:
        raise ValueError(f"{path} is not a haba_fast distillation checkpoint (missing format tag {FORMAT})")
    _check_state(state, path)
    return state


def _check_state(state: Dict[str, Any], path: Path) -> None:
    """Refuse a damaged state at load, naming the entry, instead of a raw error (or a NaN run) after it."""

    def damaged(entry: str, what: str) -> ValueError:
        return ValueError(
            f"distillation checkpoint {path} is damaged: its entry {entry} {what}, and it was not loaded; delete it "
            "to start over, or resume from a copy you trust"
        )

    for key, default in (("iteration", None), ("bad_steps", 0)):
        v = state.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise damaged(key, f"is {v!r}, not an integer >= 0")
    synthetic = state.get("synthetic")
    if not isinstance(synthetic, dict):
        raise damaged("synthetic", f"is a {type(synthetic).__name__}, not a dict of tensors")
    # The learned values: a NaN or inf here would resume and fail at the first step, blaming the learning rates.
    learned = {f"synthetic[{k!r}]": t for k, t in synthetic.items()}
    learned["syn_lr"] = state.get("syn_lr")
    if state.get("lr_param") is not None:
        learned["lr_param"] = state["lr_param"]
    for entry, t in learned.items():
        if not isinstance(t, Tensor):
            raise damaged(entry, f"is a {type(t).__name__}, not a tensor")
    # The optimizers' moments and the adversary's weights: a NaN there reaches the learned values at the first step.
    kept = [_nested_tensors(state.get(k), k) for k in ("opt_img", "opt_style", "opt_lr", "opt_label", "objective",
                                                        "adversary", "opt_adv")]
    for entry, t in itertools.chain(learned.items(), *kept):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise damaged(entry, "holds NaN or inf values")
    # Both generators of a run are CPU generators (Distiller): set_state on one refuses a bad state's size or type.
    rng = state.get("rng")
    if rng is None:  # format 1: the distillation generator only
        generators = {"generator": state.get("generator")}
    elif isinstance(rng, dict):
        generators = {"rng['distill']": rng.get("distill")}
        if rng.get("eval") is not None:
            generators["rng['eval']"] = rng["eval"]
    else:
        raise damaged("rng", f"is a {type(rng).__name__}, not a dict")
    for entry, g in generators.items():
        try:
            torch.Generator().set_state(g)
        except (RuntimeError, TypeError) as exc:
            raise damaged(entry, f"is not a random generator's state ({exc})") from None


def _nested_tensors(value: Any, entry: str) -> Iterator[Tuple[str, Tensor]]:
    """Every tensor inside nested dicts, lists and tuples, with its entry's path, such as
    ``opt_img['state'][0]['momentum_buffer']``."""
    if isinstance(value, Tensor):
        yield entry, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _nested_tensors(v, f"{entry}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _nested_tensors(v, f"{entry}[{i}]")


# ----------------------------------------------------------------------------------------------------------------------
# Resume checks


def _digest(t: Tensor, samples: int = 65536) -> str:
    """Hash of a tensor's shape, dtype and (up to) ``samples`` evenly spaced elements: exact and cheap."""
    t = t.detach().cpu().reshape(-1)
    if t.numel() > samples:
        # float32 positions, as checkpoints written before hold them; past 2**24 elements the last one can round up
        # beyond the end (55,000 Fashion-MNIST images did), so the positions are clamped to the last element.
        t = t[torch.linspace(0, t.numel() - 1, samples).long().clamp_(max=t.numel() - 1)]
    h = hashlib.sha256(str((tuple(t.shape), str(t.dtype))).encode())
    if t.dtype == torch.bfloat16:
        t = t.float()
    h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def train_content(dataset) -> Dict[str, Any]:
    """The training images and labels of ``dataset``, by content (name, count and sampled digests)."""
    return {
        "name": getattr(dataset, "name", None),
        "num_train": int(dataset.train_labels.numel()),
        "images": _digest(dataset.train_images),
        "labels": _digest(dataset.train_labels),
    }


def inputs_fingerprint(dataset, buffer) -> Dict[str, Any]:
    """What the run reads, by content: the training images and labels, and the expert trajectories (or None)."""
    ds = train_content(dataset)
    if buffer is None:  # objectives other than MTT read no expert trajectories
        return {"dataset_content": ds, "buffer_content": None}
    T = int(buffer.num_trajectories)
    E = getattr(buffer, "num_epochs", None)
    buf = {
        "num_trajectories": T,
        "num_epochs": None if E is None else int(E),
        "first": _digest(buffer.snapshot(0, 0)),
        "last": _digest(buffer.snapshot(T - 1, int(E))) if E is not None else None,
    }
    return {"dataset_content": ds, "buffer_content": buf}


def _normalize_allowed(allow_changed: Iterable[str]) -> set:
    fields = set(_config_fields())
    aliases: Dict[str, str] = {}
    try:
        from haba_fast.commands.distill import _FLAGS

        for dest, names, _k, _h in _FLAGS:
            for n in names:
                aliases[n.lstrip("-").replace("-", "_").lower()] = dest
    except ImportError:  # pragma: no cover
        pass
    out = set()
    for raw in allow_changed:
        name = str(raw).strip()
        if not name:
            continue
        key = name.lstrip("-").replace("-", "_")
        key = key if key in fields else aliases.get(key.lower(), key)
        if key not in fields:
            raise ValueError(f"--allow-changed {name}: not a distillation flag")
        out.add(key)
    return out


def check_resume(
    saved_state: Dict[str, Any],
    cfg: "DistillConfig",
    inputs: Optional[Dict[str, Any]] = None,
    allow_changed: Iterable[str] = (),
    *,
    where: str = "the checkpoint",
    log: Callable[[str], None] = print,
) -> List[str]:
    """Compare a checkpoint's configuration and inputs with this run's; returns the keys that changed (allowed).

    Raises:
        ValueError: a result-changing key or an input differs and is not in ``allow_changed`` (the message names
            every such flag and how to continue), or a structural key differs (never allowed).
    """
    from haba_fast.distill import DistillConfig

    saved_world = int(saved_state.get("world_size", 1))
    if saved_world != dist.world_size():
        raise ValueError(
            f"{where} was written by a run on {saved_world} process(es), this one has {dist.world_size()}: resume with "
            + ("`torchrun --nproc-per-node " + str(saved_world) + " haba-fast distill ...`" if saved_world > 1 else
               "one process (without torchrun)")
            + " (or start a new --out folder)"
        )
    allowed = _normalize_allowed(allow_changed)
    saved = dict(saved_state.get("config", {}))
    defaults = DistillConfig().to_dict()
    now = cfg.to_dict()
    structural = _structural_mismatch(saved, cfg)
    if structural:
        raise ValueError(
            f"{where} was made with other shapes, which cannot change on resume: {'; '.join(structural)}; "
            "resume with the same settings or start a new --out folder"
        )
    was = {k: saved.get(k, defaults[k]) for k in result_keys()}
    # A setting this configuration never reads (distill.SCOPES: a pixel run's lr_style, ...) changes nothing.
    changed = [k for k in was if was[k] != now[k] and not cfg.unused([k])]
    lines = [f"{flag_name(k)} {was[k]!r} -> {now[k]!r}" for k in changed]
    # The checkpoint's values as flags: a default may have moved since the run began (HaBa + DC/DSA's lr_style).
    keep = [f"{flag_name(k)} {_flag_text(was[k])}" for k in changed if k not in allowed and was[k] is not None]
    saved_inputs = saved_state.get("inputs")
    if inputs is not None and saved_inputs is not None:
        for key, flag in _INPUT_KEYS.items():
            if saved_inputs.get(key) != inputs.get(key):
                changed.append(flag)
                what = "training images or labels" if key == "dataset_content" else "expert trajectories"
                lines.append(f"{flag_name(flag)}: the {what} differ from the checkpoint's")
    refused = [line for k, line in zip(changed, lines) if k not in allowed]
    if refused:
        keys = ",".join(dict.fromkeys(k for k in changed if k not in allowed))
        raise ValueError(
            f"{where} was made with other settings: {'; '.join(refused)}. Resume with the checkpoint's values"
            + (f" ({' '.join(keep)}: a default may have moved since the run began)" if keep else "")
            + f", pass --allow-changed {keys} to continue with the new values, or start a new --out folder"
        )
    for k in dict.fromkeys(changed):
        if k in INIT_ONLY_KEYS:
            log(f"--allow-changed {k}: {flag_name(k)} only sets up iteration 0; the run continues from the "
                "checkpoint's random state and learned lr")
    return list(dict.fromkeys(changed))


def _flag_text(value: Any) -> str:
    """A config value as a command line gives it (floats exactly: ``repr``; a list comma-separated)."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return repr(value) if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------------------------------------------------
# Files


def synthetic_meta(distiller: "Distiller", dataset) -> Dict[str, Any]:
    """The ``meta`` of our synthetic files: iteration, learned lr, config, dataset name, mean/std and ZCA state."""
    lr = float(distiller.syn_lr.detach())
    meta = {"iteration": distiller.iteration, "lr": lr, "syn_lr": lr, "config": distiller.cfg.to_dict()}
    if dataset is not None:
        meta["dataset"] = dataset.name
        if getattr(dataset, "mean", None) is not None and getattr(dataset, "std", None) is not None:
            meta["mean"], meta["std"] = list(dataset.mean), list(dataset.std)  # after the inverse ZCA, if any
        zca = getattr(dataset, "zca", None)
        if zca is not None and hasattr(zca, "state_dict"):
            meta["zca"] = zca.state_dict()
    return meta


def save_reference(distiller: "Distiller", ref_dir: Path, it: str) -> None:
    """The reference's files: images_<it>.pt [K·ipc, c_b, H, W], styles_<it>.pt (HaBa), syn_lr_<it>.pt."""
    from haba_fast.io import atomic_torch_save

    distiller.synthetic.to_reference(ref_dir, it=it)
    atomic_torch_save(distiller.syn_lr.detach().cpu(), ref_dir / f"syn_lr_{it}.pt")


def save_checkpoint(
    distiller: "Distiller", out_dir: Path, dataset=None, *, inputs: Optional[Dict[str, Any]] = None
) -> Path:
    """Write our format, the reference format and the resume state for the current iteration (each atomically).

    Raises:
        ValueError: a write failed (disk full, folder became read-only); the previous checkpoint is intact.
    """
    from haba_fast.io import atomic_torch_save

    out_dir = Path(out_dir)
    it = distiller.iteration
    with writing(f"the checkpoint of iteration {it}", out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = synthetic_meta(distiller, dataset)
        distiller.synthetic.save(out_dir / f"synthetic_{it}.pt", meta)
        distiller.synthetic.save(out_dir / "synthetic_last.pt", meta)
        save_reference(distiller, out_dir / "reference", str(it))
        # The resume state goes last: a checkpoint.pt always points at files that exist.
        atomic_torch_save(distiller_state(distiller, inputs=inputs), out_dir / CHECKPOINT_NAME)
    return out_dir / CHECKPOINT_NAME


@contextlib.contextmanager
def writing(what: str, out_dir: Path) -> Iterator[None]:
    """Turn a failed write (disk full, read-only) into a ValueError that says the last checkpoint is intact."""
    try:
        yield
    except OSError as exc:
        raise ValueError(
            f"could not write {what} in {out_dir}: {exc.strerror or exc}; the last complete checkpoint "
            f"({CHECKPOINT_NAME}) is intact: free space and rerun with --resume"
        ) from exc


# ----------------------------------------------------------------------------------------------------------------------
# History


class History:
    """``history.jsonl``: one JSON object per line, ``"iteration"`` in each.

    ``append`` writes a whole line and flushes it; a kill can tear only the last line, which ``restart`` drops.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> Tuple[List[Dict[str, Any]], int]:
        """(records, number of unreadable lines dropped)."""
        if not self.path.exists():
            return [], 0
        records, dropped = [], 0
        for line in self.path.read_bytes().decode("utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if isinstance(rec, dict) and isinstance(rec.get("iteration"), (int, float)):
                records.append(rec)
            else:
                dropped += 1
        return records, dropped

    def restart(self, iteration: int, log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
        """Keep the records of iterations before ``iteration`` (0: none) and rewrite the file atomically."""
        from haba_fast.io import atomic_write_text

        if iteration <= 0:
            if self.path.exists():
                atomic_write_text("", self.path)
            return []
        records, dropped = self.read()
        if dropped:
            log(f"{self.path}: dropped {dropped} unreadable line(s) (a run killed while writing it)")
        keep = [r for r in records if r["iteration"] < iteration]
        atomic_write_text("".join(json.dumps(r) + "\n" for r in keep), self.path)
        return keep

    def append(self, record: Dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
