"""The one timing helper used by every benchmark (bench/, ``haba-fast bench``).

Warm-up runs, then repeats; reports the median. CUDA work is synchronized around each repeat
(``triton.testing.do_bench`` style). Results carry the machine, versions and commit so a committed
row says where it came from.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from haba_fast.io import PathLike, atomic_write_text


@dataclass
class Timing:
    """Seconds per call: ``median``, ``min``, ``mean`` over ``repeats`` timed calls; ``warmup_times``: the untimed
    warm-up calls' seconds (the first one includes one-time costs: compiles, autotuning)."""

    median: float
    min: float
    mean: float
    repeats: int
    times: List[float] = field(default_factory=list)
    warmup_times: List[float] = field(default_factory=list)

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _sync(device: Optional[torch.device]) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], Any],
    *,
    warmup: int = 2,
    repeats: int = 5,
    device: Optional[torch.device] = None,
    max_seconds: Optional[float] = None,
    on_call: Optional[Callable[[str, int, float], None]] = None,
) -> Timing:
    """Time ``fn()``: ``warmup`` calls timed apart (``Timing.warmup_times``), then up to ``repeats`` timed calls.

    Stops repeating early once ``max_seconds`` have passed (at least one timed call). ``on_call(kind, i, seconds)``
    hears of each call as it ends (kind ``"warm-up"`` or ``"timed"``): progress for a run that may be cut short.
    """

    def one_call(kind: str, i: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        seconds = time.perf_counter() - t0
        if on_call is not None:
            on_call(kind, i, seconds)
        return seconds

    warmup_times = [one_call("warm-up", i) for i in range(warmup)]
    times: List[float] = []
    start_all = time.perf_counter()
    for i in range(repeats):
        times.append(one_call("timed", i))
        if max_seconds is not None and time.perf_counter() - start_all > max_seconds and len(times) >= 1:
            break
    return Timing(
        median=statistics.median(times),
        min=min(times),
        mean=statistics.fmean(times),
        repeats=len(times),
        times=times,
        warmup_times=warmup_times,
    )


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def minor_faults() -> int:
    """Minor page faults of this process so far (all threads): pages it touched for the first time, or again after
    the kernel took them back."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def git_commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def environment(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """Machine, versions and commit, recorded with every benchmark row."""
    env: Dict[str, Any] = {
        "machine": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": git_commit(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if device is not None and torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


RESERVED_BENCH_KEYS = ("command", "env", "load_average_at_end")


def write_bench_json(path: PathLike, command: str, **results: Any) -> Dict[str, Any]:
    """Write a bench/ script's results to ``path`` atomically (folders made) and return them: ``{"command",
    "env": environment(), "load_average_at_end", **results}`` (the load says how busy the machine was)."""
    clash = sorted(set(results) & set(RESERVED_BENCH_KEYS))
    if clash:
        raise ValueError(f"write_bench_json: {', '.join(clash)} are written by write_bench_json itself")
    out = {"command": command, "env": environment(), "load_average_at_end": os.getloadavg(), **results}
    atomic_write_text(json.dumps(out, indent=1) + "\n", path)
    return out


def _threads(text: str) -> int:
    """argparse type of --threads: a positive integer."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def add_network_timing_arguments(parser) -> None:
    """The flags every per-iteration benchmark shares: the ConvNet's size, the device, threads and repeats."""
    parser.add_argument("--width", type=int, default=128, help="ConvNet width (default 128)")
    parser.add_argument("--depth", type=int, default=3, help="ConvNet depth (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    parser.add_argument(
        "--threads", type=_threads, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed iterations (default 3)")
