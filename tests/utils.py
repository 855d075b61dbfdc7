"""Devices, markers and tolerances shared by the tests (the one place that decides what runs where)."""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()

requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def devices():
    """Devices the tests run on: always CPU, plus CUDA when present."""
    return ["cpu"] + (["cuda"] if CUDA else [])


def extension_loaded() -> bool:
    from haba_fast._ext import extension_available

    return extension_available()


requires_ext = pytest.mark.skipif(
    os.environ.get("HABA_FAST_BUILD_EXT") == "0", reason="built without the C++ extension (HABA_FAST_BUILD_EXT=0)"
)

# Per-dtype tolerances against the float64 / reference result: (rtol, atol).
TOL = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual, expected, dtype=None, **kw):
    dtype = dtype or expected.dtype
    rtol, atol = TOL.get(dtype, (1e-4, 1e-5))
    kw.setdefault("rtol", rtol)
    kw.setdefault("atol", atol)
    torch.testing.assert_close(actual, expected, **kw)


def load_bench_script(name: str):
    """The module of ``bench/<name>.py`` (bench/ is not a package), freshly executed."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), os.pardir, "bench", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
