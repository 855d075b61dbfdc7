"""Packaging: the torch ABI record and check, the refusal of isolated builds, and (slow) sdist/wheel installs.

The slow test builds the sdist and a wheel from it (``python -m build --no-isolation``: one compile of csrc/),
checks what each carries, installs the wheel into a fresh virtual environment that sees this interpreter's
torch, and runs ``haba-fast info`` plus a compiled generate and engine call there; then it fakes an extension
built against another torch version and checks the clear refusal, and checks that an isolated
``pip install`` of the sdist stops with the message saying what to run (and that the pure-Python install it
offers works).
Run it with ``pytest -m packaging tests/test_packaging.py`` (a few minutes: the compile dominates).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

from haba_fast import _ext

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------------
# Fast: the ABI check and the build refusal, in this process / one short subprocess.


@pytest.mark.parametrize(
    "built,running,ok",
    [
        ("2.13.0+cpu", "2.13.0+cpu", True),
        ("2.13.0+cpu", "2.13.0+cu128", True),  # same libtorch CPU ABI; only the local label differs
        ("2.13.0", "2.13.0+cpu", True),
        (None, "2.13.0", True),  # no record (an older in-place build): loaded as before
        ("2.12.0+cpu", "2.13.0+cpu", False),
        ("2.13.0.dev20260101", "2.13.0", False),
    ],
)
def test_abi_mismatch(built, running, ok):
    why = _ext.abi_mismatch(built, running)
    if ok:
        assert why is None
    else:
        assert built in why and running in why and "--no-build-isolation" in why


def test_mismatched_record_is_refused_with_the_rebuild_command(monkeypatch):
    import types

    import torch

    import haba_fast

    fake = types.ModuleType("haba_fast._build_info")
    fake.TORCH_VERSION = "1.0.0"
    monkeypatch.setitem(sys.modules, "haba_fast._build_info", fake)
    monkeypatch.setattr(haba_fast, "_build_info", fake, raising=False)  # `from haba_fast import _build_info`
    monkeypatch.setattr(_ext, "_load_error", None)
    _ext.extension_available.cache_clear()
    try:
        assert _ext.build_info()["torch"] == "1.0.0"
        with pytest.warns(RuntimeWarning, match="built against torch 1.0.0"):
            assert _ext.extension_available() is False
        err = _ext.extension_error()
        assert f"torch {torch.__version__} is running" in err and "pip install --no-build-isolation" in err
        assert not _ext.has_op("generate")
    finally:
        _ext.extension_available.cache_clear()  # the next caller re-checks with the real record


# Standard-library names whose members libstdc++ 13+ marks always_inline (std::allocator's constructor and
# destructor), or that build on them.
_ALLOCATING_STD = re.compile(
    r"std::(vector|basic_string|string|deque|list|map|unordered_map|set|unordered_set|function|unique_ptr|"
    r"shared_ptr|make_unique|make_shared|allocator)\b"
)


def _arch_target_includes(source: Path) -> set[str]:
    """Local headers that ``source`` includes under a ``#pragma GCC target("arch=...")``."""
    out, active = set(), False
    for line in source.read_text().splitlines():
        s = line.strip()
        if s.startswith("#pragma GCC target(") and "arch=" in s:
            active = True
        elif s.startswith("#pragma GCC pop_options"):
            active = False
        elif active and s.startswith('#include "'):
            out.add(s.split('"')[1])
    return out


def test_arch_target_copies_construct_no_std_containers():
    """A header compiled under ``#pragma GCC target("arch=skylake-avx512")`` (the AVX-512 copy of the fused loops,
    csrc/trajectory.cpp) must not construct standard containers: GCC refuses to inline an always_inline member
    defined for the default target there, a hard error ("inlining failed in call to 'always_inline' ... target
    specific option mismatch"), and libstdc++ 13 marks std::allocator's constructor and destructor so. With
    std::vector scratch arrays the build failed on a GPU machine's g++ 13.3 (2026-12-04) while g++ 12 built it; the
    loops use traj_types::Scratch instead. Reproduced here with g++ 12 against libstdc++-13-dev's headers."""
    headers = set()
    for source in (ROOT / "csrc").glob("*.cpp"):
        headers |= _arch_target_includes(source)
    assert "trajectory_kernels.h" in headers  # the check looks where the AVX-512 copy is compiled
    todo = list(headers)
    while todo:  # and at the local headers they include
        for line in (ROOT / "csrc" / todo.pop()).read_text().splitlines():
            name = line.strip().split('"')[1] if line.strip().startswith('#include "') else None
            if name and name not in headers:
                headers.add(name)
                todo.append(name)
    assert "trajectory_types.h" in headers
    for name in sorted(headers):
        text = re.sub(r"//[^\n]*", "", (ROOT / "csrc" / name).read_text())  # comments may name them
        found = sorted(set(m.group(0) for m in _ALLOCATING_STD.finditer(text)))
        assert not found, f"csrc/{name} is compiled under an arch= target and uses {found}: use traj_types::Scratch"


@pytest.mark.skipif(not shutil.which("g++"), reason="needs g++")
@pytest.mark.parametrize("copies", [True, False])
def test_isa_copies_switch(tmp_path, copies):
    """``HABA_FAST_ISA_COPIES=0`` (setup.py) defines HABA_FAST_NO_ISA_COPIES: csrc/cpu_isa.h then declares no
    per-ISA copies and picks the baseline loops whatever the CPU; without it, x86 GCC builds get the copies."""
    (tmp_path / "probe.cpp").write_text(
        textwrap.dedent(
            """
            #include <cstdio>
            #include "cpu_isa.h"
            int main() {
            #ifdef HABA_FAST_HAVE_ISA_COPIES
              std::printf("copies %d\\n", static_cast<int>(haba_fast::kernel_isa()));
            #else
              std::printf("baseline-only %d\\n", static_cast<int>(haba_fast::kernel_isa()));
            #endif
            }
            """
        )
    )
    flags = [] if copies else ["-DHABA_FAST_NO_ISA_COPIES"]
    subprocess.run(
        ["g++", "-std=c++17", *flags, f"-I{ROOT / 'csrc'}", "probe.cpp", "-o", "probe"], cwd=tmp_path, check=True
    )
    out = subprocess.run([str(tmp_path / "probe")], capture_output=True, text=True, check=True).stdout.split()
    if copies:
        assert out[0] == "copies" or not re.match(r"x86_64|i.86", os.uname().machine)
    else:
        assert out == ["baseline-only", "0"]
    setup_text = (ROOT / "setup.py").read_text()
    assert 'os.environ.get("HABA_FAST_ISA_COPIES", "1") == "0"' in setup_text
    assert '"-DHABA_FAST_NO_ISA_COPIES"' in setup_text


def test_setup_py_without_torch_says_what_to_run(tmp_path):
    # An isolated build cannot import torch; setup.py must stop with the command to run, not build a wheel
    # without the extension or against some other torch.
    code = textwrap.dedent(
        f"""
        import os, runpy, sys
        sys.modules["torch"] = None  # torch not importable, as in an isolated build environment
        os.chdir({str(ROOT)!r})
        sys.argv = ["setup.py", "build_ext"]
        runpy.run_path("setup.py", run_name="__main__")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "HABA_FAST_BUILD_EXT"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode != 0
    assert "pip install --no-build-isolation ." in res.stderr
    assert "HABA_FAST_BUILD_EXT=0" in res.stderr


def test_info_prints_the_build_record(monkeypatch, capsys):
    from haba_fast.commands import info

    record = {"torch": "2.13.0+cpu", "cuda": None, "compiler": "c++ 12.2", "cxx_flags": "-O3 -fopenmp"}
    monkeypatch.setattr(_ext, "build_info", lambda: record)
    info.run(type("Args", (), {"json": False})())
    assert "built against: torch 2.13.0+cpu, c++ 12.2, flags -O3 -fopenmp" in capsys.readouterr().out
    monkeypatch.setattr(_ext, "build_info", lambda: None)
    info.run(type("Args", (), {"json": False})())
    assert "built against: no record" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------------
# Slow: real builds and installs.

SMOKE = textwrap.dedent(
    """
    import sys, warnings
    import torch
    import haba_fast
    from haba_fast import _ext, ops
    from haba_fast._reference import generate_reference
    from haba_fast.engines import NaiveEngine, get_adjoint_engine
    from haba_fast.models import ConvNetSpec, build_convnet, flatten_params

    assert haba_fast.__file__.startswith(sys.prefix), haba_fast.__file__  # the installed copy, not the source tree
    assert _ext.extension_available(), _ext.extension_error()
    g = torch.Generator().manual_seed(0)
    M, cb, H, W, Hn, C, k = 4, 2, 7, 7, 2, 3, 2
    Ho, Wo = H - k + 1, W - k + 1
    args = [torch.randn(M, cb, H, W, generator=g), torch.randn(Hn, C, cb, k, k, generator=g),
            torch.randn(Hn, C, generator=g), torch.randn(Hn, C, Ho, Wo, generator=g),
            torch.randn(Hn, C, Ho, Wo, generator=g), torch.randn(Hn, C, C, k, k, generator=g),
            torch.randn(Hn, C, generator=g), torch.tensor([0, 3, 1]), torch.tensor([1, 0, 1])]
    out = ops.generate(*args, backend="cpu")  # raises unless the compiled op runs
    torch.testing.assert_close(out, generate_reference(*args), rtol=1e-4, atol=1e-5)

    net = build_convnet(ConvNetSpec(1, 3, 4, 1, "instancenorm", "relu", "avgpooling", (8, 8)),
                        torch.Generator().manual_seed(0), dtype=torch.float64)
    w0 = flatten_params(net).double()
    wt = w0 + 0.1 * torch.randn(w0.shape, generator=g, dtype=torch.float64)
    X = torch.randn(2, 3, 1, 8, 8, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 3, (2, 3), generator=g)
    lr = torch.tensor(0.05, dtype=torch.float64)
    exact = get_adjoint_engine("exact", backend="cpu")  # raises unless the compiled engine runs
    torch.testing.assert_close(exact(net, X, Y, w0, wt, lr), NaiveEngine()(net, X, Y, w0, wt, lr))
    assert exact.last_backend == "cpu"
    print("SMOKE OK", _ext.build_info()["torch"])
    """
)


def _clean_env(**extra) -> dict:
    # No PYTHONPATH (the source tree must not shadow the installed package) and no build-switch leakage.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HABA_FAST_BUILD_EXT", "VIRTUAL_ENV")}
    env.update(extra)
    return env


def _run(cmd, cwd, timeout=900, check=True, **env) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=_clean_env(**env), capture_output=True, text=True, timeout=timeout
    )
    if check and res.returncode != 0:
        shown = " ".join(map(str, cmd))
        raise AssertionError(f"{shown} failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res


def _fresh_venv_with_this_torch(path: Path) -> Path:
    """A new virtual environment (with pip) whose sys.path also reaches this interpreter's torch.

    A ``.pth`` path line adds torch's site-packages directory after the venv's own, without running that
    directory's own ``.pth`` files (so a development install of haba_fast there stays invisible).
    """
    import torch

    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    py = path / "bin" / "python"
    site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], path).stdout.strip()
    torch_site = Path(torch.__file__).resolve().parents[1]
    Path(site, "_torch_from_parent.pth").write_text(f"{torch_site}\n")
    return py


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """(sdist, wheel) built from this tree: the wheel is built from the sdist, so the sdist is complete."""
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT], out, MAX_JOBS="2")
    (sdist,) = out.glob("haba_fast-*.tar.gz")
    (wheel,) = out.glob("haba_fast-*.whl")
    return sdist, wheel


@pytest.mark.slow
@pytest.mark.packaging
def test_sdist_and_wheel_contents(dists):
    sdist, wheel = dists
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for f in ("README.md", "LICENSE", "pyproject.toml", "setup.py", "kernels/generate.py", "tests/conftest.py"):
        assert f in names, f
    headers = {p.name for p in (ROOT / "csrc").glob("*.h")} | {p.name for p in (ROOT / "csrc").glob("*.cpp")}
    assert headers <= {n.split("/", 1)[1] for n in names if n.startswith("csrc/")}
    assert not any(n.endswith(".so") or n.endswith("_build_info.py") for n in names)

    with zipfile.ZipFile(wheel) as zf:
        wnames = zf.namelist()
    assert any(n.startswith("haba_fast/_C.") and n.endswith(".so") for n in wnames)
    assert "haba_fast/_build_info.py" in wnames and "haba_fast/kernels/generate.py" in wnames
    assert not any(n.startswith(("csrc/", "tests/", "kernels/")) or n.endswith((".cpp", ".h")) for n in wnames)


@pytest.mark.slow
@pytest.mark.packaging
def test_wheel_installs_and_runs_compiled(dists, tmp_path):
    _, wheel = dists
    py = _fresh_venv_with_this_torch(tmp_path / "env")
    # --force-reinstall: a development install of haba-fast may be visible through the torch path.
    _run([py, "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", wheel], tmp_path)

    import torch

    info = _run([tmp_path / "env" / "bin" / "haba-fast", "info"], tmp_path).stdout
    assert f"built against: torch {torch.__version__}" in info
    assert "loaded; ops registered:" in info and "trajectory_match" in info
    for op in ("generate", "augment", "generate_augment", "trajectory_match"):  # every op picks the compiled backend
        assert re.search(rf"\n\s*{op}\s+cpu\s+cpu\n", info), info
    so = next((tmp_path / "env").rglob("haba_fast/_C.*.so"))
    smoke = _run([py, "-c", SMOKE], tmp_path)
    assert "SMOKE OK" in smoke.stdout

    # The OpenMP runtime is torch's: the .so calls GOMP but links no libgomp of its own.
    if "OpenMP" in torch.__config__.parallel_info():
        readelf = _run(["readelf", "-d", so], tmp_path, check=False)
        if readelf.returncode == 0:
            assert "libgomp" not in readelf.stdout

    # A mismatch: the same extension recorded as built against another torch is not loaded, and says why.
    record = next((tmp_path / "env").rglob("haba_fast/_build_info.py"))
    record.write_text(record.read_text().replace(f"TORCH_VERSION = {torch.__version__!r}", "TORCH_VERSION = '2.4.0'"))
    info = _run([tmp_path / "env" / "bin" / "haba-fast", "info"], tmp_path).stdout
    assert "not loaded: the extension was built against torch 2.4.0" in info
    assert "pip install --no-build-isolation" in info
    assert "not cpu: the C++ extension is not loaded" in info  # each op says why the compiled backend is not used
    fallback = _run([py, "-W", "error::RuntimeWarning", "-c", "from haba_fast import _ext; _ext.extension_available()"],
                    tmp_path, check=False)
    assert fallback.returncode != 0 and "built against torch 2.4.0" in fallback.stderr


@pytest.mark.slow
@pytest.mark.packaging
def test_isolated_install_of_the_sdist_says_what_to_run(dists, tmp_path):
    sdist, _ = dists
    py = _fresh_venv_with_this_torch(tmp_path / "env")
    res = _run([py, "-m", "pip", "install", "--no-deps", sdist], tmp_path, check=False, timeout=600)
    out = res.stdout + res.stderr
    if "pip install --no-build-isolation ." not in out and "setuptools" in out and "No matching distribution" in out:
        pytest.skip("no package index reachable for the isolated build's setuptools")
    assert res.returncode != 0
    assert "torch is not importable in this build environment" in out
    assert "pip install --no-build-isolation ." in out

    # The pure-Python install the message offers works in isolation, and says it has no extension.
    _run([py, "-m", "pip", "install", "--no-deps", "--force-reinstall", sdist], tmp_path, timeout=600,
         HABA_FAST_BUILD_EXT="0")
    info = _run([tmp_path / "env" / "bin" / "haba-fast", "info"], tmp_path).stdout
    assert "not loaded:" in info and "_C" in info and "built against: no record" in info
    assert re.search(r"\n\s*generate\s+cpu\s+torch\n", info), info  # device cpu, backend torch (the fallback)
    assert "not cpu: the C++ extension is not loaded" in info
