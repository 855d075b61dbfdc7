"""``import haba_fast as hf``: cheap (no torch, no CUDA query), with the public API loaded on first use."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
from utils import assert_close


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_is_cheap_and_never_queries_cuda():
    heavy = "('torch', 'haba_fast._C', 'triton')"
    assert _run(f"import sys, haba_fast; print(sorted(m for m in {heavy} if m in sys.modules))") == "[]"
    code = """
        import torch
        def boom(*a, **k):
            raise AssertionError("CUDA queried")
        torch.cuda.is_available = torch.cuda.device_count = torch.cuda.init = boom
        import haba_fast as hf
        for name in hf.__all__:
            getattr(hf, name)
        print("ok")
    """
    assert _run(code) == "ok"


def test_public_api_resolves_lazily():
    import haba_fast as hf
    from haba_fast import augment as augment_module
    from haba_fast import distill as distill_module
    from haba_fast import factorization, ops

    assert hf.HaBa is factorization.HaBa and hf.generate is ops.generate
    assert hf.augment is augment_module and hf.distill is distill_module  # still the submodules
    assert callable(hf.distill) and hf.DistillConfig is distill_module.DistillConfig
    x = torch.randn(3, 2, 6, 7, dtype=torch.float64)
    p = hf.augment.sample("rotate", 3, (6, 7), generator=torch.Generator().manual_seed(0))
    assert_close(hf.augment(x, p), ops.augment(x, p))
    assert_close(hf.augment(x, p, backend="torch"), ops.augment(x, p))
    assert set(hf.__all__) <= set(dir(hf))
    try:
        hf.no_such_name
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("unknown attribute did not raise")


def test_distill_module_is_callable_whoever_imports_it_first():
    code = """
        import haba_fast.distill as d       # imported directly, before the package attribute is touched
        import haba_fast as hf
        print(callable(d), hf.distill is d, d.distill.__name__)
    """
    assert _run(code) == "True True distill"
