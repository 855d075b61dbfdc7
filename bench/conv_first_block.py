"""Which CPU kernel the exact engine's first-block convolution gradients should use: oneDNN or im2col + GEMM.

    python bench/conv_first_block.py [--threads 1] [--repeats 5] [--json bench/results/conv_first_block.json]

The C++ engine's backward step computes, per block, the input gradient of [gz | gz_dot] through [W_dot; W] (2C
output channels of the conv, so 2C input channels of its transpose) and weight gradients. For the first block the
conv's input is the image: 1 or 3 channels. ``at::convolution_backward`` sends float32 CPU tensors to oneDNN, which
is slow when the gradient it writes has so few channels; ``at::_slow_conv2d_backward`` (per sample: a GEMM into
the im2col columns, then col2im) is not. Per shape: the median seconds of the input gradient and of the weight +
bias gradient by each kernel, with the engine's buffer cache held as in a sweep (outputs reuse their blocks, no page
faults; ``timing.measure``), and each result's relative error against float64. ``csrc/trajectory.cpp`` (``conv_bwd``,
``kGemmConvMaxInChannels`` = 16) takes im2col + GEMM up to 16 input channels, from these rows.
"""

from __future__ import annotations

import argparse
import json
import warnings

# (batch, input channels, gradient channels = 2 x width for the input gradient, input size, padding): ConvNet-128's
# first block on CIFAR (3 x 32 x 32, padding 1) and on (Fashion-)MNIST (1 x 28 x 28, padding 3: the reference's
# ConvNet pads one-channel inputs by 3), the latter also at padding 1, then more input channels.
SHAPES = [
    (100, 1, 256, 28, 3),
    (100, 1, 256, 28, 1),
    (100, 3, 256, 32, 1),
    (500, 3, 256, 32, 1),
    (100, 8, 256, 32, 1),
    (100, 16, 256, 32, 1),
    (100, 32, 256, 32, 1),
    (100, 64, 256, 16, 1),
    (100, 128, 256, 16, 1),
]


def _kernels(torch, gy, x, w, pad, mask):
    def onednn():
        return torch.ops.aten.convolution_backward(
            gy, x, w, [w.shape[0]], [1, 1], [pad, pad], [1, 1], False, [0, 0], 1, mask
        )

    def gemm():
        return torch.ops.aten._slow_conv2d_backward.output_mask(gy, x, w, [3, 3], [1, 1], [pad, pad], mask)

    return {"onednn": onednn, "im2col_gemm": gemm}


def measure(threads: int, repeats: int) -> list[dict]:
    import torch

    from haba_fast import timing
    from haba_fast._ext import BufferCacheRun, buffer_cache_scope, extension_available, extension_error

    if not extension_available():
        raise SystemExit(f"the C++ extension is not loaded: {extension_error()}")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    rows = []
    gen = torch.Generator().manual_seed(0)
    for batch, cin, cout, size, pad in SHAPES:
        out_size = size + 2 * pad - 2
        gy = torch.randn(batch, cout, out_size, out_size, generator=gen)
        x = torch.randn(batch, cin, size, size, generator=gen)
        w = torch.randn(cout, cin, 3, 3, generator=gen) / (cin * 9) ** 0.5
        row = {
            "batch": batch,
            "in_channels": cin,
            "grad_channels": cout,
            "size": size,
            "padding": pad,
            "threads": threads,
        }
        for part, mask in (("input_grad", [True, False, False]), ("weight_grad", [False, True, True])):
            ref = torch.ops.aten.convolution_backward(
                gy.double(), x.double(), w.double(), [cout], [1, 1], [pad, pad], [1, 1], False, [0, 0], 1, mask
            )
            ref_t = ref[0] if mask[0] else ref[1]
            for name, fn in _kernels(torch, gy, x, w, pad, mask).items():

                def call(fn=fn):  # as in an engine sweep: outputs take their blocks from the held cache
                    with buffer_cache_scope():
                        fn()

                with BufferCacheRun(True):  # warm-up: the first call builds oneDNN's kernel and fills the cache
                    t = timing.measure(call, warmup=1, repeats=repeats)
                out = fn()
                got = (out[0] if mask[0] else out[1]).double()
                row[f"{part}_{name}_s"] = t.median
                row[f"{part}_{name}_rel_err"] = float((got - ref_t).norm() / ref_t.norm())
            row[f"{part}_gemm_over_onednn"] = row[f"{part}_im2col_gemm_s"] / row[f"{part}_onednn_s"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default="bench/results/conv_first_block.json")
    args = ap.parse_args()
    if min(args.threads, args.repeats) < 1:
        raise SystemExit("--threads and --repeats must be >= 1")
    from haba_fast.timing import write_bench_json

    rows = measure(args.threads, args.repeats)
    command = f"python bench/conv_first_block.py --threads {args.threads} --repeats {args.repeats} --json {args.json}"
    write_bench_json(args.json, command, rows=rows)
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
