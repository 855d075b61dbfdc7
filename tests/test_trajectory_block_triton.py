"""The C++ trajectory op's Triton block kernels (kernels/trajectory_block.py) on this CPU.

- Under TRITON_INTERPRET=1, in ONE subprocess (the flag is read when the kernel module is imported and when the
  extension registers the kernels): the kernels against a plain-PyTorch oracle (``torch.func`` jvp / vjp of
  instance norm -> activation -> pooling: values, gradients and their tangents, the parameter sums), and the C++
  op's four step ops and ``trajectory_match`` with ``HABA_FAST_TRAJECTORY_FUSED=triton`` against its ATen-only path
  (``=0``), with a count of the kernel calls so that a silent fallback fails.
- Without the interpreter: a clear error, not a fallback, when ``=triton`` meets CPU tensors.
(tests/test_triton_compile.py compiles them for a CUDA target.)
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from haba_fast._ext import extension_available

pytest.importorskip("triton")
needs_ext = pytest.mark.skipif(not extension_available(), reason="the C++ extension is not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    r"""
    import json, os, sys
    import torch
    import torch.nn.functional as F
    from haba_fast._ext import extension_available
    assert extension_available()
    import haba_fast.kernels.trajectory_block as kb
    from haba_fast.engines.adjoint import cpp_spec
    from haba_fast.models import ConvNet, ConvNetSpec, flatten_params

    res = {}
    calls = {"forward": 0, "backward": 0}
    _fwd, _bwd = kb.trajectory_block_forward, kb.trajectory_block_backward

    def counted_forward(*a):
        calls["forward"] += 1
        _fwd(*a)

    def counted_backward(*a):
        calls["backward"] += 1
        _bwd(*a)

    kb.trajectory_block_forward, kb.trajectory_block_backward = counted_forward, counted_backward

    def rel(a, b):  # norm-relative, no floor: a small gradient is held to the same relative tolerance
        a, b = a.detach().double(), b.detach().double()
        return float((a - b).norm() / b.norm().clamp_min(1e-300))

    ACTS = {0: F.relu, 1: torch.sigmoid, 2: lambda n: F.leaky_relu(n, 0.01)}

    def oracle_block(z, gam, bet, act, pool, norm):
        n = z
        if norm:
            n = F.instance_norm(z, eps=1e-5) * gam.view(1, -1, 1, 1) + bet.view(1, -1, 1, 1)
        r = ACTS[act](n)
        return F.avg_pool2d(r, 2) if pool else r

    def kernel_case(name, B, C, H, W, act, pool, norm, tan, dtype, strided):
        g = torch.Generator().manual_seed(B * 1000 + H * 10 + W)
        rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
        if strided:  # the channel halves of one [B, 2C, H, W] tensor, as the op's wide convolution makes them
            zz = rnd(B, 2 * C, H, W)
            z, zd = zz[:, :C], zz[:, C:]
        else:
            z, zd = rnd(B, C, H, W), rnd(B, C, H, W)
        gam, bet, gamd, betd = 1 + 0.3 * rnd(C), rnd(C), rnd(C), rnd(C)
        HO, WO = (H // 2, W // 2) if pool else (H, W)
        out, outd = torch.empty(B, C, HO, WO, dtype=dtype), torch.empty(B, C, HO, WO, dtype=dtype)
        xh, xhd = torch.empty(B, C, H, W, dtype=dtype), torch.empty(B, C, H, W, dtype=dtype)
        rstd, k = torch.empty(B, C, dtype=dtype), torch.empty(B, C, dtype=dtype)
        opt = lambda t, on: t if on else None
        kb.trajectory_block_forward(z, opt(zd, tan), opt(gam, norm), opt(bet, norm), opt(gamd, norm and tan),
                         opt(betd, norm and tan), act, pool, out, opt(outd, tan), xh, opt(xhd, tan), rstd, k)
        zero = torch.zeros_like(gam)
        f = lambda z_, g_, b_: oracle_block(z_, g_, b_, act, pool, norm)
        tangents = (zd, gamd if norm else zero, betd if norm else zero)
        ref, refd = torch.func.jvp(f, (z, gam, bet), tangents)
        errs = [rel(out, ref)] + ([rel(outd, refd)] if tan else [])
        ga, gad = rnd(B, C, HO, WO), rnd(B, C, HO, WO)
        gzz = torch.empty(B, 2 * C if tan else C, H, W, dtype=dtype)
        part = torch.empty(4, B, C, dtype=dtype)
        kb.trajectory_block_backward(ga, opt(gad, tan), xh, opt(xhd, tan), rstd, k, opt(gam, norm), opt(bet, norm),
                          opt(gamd, norm and tan), opt(betd, norm and tan), act, pool, gzz, opt(part, norm))

        def vjp(z_, g_, b_, ga_):
            return torch.func.vjp(f, z_, g_, b_)[1](ga_)

        (gz, ggam, gbet), (gzd, ggamd, gbetd) = torch.func.jvp(vjp, (z, gam, bet, ga), (*tangents, gad))
        errs.append(rel(gzz[:, :C], gz))
        if tan:
            errs.append(rel(gzz[:, C:], gzd))
        if norm:
            s = part.sum(1)
            errs += [rel(s[0], ggam), rel(s[1], gbet)] + ([rel(s[2], ggamd), rel(s[3], gbetd)] if tan else [])
        res[name] = max(errs)

    for dtype, tag in ((torch.float64, "f64"), (torch.float32, "f32")):
        kernel_case(f"kernel_relu_avg_{tag}", 2, 3, 8, 8, 0, True, True, True, dtype, True)
        kernel_case(f"kernel_sigmoid_odd_{tag}", 2, 3, 7, 6, 1, True, True, True, dtype, False)
        kernel_case(f"kernel_leaky_nopool_{tag}", 1, 2, 5, 5, 2, False, True, True, dtype, False)
        kernel_case(f"kernel_nonorm_{tag}", 2, 2, 6, 6, 0, True, False, True, dtype, True)
        kernel_case(f"kernel_primal_only_{tag}", 2, 3, 8, 8, 1, True, True, False, dtype, False)
        kernel_case(f"kernel_two_chunks_{tag}", 1, 2, 34, 36, 0, True, True, True, dtype, False)  # a plane > 1024
        # a pooled plane of 33 x 33 > 1024 too (the pooling loop over several blocks), odd, sigmoid
        kernel_case(f"kernel_pooled_chunks_{tag}", 1, 1, 67, 67, 1, True, True, True, dtype, False)

    # The C++ op with HABA_FAST_TRAJECTORY_FUSED=triton against its ATen-only path, kept steps included.
    def step_ops(mode, net, x, y, lam):
        os.environ["HABA_FAST_TRAJECTORY_FUSED"] = mode
        spec, w, o = cpp_spec(net), flatten_params(net).detach(), torch.ops.haba_fast
        out = [o.trajectory_step_grad(w, x, y, spec, False), *o.trajectory_step_adjoint(w, x, y, lam, spec, True)]
        g, kept = o.trajectory_step_grad_keep(w, x, y, spec, False)
        out += [g, *o.trajectory_step_adjoint_kept(w, x, y, lam, list(kept), spec, True)]
        X, Y = torch.stack([x, x.flip(0)]), torch.stack([y, y.flip(0)])
        lr = torch.tensor(0.05, dtype=x.dtype, requires_grad=True)
        Xg = X.clone().requires_grad_(True)
        loss = o.trajectory_match(Xg, Y, w, w + lam, lr, spec, False)
        out += [loss, *torch.autograd.grad(loss, (Xg, lr))]
        return out

    cases = [(3, "instancenorm", "relu", "avgpooling", 16), (2, "instancenorm", "sigmoid", "avgpooling", 14),
             (2, "none", "leakyrelu", "none", 8)]
    for (depth, norm, act, pool, hw), (dtype, tag) in zip(cases, [(torch.float64, "f64"), (torch.float64, "f64"),
                                                                  (torch.float32, "f32")]):
        torch.manual_seed(depth + hw)
        net = ConvNet(ConvNetSpec(3, 5, 8, depth, norm, act, pool, (hw, hw))).to(dtype)
        x, y = torch.randn(4, 3, hw, hw, dtype=dtype), torch.randint(0, 5, (4,))
        lam = 0.1 * torch.randn(sum(p.numel() for p in net.parameters()), dtype=dtype)
        ref = step_ops("0", net, x, y, lam)
        before = dict(calls)
        out = step_ops("triton", net, x, y, lam)
        name = f"op_{norm}_{act}_{pool}_{hw}_{tag}"
        res[name] = max(rel(a, b) for a, b in zip(out, ref))
        res[name + "_kernel_calls"] = min(calls[k] - before[k] for k in calls)
    # The two schemas as registered ops: mutation annotations and the CPU (interpreter) registration
    B, C, H, W = 2, 3, 6, 6
    z, zd = torch.randn(B, C, H, W, dtype=torch.float64), torch.randn(B, C, H, W, dtype=torch.float64)
    prm = [torch.randn(C, dtype=torch.float64) for _ in range(4)]
    outs = [torch.empty(B, C, 3, 3, dtype=torch.float64), torch.empty(B, C, 3, 3, dtype=torch.float64),
            torch.empty(B, C, H, W, dtype=torch.float64), torch.empty(B, C, H, W, dtype=torch.float64),
            torch.empty(B, C, dtype=torch.float64), torch.empty(B, C, dtype=torch.float64)]
    torch.library.opcheck(torch.ops.haba_fast.trajectory_block_forward_kernel.default,
                          (z, zd, *prm, 0, True, *outs), test_utils=("test_schema",))
    ga = torch.randn(B, C, 3, 3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.haba_fast.trajectory_block_backward_kernel.default,
                          (ga, ga.clone(), outs[2], outs[3], outs[4], outs[5], *prm, 0, True,
                           torch.empty(B, 2 * C, H, W, dtype=torch.float64), torch.empty(4, B, C, dtype=torch.float64)),
                          test_utils=("test_schema",))
    res["opcheck_schemas"] = 0.0
    print(json.dumps(res))
    """
)


def _tol(name: str) -> float:
    return 1e-12 if name.endswith("f64") else 2e-5


@pytest.fixture(scope="module")
def interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("HABA_FAST_TRAJECTORY_FUSED", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900, check=False)  # fmt: skip
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


KERNEL_CASES = [
    f"kernel_{c}_{t}"
    for c, t in itertools.product(
        ("relu_avg", "sigmoid_odd", "leaky_nopool", "nonorm", "primal_only", "two_chunks", "pooled_chunks"),
        ("f64", "f32"),
    )
]
OP_CASES = [
    "op_instancenorm_relu_avgpooling_16_f64",
    "op_instancenorm_sigmoid_avgpooling_14_f64",
    "op_none_leakyrelu_none_8_f32",
]


@needs_ext
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_block_kernels_match_the_torch_oracle(interpreted, case):
    assert case in interpreted, f"{case} did not run: {sorted(interpreted)}"
    assert interpreted[case] <= _tol(case), f"{case}: max relative error {interpreted[case]:.3g}"


@needs_ext
def test_the_block_kernel_schemas_declare_their_mutations(interpreted):
    assert "opcheck_schemas" in interpreted  # torch.library.opcheck's test_schema raised nothing


@needs_ext
@pytest.mark.parametrize("case", OP_CASES)
def test_the_cpp_op_with_triton_blocks_matches_its_aten_path(interpreted, case):
    assert interpreted[case] <= _tol(case), f"{case}: max relative error {interpreted[case]:.3g}"
    # every step op above ran through the kernels: 4 step ops + the unroll's 2 steps and their adjoints
    assert interpreted[case + "_kernel_calls"] >= 6


@needs_ext
def test_triton_mode_without_a_kernel_for_the_device_is_a_clear_error():
    code = textwrap.dedent(
        """
        import os, torch
        from haba_fast._ext import extension_available
        assert extension_available()
        from haba_fast.models import ConvNet, ConvNetSpec, flatten_params
        from haba_fast.engines.adjoint import cpp_spec
        net = ConvNet(ConvNetSpec(3, 5, 4, 2, "instancenorm", "relu", "avgpooling", (8, 8)))
        w = flatten_params(net).detach()
        os.environ["HABA_FAST_TRAJECTORY_FUSED"] = "triton"
        try:
            torch.ops.haba_fast.trajectory_step_grad(w, torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), cpp_spec(net))
        except RuntimeError as e:
            print("ERROR:", str(e).splitlines()[0])
        else:
            print("NO ERROR")
        """
    )
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("ERROR:") and "no Triton block kernel for cpu tensors" in line, line
    assert "TRITON_INTERPRET=1" in line


@needs_ext
def test_a_failed_kernel_registration_warns_and_leaves_the_extension_loaded():
    """Through the loader, in a fresh process whose registration fails: a warning, the extension still loads and its
    step ops run, and ``HABA_FAST_TRAJECTORY_FUSED=triton`` says the kernels are missing."""
    code = textwrap.dedent(
        """
        import os, warnings
        import torch
        import haba_fast.ops as ops
        from haba_fast import _ext
        from haba_fast.engines.adjoint import cpp_spec
        from haba_fast.models import ConvNet, ConvNetSpec, flatten_params

        def broken():
            raise RuntimeError("no library API")

        ops.register_trajectory_block_kernels = broken
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = _ext.extension_available()
        print("WARNED:", any("were not registered" in str(w.message) and "no library API" in str(w.message)
                             for w in caught))
        print("LOADED:", loaded)
        net = ConvNet(ConvNetSpec(3, 5, 8, 2, "instancenorm", "relu", "avgpooling", (8, 8)))
        w, x, y = flatten_params(net).detach(), torch.randn(2, 3, 8, 8), torch.randint(0, 5, (2,))
        g = torch.ops.haba_fast.trajectory_step_grad(w, x, y, cpp_spec(net), True)
        print("STEP:", g.shape == w.shape and bool(torch.isfinite(g).all()))
        os.environ["HABA_FAST_TRAJECTORY_FUSED"] = "triton"
        try:
            torch.ops.haba_fast.trajectory_step_grad(w, x, y, cpp_spec(net), True)
            print("TRITON: ran")
        except RuntimeError as exc:
            print("TRITON:", " ".join(str(exc).split())[:300])
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")  # registered, the kernels would run on CPU tensors
    env.pop("HABA_FAST_TRAJECTORY_FUSED", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = dict(line.split(": ", 1) for line in proc.stdout.strip().splitlines() if ": " in line)
    assert said["WARNED"] == "True" and said["LOADED"] == "True" and said["STEP"] == "True", proc.stdout
    assert "no Triton block kernel for cpu tensors" in said["TRITON"], said["TRITON"]


def test_the_launchers_refuse_mis_sized_arguments_before_any_launch():
    """A mis-sized output would be written out of bounds by the kernel: the launchers check every tensor first."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: covered by the interpreter run")
    from haba_fast.kernels import trajectory_block as kb

    B, C, H, W = 2, 3, 6, 6
    z, zd = torch.randn(B, C, H, W), torch.randn(B, C, H, W)
    prm = [torch.randn(C) for _ in range(4)]

    def outs(**over):
        o = dict(out=torch.empty(B, C, 3, 3), outd=torch.empty(B, C, 3, 3), xh=torch.empty(B, C, H, W),
                 xhd=torch.empty(B, C, H, W), rstd=torch.empty(B, C), k=torch.empty(B, C))  # fmt: skip
        o.update(over)
        return list(o.values())

    with pytest.raises(ValueError, match=r"out must be \[2, 3, 3, 3\]"):
        kb.trajectory_block_forward(z, zd, *prm, 0, True, *outs(out=torch.empty(B, C, 6, 6)))
    with pytest.raises(ValueError, match="xhd is required"):
        kb.trajectory_block_forward(z, zd, *prm, 0, True, *outs(xhd=None))
    with pytest.raises(ValueError, match="float64"):
        kb.trajectory_block_forward(z, zd, *prm, 0, True, *outs(rstd=torch.empty(B, C, dtype=torch.float64)))
    with pytest.raises(ValueError, match="unknown activation code 7"):
        kb.trajectory_block_forward(z, zd, *prm, 7, True, *outs())
    with pytest.raises(ValueError, match="gamd given without a tangent"):
        kb.trajectory_block_forward(z, None, *prm, 0, True, *outs(outd=None, xhd=None))
    with pytest.raises(ValueError, match=r"gzz must be \[2, 6, 6, 6\]"):
        kb.trajectory_block_backward(torch.randn(B, C, 3, 3), torch.randn(B, C, 3, 3), *outs()[2:6], *prm, 0, True,
                                     torch.empty(B, C, H, W), torch.empty(4, B, C))  # fmt: skip
