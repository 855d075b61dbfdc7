"""``haba-fast info``: versions, devices, the C++ extension, and the backend each op would use.

CUDA is queried only here, inside ``run`` (never at import). ``--json`` prints one JSON object.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import warnings
from typing import Any

OPS = ("generate", "augment", "generate_augment", "trajectory_match")


def register(sub) -> None:
    parser = sub.add_parser("info", help="versions, devices, extension and backend per op",
                            description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(func=run)


def _version(dist: str) -> str | None:
    # importlib.metadata reads the installed version without importing the (slow) package itself.
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - python < 3.8
        return None
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _backend(op: str, device: str) -> dict[str, Any]:
    """Which backend ``op`` would run with on ``device``, and why each other backend was skipped there."""
    from haba_fast.backend import explain, select_backend

    reasons = {b: r for b, r in explain(op, device).items() if r}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # select_backend warns only once per process: the reasons say why
        try:
            chosen = select_backend(op, device)
        except Exception as exc:  # an explicitly forced backend that cannot run: report, don't crash
            return {"backend": None, "error": f"{type(exc).__name__}: {exc}", "skipped": reasons}
    out: dict[str, Any] = {"backend": chosen, "skipped": reasons}
    natural = "triton" if device == "cuda" else "cpu"
    if chosen == "torch" and natural in reasons:  # a fallback: say why in one line
        out["note"] = f"{natural}: " + "; ".join(reasons[natural])
    return out


def _registered_ops():
    """Names of every op registered under the haba_fast namespace (None when torch cannot list them)."""
    import torch

    try:
        names = torch._C._dispatch_get_all_op_names()  # private, but the only listing; guarded
    except Exception:
        return None
    return sorted({n.split("::", 1)[1].split(".", 1)[0] for n in names if n.startswith("haba_fast::")})


def collect() -> dict[str, Any]:
    """Everything ``info`` reports, as a plain dict."""
    import torch

    import haba_fast
    from haba_fast import _ext

    info: dict[str, Any] = {
        "versions": {
            "haba_fast": haba_fast.__version__,
            "torch": torch.__version__,
            "triton": _version("triton"),
            "numpy": _version("numpy"),
            "python": platform.python_version(),
        },
        "platform": platform.platform(),
        "environment": {k: v for k, v in sorted(os.environ.items())
                        if k.startswith("HABA_FAST_") or k in ("TRITON_INTERPRET", "OMP_NUM_THREADS")},
    }
    cuda_ok = torch.cuda.is_available()
    info["devices"] = {
        "cpu": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "cuda": {
            "available": cuda_ok,
            "count": torch.cuda.device_count() if cuda_ok else 0,
            "names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda_ok else [],
            "cuda_version": torch.version.cuda,
        },
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the load failure is reported below, not as a warning
        loaded = _ext.extension_available()
    ext: dict[str, Any] = {"loaded": loaded}
    if loaded:
        from haba_fast import ops

        listed = _registered_ops()
        ext["ops"] = listed if listed is not None else [op for op in OPS if _ext.has_op(op)]
        # the C++ trajectory op's block math: who runs it (HABA_FAST_TRAJECTORY_FUSED), and where Triton can
        ext["trajectory_blocks"] = {
            "mode": ops.block_kernels_in_use(),
            "triton_kernels_for": ops.trajectory_block_kernel_devices(),
        }
    else:
        ext["error"] = _ext.extension_error()
    info["extension"] = ext
    info["extension_build"] = _ext.build_info()  # what _C was compiled against (see _build_line)
    devices = ["cpu"] + (["cuda"] if cuda_ok else [])
    info["backends"] = {op: {dev: _backend(op, dev) for dev in devices} for op in OPS}
    return info


def _build_line(build: dict[str, Any] | None) -> str:
    """The torch, compiler and flags the C++ extension was compiled against (recorded by setup.py)."""
    if build is None:
        return "  built against: no record (not built, or built before builds were recorded)"
    cuda = f", CUDA {build['cuda']}" if build.get("cuda") else ""
    return f"  built against: torch {build['torch']}{cuda}, {build['compiler']}, flags {build['cxx_flags']}"


def _text(info: dict[str, Any]) -> str:
    lines = ["haba-fast " + info["versions"]["haba_fast"], "", "versions:"]
    for k, v in info["versions"].items():
        lines.append(f"  {k:<10} {v if v is not None else 'not installed'}")
    lines.append(f"platform:   {info['platform']}")
    if info["environment"]:
        lines.append("environment: " + ", ".join(f"{k}={v}" for k, v in info["environment"].items()))
    cpu, cuda = info["devices"]["cpu"], info["devices"]["cuda"]
    lines += ["", "devices:", f"  cpu        {cpu['cores']} cores, torch uses {cpu['torch_threads']} threads"]
    if cuda["available"]:
        names = ", ".join(cuda["names"])
        lines.append(f"  cuda       {cuda['count']} device(s): {names} (CUDA {cuda['cuda_version']})")
    else:
        lines.append("  cuda       not available")
    ext = info["extension"]
    lines += ["", "C++ extension (haba_fast._C):"]
    if ext["loaded"]:
        lines.append(f"  loaded; ops registered: {', '.join(ext['ops']) or 'none yet'}")
        blocks = ext.get("trajectory_blocks")
        if blocks:
            where = ", ".join(blocks["triton_kernels_for"]) or "no device (triton not installed)"
            lines.append(
                f"  trajectory blocks: {blocks['mode']} (HABA_FAST_TRAJECTORY_FUSED=triton runs them in Triton "
                f"kernels; registered for: {where})"
            )
    else:
        lines.append(f"  not loaded: {ext['error']}")
    lines.append(_build_line(info.get("extension_build")))
    lines += ["", "backend per op (and why the others were skipped):"]
    for op, per_dev in info["backends"].items():
        for dev, b in per_dev.items():
            chosen = f"unavailable ({b['error']})" if b["backend"] is None else b["backend"]
            lines.append(f"  {op:<18} {dev:<5} {chosen}")
            for name, why in b["skipped"].items():
                lines.append(f"  {'':<18} {'':<5}   not {name}: {'; '.join(why)}")
    return "\n".join(lines)


def run(args) -> int:
    info = collect()
    if getattr(args, "json", False):
        print(json.dumps(info, indent=2, sort_keys=False))
    else:
        print(_text(info))
    sys.stdout.flush()
    return 0
