"""``haba-fast bench genaug``: generate + augment, forward and backward, per DSA family and backend.

One JSON line: for each of the six DSA families the median seconds of one training-style step
(generate a batch with one hallucinator drawn per sample, augment it with per-sample parameters of that
family, backward to the bases and every hallucinator parameter) with the fused op
(``haba_fast.ops.generate_augment``) and with the reference path measured in the same run, their ratio,
the means over the families, and ``haba_fast.timing.environment()``.

The reference path is written the way the research code runs it: an ``nn.Module`` per hallucinator
(Conv2d → scale/shift → ConvTranspose2d) applied to the samples that drew it, then the composed DSA ops
of ``DiffAugment`` (meshgrid gathers for crop, a mask tensor for cutout, per-sample Python loops that
build the affine matrices for scale and rotate). It takes the same sampled parameters, so both paths
compute the same numbers (checked once per family before timing).
"""

from __future__ import annotations

import json
import math
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


def add_arguments(parser) -> None:
    parser.add_argument("--backend", default="auto", help="torch | cpu | triton | auto (default auto)")
    parser.add_argument("--batch", type=int, default=500, help="samples per step (default 500)")
    parser.add_argument("--size", type=int, default=32, help="image side H = W (default 32)")
    parser.add_argument("--channels", type=int, default=3, help="image channels C (default 3)")
    parser.add_argument("--base-channels", type=int, default=None, help="basis channels c_b (default: C)")
    parser.add_argument("--k", type=int, default=3, help="hallucinator kernel size (default 3)")
    parser.add_argument("--hallucinators", type=int, default=5, help="hallucinators Hn (default 5, HaBa's n_style)")
    parser.add_argument("--bases", type=int, default=100, help="bases M (default 100: 10 classes x 10)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated DSA families")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-reference", action="store_true", help="skip the reference path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON line (the default output anyway)")


# ---- the reference path (research-code style) -----------------------------------------------------------
class Hallucinator(nn.Module):
    """One hallucinator as the research code builds it: dec(enc(x) * scale + shift)."""

    def __init__(self, cb: int, C: int, k: int, H: int, W: int):
        super().__init__()
        self.enc = nn.Conv2d(cb, C, k)
        self.scale = nn.Parameter(torch.ones(1, C, H - k + 1, W - k + 1))
        self.shift = nn.Parameter(torch.zeros(1, C, H - k + 1, W - k + 1))
        self.dec = nn.ConvTranspose2d(C, C, k)

    def forward(self, x):
        return self.dec(self.enc(x) * self.scale + self.shift)


def reference_modules(params: Dict[str, torch.Tensor]) -> nn.ModuleList:
    """nn.ModuleList of Hallucinators holding copies of the stacked parameters (so both paths agree)."""
    Hn, C, cb, k, _ = params["enc_weight"].shape
    H = params["scale"].shape[2] + k - 1
    W = params["scale"].shape[3] + k - 1
    mods = nn.ModuleList([Hallucinator(cb, C, k, H, W) for _ in range(Hn)])
    with torch.no_grad():
        for h, m in enumerate(mods):
            m.enc.weight.copy_(params["enc_weight"][h])
            m.enc.bias.copy_(params["enc_bias"][h])
            m.scale.copy_(params["scale"][h][None])
            m.shift.copy_(params["shift"][h][None])
            m.dec.weight.copy_(params["dec_weight"][h])
            m.dec.bias.copy_(params["dec_bias"][h])
    return mods.to(device=params["bases"].device, dtype=params["bases"].dtype)


def reference_generate(bases, mods, base_idx, hall_idx):
    """Each hallucinator module runs on the samples that drew it; results go back in sample order."""
    outs, order = [], []
    for h in torch.unique(hall_idx).tolist():
        sel = (hall_idx == h).nonzero(as_tuple=True)[0]
        outs.append(mods[h](bases[base_idx[sel]]))
        order.append(sel)
    out = torch.cat(outs)
    inv = torch.empty_like(torch.cat(order))
    inv[torch.cat(order)] = torch.arange(inv.numel(), device=inv.device)
    return out[inv]


def _dsa_color(x, p):
    rb = p.values["brightness"].to(x).view(-1, 1, 1, 1)
    x = x + (rb - 0.5) * 1.0
    rs = p.values["saturation"].to(x).view(-1, 1, 1, 1)
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * (rs * 2.0) + m
    rc = p.values["contrast"].to(x).view(-1, 1, 1, 1)
    m = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - m) * (rc + 0.5) + m


def _dsa_crop(x, p):
    tx = p.values["tx"].to(x.device).view(-1, 1, 1)
    ty = p.values["ty"].to(x.device).view(-1, 1, 1)
    gb, gx, gy = torch.meshgrid(
        torch.arange(x.size(0), device=x.device),
        torch.arange(x.size(2), device=x.device),
        torch.arange(x.size(3), device=x.device),
        indexing="ij",
    )
    gx = torch.clamp(gx + tx + 1, 0, x.size(2) + 1)
    gy = torch.clamp(gy + ty + 1, 0, x.size(3) + 1)
    x_pad = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
    return x_pad.permute(0, 2, 3, 1).contiguous()[gb, gx, gy].permute(0, 3, 1, 2)


def _dsa_cutout(x, p):
    ch, cw = int(x.size(2) * p.cutout_ratio + 0.5), int(x.size(3) * p.cutout_ratio + 0.5)
    ox = p.values["ox"].to(x.device).view(-1, 1, 1)
    oy = p.values["oy"].to(x.device).view(-1, 1, 1)
    gb, gx, gy = torch.meshgrid(
        torch.arange(x.size(0), device=x.device),
        torch.arange(ch, device=x.device),
        torch.arange(cw, device=x.device),
        indexing="ij",
    )
    gx = torch.clamp(gx + ox - ch // 2, min=0, max=x.size(2) - 1)
    gy = torch.clamp(gy + oy - cw // 2, min=0, max=x.size(3) - 1)
    mask = torch.ones(x.size(0), x.size(2), x.size(3), dtype=x.dtype, device=x.device)
    mask[gb, gx, gy] = 0
    return x * mask.unsqueeze(1)


def _dsa_flip(x, p):
    r = p.values["r"].to(x.device).view(-1, 1, 1, 1)
    return torch.where(r < 0.5, x.flip(3), x)


def _dsa_scale(x, p):
    sx, sy = p.values["sx"], p.values["sy"]
    theta = [[[sx[i], 0, 0], [0, sy[i], 0]] for i in range(x.shape[0])]  # the research code's per-sample loop
    theta = torch.tensor(theta, dtype=x.dtype)
    grid = F.affine_grid(theta, x.shape, align_corners=True).to(x.device)
    return F.grid_sample(x, grid, align_corners=True)


def _dsa_rotate(x, p):
    t = p.values["theta"]
    theta = [[[torch.cos(t[i]), torch.sin(-t[i]), 0], [torch.sin(t[i]), torch.cos(t[i]), 0]] for i in range(x.shape[0])]
    theta = torch.tensor(theta, dtype=x.dtype)
    grid = F.affine_grid(theta, x.shape, align_corners=True).to(x.device)
    return F.grid_sample(x, grid, align_corners=True)


REFERENCE_DSA = {
    "color": _dsa_color,
    "crop": _dsa_crop,
    "cutout": _dsa_cutout,
    "flip": _dsa_flip,
    "scale": _dsa_scale,
    "rotate": _dsa_rotate,
}


# ---- the benchmark ----------------------------------------------------------------------------------------
def make_problem(
    batch: int,
    size: int,
    channels: int,
    base_channels: int,
    k: int,
    hallucinators: int,
    bases: int,
    device,
    dtype,
    seed: int = 0,
) -> Dict[str, torch.Tensor]:
    """Random bases, stacked hallucinator parameters (HaBa-like init) and one hallucinator drawn per sample."""
    g = torch.Generator().manual_seed(seed)
    H = W = size
    Ho, Wo = H - k + 1, W - k + 1
    C, cb, Hn = channels, base_channels, hallucinators

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    return {
        "bases": rnd(bases, cb, H, W),
        "enc_weight": rnd(Hn, C, cb, k, k, scale=1 / math.sqrt(cb * k * k)),
        "enc_bias": rnd(Hn, C, scale=0.1),
        "scale": 1 + rnd(Hn, C, Ho, Wo, scale=0.1),
        "shift": rnd(Hn, C, Ho, Wo, scale=0.1),
        "dec_weight": rnd(Hn, C, C, k, k, scale=1 / math.sqrt(C * k * k)),
        "dec_bias": rnd(Hn, C, scale=0.1),
        "base_idx": torch.randint(0, bases, (batch,), generator=g).to(device),
        "hall_idx": torch.randint(0, Hn, (batch,), generator=g).to(device),
    }


_PARAM_NAMES = ("bases", "enc_weight", "enc_bias", "scale", "shift", "dec_weight", "dec_bias")


def fused_step(problem, leaves: List[torch.Tensor], aug, grad_out, backend: str):
    out = _ops().generate_augment(*leaves, problem["base_idx"], problem["hall_idx"], aug, backend=backend)
    return torch.autograd.grad(out, leaves, grad_out)


def _module_params(mods) -> List[torch.Tensor]:
    """Hallucinator parameters grouped like the stacked layout: all enc weights, all enc biases, ..."""
    return (
        [m.enc.weight for m in mods]
        + [m.enc.bias for m in mods]
        + [m.scale for m in mods]
        + [m.shift for m in mods]
        + [m.dec.weight for m in mods]
        + [m.dec.bias for m in mods]
    )


def reference_step(bases, mods, problem, aug, grad_out):
    x = reference_generate(bases, mods, problem["base_idx"], problem["hall_idx"])
    out = REFERENCE_DSA[aug.family](x, aug)
    return torch.autograd.grad(out, [bases, *_module_params(mods)], grad_out, allow_unused=True, materialize_grads=True)


def _stack_reference_grads(grads, Hn: int) -> List[torch.Tensor]:
    out = [grads[0]]
    for i in range(6):
        out.append(
            torch.stack([g.reshape(g.shape[1:]) if i in (2, 3) else g for g in grads[1 + i * Hn : 1 + (i + 1) * Hn]])
        )
    return out


def _ops():
    from haba_fast import ops

    return ops


def run_benchmark(args) -> Dict:
    from haba_fast.augment import sample
    from haba_fast.backend import BackendUnavailableError, select_backend
    from haba_fast.timing import environment, measure

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cb = args.base_channels or args.channels
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    for f in families:
        if f not in FAMILIES:
            raise ValueError(f"--families: unknown family {f!r}: choose from {', '.join(FAMILIES)}")
    if args.batch < 1 or args.size < args.k:
        raise ValueError("--batch must be >= 1 and --size >= --k")
    problem = make_problem(
        args.batch, args.size, args.channels, cb, args.k, args.hallucinators, args.bases, device, dtype, args.seed
    )
    try:
        backend = select_backend(
            "generate_augment", device, None if args.backend == "auto" else args.backend, cpu_op="generate_augment"
        )
    except BackendUnavailableError as exc:  # the CLI prints ValueErrors as one-line errors
        raise ValueError(f"--backend {args.backend} --device {args.device}: {exc}") from exc
    leaves = [problem[k].clone().requires_grad_(True) for k in _PARAM_NAMES]
    ref_bases = problem["bases"].clone().requires_grad_(True)
    mods = reference_modules(problem)
    gen = torch.Generator().manual_seed(args.seed + 1)
    rows = {}
    for fam in families:
        aug = sample(fam, args.batch, (args.size, args.size), generator=gen).to(device)
        grad_out = torch.randn((args.batch, args.channels, args.size, args.size), generator=gen).to(device, dtype)
        row = {}
        t = measure(
            lambda aug=aug, grad_out=grad_out: fused_step(problem, leaves, aug, grad_out, backend),
            warmup=args.warmup,
            repeats=args.repeats,
            device=device,
        )
        row["fwd_bwd_s"] = t.median
        row["fwd_bwd_min_s"] = t.min
        if not args.no_reference:
            ours = fused_step(problem, leaves, aug, grad_out, backend)
            ref = _stack_reference_grads(reference_step(ref_bases, mods, problem, aug, grad_out), args.hallucinators)
            err = max(float((a - b).abs().max() / (b.abs().max() + 1e-12)) for a, b in zip(ours, ref))
            r = measure(
                lambda aug=aug, grad_out=grad_out: reference_step(ref_bases, mods, problem, aug, grad_out),
                warmup=args.warmup,
                repeats=args.repeats,
                device=device,
            )
            row.update(reference_s=r.median, reference_min_s=r.min, speedup=r.median / t.median, max_rel_grad_err=err)
        rows[fam] = row
    result = {
        "benchmark": "genaug",
        "backend": backend,
        "device": str(device),
        "dtype": args.dtype,
        "batch": args.batch,
        "size": args.size,
        "channels": args.channels,
        "base_channels": cb,
        "k": args.k,
        "hallucinators": args.hallucinators,
        "bases": args.bases,
        "repeats": args.repeats,
        "families": rows,
        "mean_fwd_bwd_s": sum(r["fwd_bwd_s"] for r in rows.values()) / len(rows),
    }
    if not args.no_reference:
        result["mean_reference_s"] = sum(r["reference_s"] for r in rows.values()) / len(rows)
        result["speedup_mean"] = result["mean_reference_s"] / result["mean_fwd_bwd_s"]
    result["env"] = environment(device)
    return result


def run(args) -> int:
    print(json.dumps(run_benchmark(args)), flush=True)
    return 0


# ---- results document ---------------------------------------------------------------------------------------
_NOTES = """\
What is timed: one training-style step — generate a batch with one hallucinator drawn per sample (5
hallucinators, 100 bases), augment it with per-sample parameters of one DSA family, and backpropagate to
the bases and every hallucinator parameter. `fused` is `haba_fast.ops.generate_augment` on the named
backend; `reference` is the research-code path (an `nn.Module` per hallucinator + the composed
`DiffAugment` ops, with per-sample Python loops building the scale/rotate matrices), measured in the same
process right after the fused op with the same parameters (its gradients agree: `max_rel_grad_err`).
Times are medians in seconds (`haba_fast.timing.measure`); `speedup` = reference / fused.

Where the time of the reference goes (torch 2.13 CPU profile, batch 500): `ConvTranspose2d` forward and
backward take the slow non-mkldnn path on CPU and dominate (~65%), then index_put/index/cat for the
per-hallucinator grouping. The fused CPU op runs one pass per sample (`at::parallel_for`), computes
everything in L1-sized rows (the intermediate maps keep the image's row stride so every tap is one
contiguous SIMD loop), uses AVX2+FMA kernels chosen at run time (setup.py builds without -march), and
reduces the gradients of shared tensors in two stages (per-sample rows, then per-segment sums) without
atomics.

Losses / caveats: at batch 1 there is little to fuse; the fixed per-call cost (input validation,
parameter encoding, custom-op and autograd dispatch, ~0.5-1 ms) decides, and on a busy shared VM these
millisecond medians are mostly scheduler noise (compare color and rotate at batch 1). The committed rows
were taken on the 2-core dev VM while ~7 other engineers' jobs ran (load average 4-6): rerun
`bench/run_genaug.sh` on a quiet machine for publishable absolute times; the same-run ratios are what
these rows support. The Triton backend was only checked under TRITON_INTERPRET=1 in
this session (no GPU): GPU rows appear here after `DEVICE=cuda bench/run_genaug.sh` on a CUDA machine.
"""


def report(path: str) -> str:
    """GENAUG.md text from a genaug.json written by bench/run_genaug.sh (one JSON line per configuration)."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    out = [
        "# generate + augment: fused op vs the research-code path",
        "",
        (
            "Regenerate with `bench/run_genaug.sh` (CPU) or `DEVICE=cuda bench/run_genaug.sh` (GPU); raw rows in "
            f"`{path}`."
        ),
        "",
        _NOTES,
    ]
    for r in rows:
        env = r.get("env", {})
        cfg = (
            f"backend `{r['backend']}` on {r['device']} ({env.get('gpu') or env.get('cpu')}, {env.get('cpus')} "
            f"cpus, {env.get('torch_threads')} threads), batch {r['batch']}, {r['channels']}x{r['size']}x{r['size']}, "
            f"k={r['k']}, {r['hallucinators']} hallucinators, {r['dtype']}; torch {env.get('torch')}, commit "
            f"{env.get('commit')}"
        )
        cmd = (
            f"haba-fast bench genaug --backend {r['backend']} --device {r['device']} --batch {r['batch']} "
            f"--size {r['size']} --channels {r['channels']} --k {r['k']} --json"
        )
        out += [
            f"## {cfg}",
            "",
            f"`{cmd}`",
            "",
            "| family | fused fwd+bwd (s) | reference (s) | speedup |",
            "|---|---|---|---|",
        ]
        for fam, v in r["families"].items():
            ref = v.get("reference_s")
            out.append(
                f"| {fam} | {v['fwd_bwd_s']:.4f} | {ref:.4f} | {v['speedup']:.1f}x |"
                if ref is not None
                else f"| {fam} | {v['fwd_bwd_s']:.4f} | - | - |"
            )
        if "speedup_mean" in r:
            out.append(
                f"| **mean** | **{r['mean_fwd_bwd_s']:.4f}** | **{r['mean_reference_s']:.4f}** | "
                f"**{r['speedup_mean']:.1f}x** |"
            )
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":  # python -m haba_fast.benchmarks.genaug report bench/results/genaug.json
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "report":
        print(report(sys.argv[2]))
    else:
        print("usage: python -m haba_fast.benchmarks.genaug report RESULTS.json", file=sys.stderr)
        sys.exit(2)
