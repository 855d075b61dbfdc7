"""CUDA-graph replay of the engine's per-step ops (``AdjointEngine(cuda_graphs=True)``, ``--cuda-graphs``).

Why: at small batches on a GPU the exact engine is bound by the host, not the device. One step op launches 60 to
230 ATen ops and kernels, and the host pays tens of microseconds for each; on an H200 at bpc 10 / batch 100 the
GPU sat idle for most of an iteration (docs/RESULTS.md). A CUDA graph records one call's kernels once, and each
later call replays them all with one launch.

How: every distinct call (op, the shapes, dtypes and device of its tensors, the spec, ``want_hw``, the block
implementation of ``$HABA_FAST_TRAJECTORY_FUSED`` and the TF32 switches) runs eagerly the first time, so cuDNN
and the Triton kernels initialise and compile outside a capture. The second time, its tensors are copied into
static inputs; the call runs once more on a side stream (torch's warm-up rule), is captured into a graph with its
own memory pool, and is replayed. From then on each call copies its tensors into the static inputs, replays, and
returns copies of the static outputs, which the next replay overwrites.

What it costs and what it gives up:

* The graphs run the ops without their value checks (a value check reads a flag back from the device, which a
  capture forbids). The engine checks a stored X and its labels, ``w_start``, ``w_target`` and ``lr`` once per
  call; a weight vector that turns non-finite during the unroll makes the loss non-finite, as with
  ``values_checked``.
* Memory outside the budget's count: each captured call's working set (its pool), its static inputs and outputs,
  and the copies it returns. A kept step's tensors are copied out of the keep graph and into the adjoint graph,
  so two steps' worth of them is held beside the budget's kept steps.
* A failed capture is a RuntimeError that names the op and the cause. Nothing falls back silently.

``capture_by_rerun`` gives the same static-buffer contract on any device (its replay reruns the call and writes
the results into the static outputs); the tests use it to check the bookkeeping on a CPU.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from torch import Tensor

from haba_fast.ops import BLOCK_KERNELS_ENV

__all__ = ["StepGraphs", "capture_by_rerun", "capture_cuda_graph"]

StepFn = Callable[..., Sequence[Tensor]]
Capture = Callable[[StepFn, list[Tensor]], tuple[Callable[[], None], list[Tensor]]]


def capture_cuda_graph(fn: StepFn, static_inputs: list[Tensor]) -> tuple[Callable[[], None], list[Tensor]]:
    """Capture ``fn(*static_inputs)`` into a CUDA graph with its own memory pool, after one warm-up run on a side
    stream; both streams are the inputs' device's. Returns (replay, static outputs). Recording runs no kernel: the
    outputs hold values after a replay."""
    device = static_inputs[0].device
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=torch.cuda.Stream()):
            outputs = list(fn(*static_inputs))
    return graph.replay, outputs


def capture_by_rerun(fn: StepFn, static_inputs: list[Tensor]) -> tuple[Callable[[], None], list[Tensor]]:
    """The CUDA graph's contract on any device: the static outputs are fixed tensors, and each replay reruns
    ``fn`` on the static inputs and writes the results into them."""
    outputs = [torch.empty_like(t) for t in fn(*static_inputs)]

    def replay() -> None:
        for out, value in zip(outputs, fn(*static_inputs)):
            out.copy_(value)

    return replay, outputs


def _math_mode() -> tuple:
    """The switches that choose which kernels a call runs (a graph replays the ones it captured): cuDNN on,
    benchmark, deterministic; deterministic algorithms; float32 precision of convolutions and matmuls (TF32 or
    not, from torch's per-op settings: the legacy ``allow_tf32`` flags raise on reading once those were set);
    CUDA autocast."""
    cudnn = torch.backends.cudnn
    return (
        cudnn.enabled,
        cudnn.benchmark,
        cudnn.deterministic,
        torch.are_deterministic_algorithms_enabled(),
        cudnn.conv.fp32_precision,
        torch.backends.cuda.matmul.fp32_precision,
        torch.is_autocast_enabled("cuda"),
    )


class _Graph:
    """One captured call: its static inputs, the replay, its static outputs, and the CUDA stream of its last replay
    (None on other devices)."""

    def __init__(self, static_inputs: list[Tensor], replay: Callable[[], None], outputs: list[Tensor]):
        self.static_inputs, self.replay, self.outputs = static_inputs, replay, outputs
        self.stream = None


class StepGraphs:
    """The captured calls of one engine (its graphs outlive a call: a run's iterations replay them).

    Args:
        capture: how a call is captured (:func:`capture_cuda_graph`; :func:`capture_by_rerun` for tests).
        device_type: the device type the capture works on (``cuda``), or None for any.

    Attributes:
        captures: calls captured so far; replays: replays so far (both since the engine was made).
    """

    def __init__(self, capture: Capture = capture_cuda_graph, device_type: str | None = "cuda"):
        self._capture = capture
        self.device_type = device_type
        self._graphs: dict[tuple, _Graph | None] = {}  # None: seen once, ran eagerly
        self.captures = 0
        self.replays = 0

    @staticmethod
    def _after_last_replay(graph: _Graph) -> None:
        """On CUDA: order this call after the graph's last replay when that ran on another stream (its static
        buffers are about to be overwritten), and remember this call's stream."""
        device = graph.static_inputs[0].device
        if device.type != "cuda":
            return
        current = torch.cuda.current_stream(device)
        if graph.stream is not None and graph.stream != current:
            current.wait_stream(graph.stream)
        graph.stream = current

    def check_device(self, device: torch.device) -> None:
        """ValueError unless this capture works on ``device``."""
        if self.device_type is not None and device.type != self.device_type:
            raise ValueError(
                f"cuda_graphs replays the engine's steps as CUDA graphs and needs CUDA tensors, got {device.type} "
                "ones; run without --cuda-graphs (cuda_graphs=False) on this device"
            )

    def run(self, name: str, fn: StepFn, inputs: Sequence[Tensor], options: tuple = ()) -> list[Tensor]:
        """``fn(*inputs)`` (a list of tensors), eagerly the first time, then replayed from its graph.

        Args:
            name: the op, for the key and the error message.
            fn: the call; must read nothing but ``inputs`` (tensors) and Python constants named by ``options``.
            inputs: its tensors; a change of shape, dtype or device is a new call.
            options: the constants ``fn`` depends on (spec, flags): part of the key.

        Returns:
            Fresh tensors (copies of the static outputs, which the next replay overwrites).
        """
        inputs = [t.detach() for t in inputs]
        key = (
            name,
            tuple(options),
            os.environ.get(BLOCK_KERNELS_ENV),  # which block implementation the op runs
            _math_mode(),
            tuple((tuple(t.shape), t.dtype, t.device) for t in inputs),
        )
        if key not in self._graphs:
            self._graphs[key] = None
            return list(fn(*inputs))
        graph = self._graphs[key]
        if graph is None:  # its static inputs are clones of these
            graph = self._graphs[key] = self._captured(name, fn, inputs)
            self._after_last_replay(graph)
        else:
            self._after_last_replay(graph)
            for static, t in zip(graph.static_inputs, inputs):
                static.copy_(t)
        graph.replay()
        self.replays += 1
        return [t.clone() for t in graph.outputs]

    def _captured(self, name: str, fn: StepFn, inputs: list[Tensor]) -> _Graph:
        """``fn`` captured on clones of ``inputs``; a failure is a RuntimeError naming the op and the cause."""
        static_inputs = [t.clone() for t in inputs]
        try:
            replay, outputs = self._capture(fn, static_inputs)
        except Exception as exc:
            # an error inside the capture surfaces as the capture's own failure: name the first cause too
            causes = [exc] + ([exc.__context__] if exc.__context__ is not None else [])
            said = "; ".join(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}" for e in reversed(causes))
            raise RuntimeError(
                f"cuda_graphs: capturing {name} as a CUDA graph failed ({said}); run without --cuda-graphs"
            ) from exc
        self.captures += 1
        return _Graph(static_inputs, replay, outputs)
