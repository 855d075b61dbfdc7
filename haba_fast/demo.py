"""The embedded end-to-end job: distill scikit-learn's digits on a CPU and compare at equal storage.

``haba-fast distill`` with no dataset (and ``make demo``) runs :func:`run_demo`:

1. train a few small experts on digits (``haba_fast.experts``; resumable, so a second run reuses them);
2. distill HaBa at a small budget (``--budget-ipc``: bases + hallucinators fit that many images per class);
3. distill pixel MTT at the same budget (IPC = budget) and take a random real coreset of the same IPC
   (both baselines get at least HaBa's storage: HaBa's count is rounded down, theirs is the budget);
4. evaluate the three (fresh networks, a few repeats) and print a table (method, storage floats,
   image-equivalents, accuracy mean ± std); the table also goes to ``<out>/results.json``, the HaBa
   picture to ``<out>/haba/synthetic.png``.

The digits are 8×8 single-channel images, so the default network is ``ConvNetW32`` (the reference
ConvNet at width 32): the unrolled steps of width 128 cost ~16× more in its 128→128 convolutions and
would not fit the 10-minute budget on two cores. The reference's CIFAR-10 learning rates overshoot on this
data: with lr_img = 1000 one step moved the normalized images by 1.8 (rms; the images have rms 1) and pixel
MTT fell to 47%, and the hallucinators' conv weights get ~50× larger gradients than the bases, so they need
a much smaller lr_style.

HaBa's setting (6 hallucinators, lr_img 3, lr_style 0.3, 400 iterations) was chosen on a validation split
with :func:`tune` (``python bench/tune_demo.py``; every trial in ``bench/results/demo_tuning.json`` and
docs/RESULTS.md): 25 train images per class held out, experts and distillations on the rest, the test set
never read. At budget 2 every candidate keeps 1 basis per class, and more hallucinators won (1: 48%, 2: 76%,
5: 84%, 6: 84.5% on validation); lr_img ∈ {3, 10} × lr_style ∈ {0.1, 0.3, 1} at 5 hallucinators all
scored 80-84%, and 800 iterations added 0.2 points (within the noise, at twice the time), so 400 stay.
Pixel MTT's setting (lr_img 10, 200 iterations) was not searched; it scored 89.4% on the same split.
Random real coresets of 2 images per class scored 80% ± 4 over 5 draws (75-86% by draw), hence the
baseline takes a new draw per run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = ["DemoConfig", "TUNABLE", "run_demo", "format_table", "tune"]


@dataclass
class DemoConfig:
    """Settings of the digits demo (defaults tuned to run in ≤ ~10 minutes on a 2-core CPU)."""

    out: str = "runs/demo"
    model: str = "ConvNetW32"
    seed: int = 0
    # experts
    num_experts: int = 3
    expert_train_epochs: int = 8
    expert_lr: float = 0.01
    expert_batch: int = 64
    # distillation (shared)
    budget_ipc: int = 2
    n_hallucinators: int = 6  # chosen on validation (tune): the most that fit next to 1 basis per class at budget 2
    syn_steps: int = 20
    expert_epochs: int = 2
    max_start_epoch: int = 6  # with expert_epochs 2: the whole 8-epoch trajectories
    iterations: int = 400  # HaBa
    pixels_iterations: int = 200  # pixel MTT converges faster (86% after 60 iterations here)
    lr_teacher: float = 0.01
    lr_lr: float = 1e-6
    # HaBa (chosen on validation: bench/tune_demo.py)
    haba_lr_img: float = 3.0
    haba_lr_style: float = 0.3
    # pixel MTT
    pixels_lr_img: float = 10.0
    # evaluation
    eval_epochs: int = 300
    num_eval: int = 5
    engine: str = "auto"
    device: str = "cpu"
    progress: bool = True
    # Intra-op threads while the demo runs (None: leave torch's setting). Its tensors are tiny (8×8 images, batches
    # of 10-20), so one thread is as fast on an idle machine, and on a busy 2-core one a HaBa iteration took
    # 1.8 s with 2 threads against 0.6 s with 1 (measured here).
    threads: Optional[int] = 1

    def validate(self) -> "DemoConfig":
        """Raise ValueError naming the first bad setting, before anything runs (the experts train first).

        Checks the two distillations' configs, the experts', the evaluation's, and that the experts train long
        enough for the segments the distillations match. Sizes that need the data are checked by ``run_demo``
        once the digits are loaded, still before the experts train.
        """
        if int(self.num_eval) < 1:  # the demo's table compares evaluated accuracies: nothing to show without them
            raise ValueError(
                f"the digits demo needs --num_eval >= 1 (evaluation networks per method), got {self.num_eval}"
            )
        for param in ("haba", "pixels"):
            _distill_config(self, param).validate()
        _expert_config(self).validate()
        _eval_config(self).validate()
        if not self.lr_teacher > 0:  # the random coreset's evaluation trains with it
            raise ValueError(
                f"the digits demo needs --lr_teacher > 0 (it evaluates the coreset with it), got {self.lr_teacher}"
            )
        need = self.max_start_epoch - 1 + self.expert_epochs
        if need > self.expert_train_epochs:
            raise ValueError(
                f"--max_start_epoch {self.max_start_epoch} + --expert_epochs {self.expert_epochs} needs snapshots up "
                f"to epoch {need}, but the demo's experts train {self.expert_train_epochs} epochs; lower them"
            )
        if self.threads is not None and int(self.threads) < 1:
            raise ValueError(f"threads must be >= 1 (or None), got {self.threads}")
        return self


def _distill_config(demo: DemoConfig, parameterization: str) -> "DistillConfig":  # noqa: F821
    from haba_fast.distill import DistillConfig

    haba = parameterization == "haba"
    return DistillConfig(
        dataset="digits",
        model=demo.model,
        parameterization=parameterization,
        budget_ipc=demo.budget_ipc,
        n_hallucinators=demo.n_hallucinators,
        syn_steps=demo.syn_steps,
        expert_epochs=demo.expert_epochs,
        max_start_epoch=demo.max_start_epoch,
        iterations=demo.iterations if haba else demo.pixels_iterations,
        lr_teacher=demo.lr_teacher,
        lr_lr=demo.lr_lr,
        lr_img=demo.haba_lr_img if haba else demo.pixels_lr_img,
        lr_style=demo.haba_lr_style,
        num_eval=0,
        epoch_eval_train=demo.eval_epochs,
        engine=demo.engine,
        device=demo.device,
        seed=demo.seed,
        # The reference scripts' λ values (run_cifar10_*_style5.sh).
        lambda_club_content=0.1,
        lambda_contrast_content=0.1,
        lambda_cls_content=1.0,
        lambda_likeli_content=0.1,
    )


def format_table(rows: List[Dict[str, Any]]) -> str:
    """Plain-text table of the demo rows."""
    head = ("method", "storage (floats)", "image-equivalents", "% of train", "accuracy (%)")
    lines = [head]
    for r in rows:
        lines.append(
            (
                r["method"],
                f"{r['floats']:,}",
                f"{r['image_equivalents']:.1f}",
                f"{r['percent_of_train']:.2f}",
                f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = [" | ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)


def run_demo(demo: Optional[DemoConfig] = None, *, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run the digits demo end to end; returns the results dict (also written to ``<out>/results.json``)."""
    demo = (demo or DemoConfig()).validate()
    return _with_threads(demo, lambda: _run(demo, log))


def _with_threads(demo: DemoConfig, fn: Callable[[], Any]) -> Any:
    """``fn()`` under ``demo.threads`` intra-op threads (torch's setting is restored afterwards)."""
    threads = torch.get_num_threads()
    if demo.threads:
        torch.set_num_threads(int(demo.threads))
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def _expert_config(demo: DemoConfig):
    from haba_fast import experts

    return experts.ExpertConfig(
        model=demo.model,
        num_experts=demo.num_experts,
        epochs=demo.expert_train_epochs,
        lr=demo.expert_lr,
        batch_size=demo.expert_batch,
        seed=demo.seed,
        device=demo.device,
        test_every=0,
    )


def _experts(demo: DemoConfig, dataset, buffer_dir: Path, log: Callable[[str], None]):
    """Train (or reuse) the demo's experts on ``dataset``'s train images; returns the loaded buffer."""
    from haba_fast import experts

    ecfg = _expert_config(demo)
    t = time.perf_counter()
    buffer_dir = experts.train_experts(dataset, ecfg, buffer_dir, progress=demo.progress)
    buffer = experts.load_experts(buffer_dir, ecfg.num_experts)
    log(
        f"experts: {buffer.num_trajectories} × {buffer.num_epochs} epochs in {buffer_dir} "
        f"({time.perf_counter() - t:.0f} s)"
    )
    return buffer


def _eval_config(demo: DemoConfig):
    from haba_fast.evaluate import EvalConfig

    return EvalConfig(models=(demo.model,), num_eval=demo.num_eval, epochs=demo.eval_epochs, device=demo.device)


def _distill_and_evaluate(demo: DemoConfig, param: str, dataset, buffer, out: Path, ev, log: Callable[[str], None]):
    """Distill ``param`` ("haba" | "pixels") under ``demo`` and evaluate it on ``dataset``'s test_* images.

    Returns ``(DistillResult, EvalResult, description, {"distill_<param>_s": .., "eval_<param>_s": ..})``.
    """
    from haba_fast.distill import distill
    from haba_fast.evaluate import evaluate_synthetic

    cfg = _distill_config(demo, param)
    t = time.perf_counter()
    result = distill(cfg, dataset, buffer, out, overwrite=True, progress=demo.progress, evaluate=False, log=log)
    seconds = {f"distill_{param}_s": time.perf_counter() - t}
    syn = result.synthetic
    syn.meta["lr"] = result.syn_lr
    t = time.perf_counter()
    res = evaluate_synthetic(
        syn, dataset, ev, lr=result.syn_lr, generator=torch.Generator().manual_seed(demo.seed + 100), label=param
    )
    seconds[f"eval_{param}_s"] = time.perf_counter() - t
    desc = (
        f"HaBa ({syn.bpc} basis/class + {syn.n_hallucinators} hallucinators, {result.iterations} it)"
        if param == "haba"
        else f"pixel MTT (IPC {syn.ipc}, {result.iterations} it)"
    )
    return result, res, desc, seconds


def _run(demo: DemoConfig, log: Callable[[str], None]) -> Dict[str, Any]:
    from haba_fast import data
    from haba_fast.evaluate import coreset, evaluate_synthetic
    from haba_fast.io import atomic_write_text

    t0 = time.perf_counter()
    out = Path(demo.out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = data.load("digits")
    n_train = int(dataset.train_labels.numel())
    log(
        f"digits: {n_train} train / {dataset.test_labels.numel()} test images of "
        f"{dataset.channels}×{dataset.im_size[0]}×{dataset.im_size[1]}, {dataset.num_classes} classes"
    )

    # Sizes that need the data (bases per class at the budget, memory), before the experts train.
    from haba_fast.distill import check_fits, resolve_device

    for param in ("haba", "pixels"):
        check_fits(_distill_config(demo, param), dataset, resolve_device(demo.device))

    # 1. experts (resumable: a second run reuses the finished ones)
    buffer = _experts(demo, dataset, out / "buffer", log)

    ev = _eval_config(demo)
    rows: List[Dict[str, Any]] = []
    timings: Dict[str, float] = {}

    def add_row(method: str, storage, res, extra: Dict[str, Any]) -> None:
        rows.append(
            {
                "method": method,
                "floats": int(storage.floats),
                "image_equivalents": storage.image_equivalents,
                "percent_of_train": storage.percent_of_train,
                "mean": res.mean(),
                "std": res.std(),
                "accuracies": res.accuracies[demo.model],
                **extra,
            }
        )

    # 2./3. HaBa and pixel MTT at the same budget
    grid = None
    for param in ("haba", "pixels"):
        result, res, desc, seconds = _distill_and_evaluate(demo, param, dataset, buffer, out / param, ev, log)
        timings.update(seconds)
        add_row(
            desc,
            result.storage,
            res,
            {
                "learned_lr": result.syn_lr,
                "iterations": result.iterations,
                "final_loss": result.history[-1].get("loss") if result.history else None,  # a skipped step has none
            },
        )
        if param == "haba":
            grid = result.grid_path
            haba_set = result.synthetic

    # 4. random real coreset at the same budget: a fresh draw per repeat, since which images are drawn matters as
    # much as the network's initialization (one draw scored 78% and another 84% here).
    from haba_fast.evaluate import EvalResult
    from haba_fast.factorization import Pixels

    storage = Pixels(dataset.num_classes, demo.budget_ipc, dataset.channels, dataset.im_size).storage(n_train)
    t = time.perf_counter()
    accs: List[float] = []
    one = dataclasses.replace(ev, num_eval=1)
    for rep in range(demo.num_eval):
        x, y = coreset(dataset, demo.budget_ipc, "random", torch.Generator().manual_seed(demo.seed + 7 + rep))
        r = evaluate_synthetic(
            (x, y),
            dataset,
            one,
            lr=demo.lr_teacher,
            generator=torch.Generator().manual_seed(demo.seed + 100 + rep),
            label="random",
        )
        accs.append(r.accuracies[demo.model][0])
    res = EvalResult(
        accuracies={demo.model: accs},
        lr=demo.lr_teacher,
        num_samples=int(y.numel()),
        epochs=demo.eval_epochs,
        label="random",
    )
    timings["eval_random_s"] = time.perf_counter() - t
    add_row(f"random real (IPC {demo.budget_ipc}, a new draw per run)", storage, res, {})

    total = time.perf_counter() - t0
    table = format_table(rows)
    log("")
    log(f"digits, {demo.model}, {demo.num_eval} evaluation networks × {demo.eval_epochs} epochs each:")
    log(table)
    note = storage_note(haba_set, rows[0]["mean"], rows[1]["mean"], demo.budget_ipc)
    if note:
        log(note)
    log(f"HaBa picture: {grid}")
    log(f"total time: {total:.0f} s")
    results = {
        "config": dataclasses.asdict(demo),
        "rows": rows,
        "table": table,
        "note": note,
        "grid": str(grid) if grid else None,
        "seconds": total,
        "timings": timings,
    }
    atomic_write_text(json.dumps(results, indent=2), out / "results.json")
    log(f"results: {out / 'results.json'}")
    return results


def storage_note(haba_set, haba_acc: float, pixel_acc: float, pixel_ipc: int) -> Optional[str]:
    """One line that says why HaBa trails pixel MTT at equal storage, or None when it does not trail.

    At small image sizes the hallucinators' scale/shift maps (2·C·(H−k+1)·(W−k+1) floats each) take a large share
    of the budget, which leaves fewer bases than the pixel set has images.
    """
    if haba_acc >= pixel_acc:
        return None
    H, W = haba_set.im_size
    image = haba_set.channels * H * W
    hall = sum(p.numel() for p in haba_set.hallucinator_parameters())
    total = haba_set.storage().floats
    return (
        f"why HaBa trails pixel MTT here: at {H}×{W} its {haba_set.n_hallucinators} hallucinators cost {hall:,} floats "
        f"({100 * hall / total:.0f}% of its storage, {hall / image:.1f} images), mostly their scale/shift maps, so it "
        f"keeps {haba_set.bpc} basis per class against pixel MTT's {pixel_ipc} images. On larger images the maps "
        "cost a smaller share, which alone does not make HaBa win: on Fashion-MNIST (28×28, maps ~9%) it ties pixels "
        "with MTT over five seeds and trails with DC, DSA and DM (docs/RESULTS-fashion-mnist.md)"
    )


# ----------------------------------------------------------------------------------------------------------------
# Choosing the demo's settings on a validation split

# The DemoConfig fields a validation trial may set, by the method they concern.
TUNABLE: Dict[str, Tuple[str, ...]] = {
    "haba": ("n_hallucinators", "haba_lr_img", "haba_lr_style", "iterations"),
    "pixels": ("pixels_lr_img", "pixels_iterations"),
}
# DemoConfig fields that do not change a figure (left out of a tuning log's header, which decides reuse).
_NOT_DECIDING = ("out", "progress", "threads")


def check_trial(trial: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """``(method, settings)`` of one trial ``{"method": "haba" | "pixels", <TUNABLE field>: value, ..}``.

    Raises:
        ValueError: an unknown method, or a field that is not tunable for it.
    """
    method = trial.get("method")
    if method not in TUNABLE:
        raise ValueError(f"a demo trial needs method 'haba' or 'pixels', got {method!r} in {dict(trial)}")
    settings = {k: v for k, v in trial.items() if k != "method"}
    bad = sorted(k for k in settings if k not in TUNABLE[method])
    if bad:
        raise ValueError(f"{method} trials may set only {', '.join(TUNABLE[method])}; got {', '.join(bad)}")
    return method, settings


def _trial_key(method: str, settings: Mapping[str, Any]) -> str:
    return json.dumps({"method": method, **settings}, sort_keys=True)


def tune(
    trials: Sequence[Mapping[str, Any]],
    demo: Optional[DemoConfig] = None,
    *,
    val_per_class: int = 25,
    split_seed: int = 0,
    log_path=None,
    meta: Optional[Mapping[str, Any]] = None,
    log: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Run each trial on a validation split of digits' train images; the test set is never read.

    Per class, ``val_per_class`` train images (a permutation seeded by ``split_seed``:
    ``haba_fast.table.split_dataset``) are held out; the experts are trained and every trial distilled on the rest,
    and each trial's synthetic set is evaluated (``demo.num_eval`` fresh networks × ``demo.eval_epochs``) on the
    held-out images. Every trial is recorded, with each network's accuracy.

    Args:
        trials: ``{"method": "haba" | "pixels", <field>: value, ..}`` with fields from :data:`TUNABLE`; the other
            settings are ``demo``'s.
        demo: the base settings (``demo.out`` holds the experts and the trials' runs).
        val_per_class: validation images held out per class (digits has ~135 train images per class).
        split_seed: seed of the split.
        log_path: JSON file rewritten after every trial (atomically). A trial already recorded there under the same
            split and base settings is reused, not rerun.
        meta: stored as the log's ``meta`` (machine, command, commit); does not decide reuse.

    Returns:
        ``{"split", "base", "trials": [{"method", "settings", "values", "bpc", "floats", "accuracies", "mean",
        "std", "learned_lr", "final_loss", "seconds"}, ..], "best": {method: index of its best trial}, "meta"}``.
    """
    demo = demo or DemoConfig()
    checked = [check_trial(t) for t in trials]
    if int(demo.num_eval) < 1:
        raise ValueError(f"tuning needs num_eval >= 1 (evaluation networks per trial), got {demo.num_eval}")
    if int(val_per_class) != val_per_class or val_per_class < 1:
        raise ValueError(f"val_per_class must be a positive int, got {val_per_class!r}")
    return _with_threads(demo, lambda: _tune(checked, demo, int(val_per_class), int(split_seed), log_path, meta, log))


def _tune(checked, demo: DemoConfig, val_per_class: int, split_seed: int, log_path, meta, log) -> Dict[str, Any]:
    from haba_fast import data
    from haba_fast.io import atomic_write_text
    from haba_fast.table import Protocol, split_dataset

    out = Path(demo.out)
    out.mkdir(parents=True, exist_ok=True)
    protocol = Protocol(name="demo-val", val_per_class=val_per_class, train_per_class=None, split_seed=split_seed)
    pool, split = split_dataset(data.load("digits"), protocol, "val")  # pool.test_* = the validation images
    base = {k: v for k, v in dataclasses.asdict(demo).items() if k not in _NOT_DECIDING}
    done: Dict[str, Dict[str, Any]] = {}
    if log_path is not None and Path(log_path).exists():
        old = json.loads(Path(log_path).read_text())
        if old.get("split") == split and old.get("base") == base:
            done = {_trial_key(t["method"], t["settings"]): t for t in old.get("trials", [])}
    log(
        f"validation split: {split['val_images']} held-out / {split['train_images']} training images of digits "
        f"(seed {split_seed}); the test set is not used"
    )
    # The split's own experts: trained on its training pool alone (never on a validation image, nor another split's).
    buffer = _experts(demo, pool, out / f"buffer-val{val_per_class}-split{split_seed}", log)
    ev = _eval_config(demo)
    record: Dict[str, Any] = {"split": split, "base": base, "trials": [], "best": {}, "meta": dict(meta or {})}
    for i, (method, settings) in enumerate(checked):
        key = _trial_key(method, settings)
        if key in done:
            trial = done[key]
            log(f"trial {i} {key}: recorded, {100 * trial['mean']:.2f} ± {100 * trial['std']:.2f}")
        else:
            cfg = dataclasses.replace(demo, **settings)
            result, res, desc, seconds = _distill_and_evaluate(
                cfg, method, pool, buffer, out / "trials" / f"{i:02d}-{method}", ev, log
            )
            syn = result.synthetic
            trial = {
                "method": method,
                "settings": dict(settings),
                "values": {k: getattr(cfg, k) for k in TUNABLE[method]},
                "description": desc,
                "bpc": getattr(syn, "bpc", None),
                "floats": int(result.storage.floats),
                "accuracies": res.accuracies[demo.model],
                "mean": res.mean(),
                "std": res.std(),
                "learned_lr": result.syn_lr,
                "final_loss": result.history[-1].get("loss") if result.history else None,
                "seconds": seconds,
            }
            log(f"trial {i} {key}: validation {100 * trial['mean']:.2f} ± {100 * trial['std']:.2f}")
        record["trials"].append(trial)
        record["best"] = _best(record["trials"])
        if log_path is not None:
            atomic_write_text(json.dumps(record, indent=2), log_path)
    return record


def _best(trials: Sequence[Mapping[str, Any]]) -> Dict[str, int]:
    """Per method, the index of its trial with the highest mean validation accuracy (the first on a tie)."""
    best: Dict[str, int] = {}
    for i, t in enumerate(trials):
        j = best.get(t["method"])
        if j is None or t["mean"] > trials[j]["mean"]:
            best[t["method"]] = i
    return best
