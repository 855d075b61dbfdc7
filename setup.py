"""Build script: the pure-Python package plus the optional C++ extension ``haba_fast._C``.

Environment:
    HABA_FAST_BUILD_EXT=0   install without the C++ extension (pure Python; the torch backend is used).
    DEBUG=1                 build the extension with -O0 -g.
    MAX_JOBS                honoured by torch.utils.cpp_extension's ninja build.
"""

import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("HABA_FAST_BUILD_EXT", "1") == "0":
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    debug = os.environ.get("DEBUG", "0") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    cxx += ["-std=c++17", "-fopenmp"]
    ext = CppExtension(
        name="haba_fast._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=["haba_fast", "haba_fast.commands", "haba_fast.engines", "haba_fast.objectives", "haba_fast.benchmarks", "haba_fast.kernels"],
    package_dir={"haba_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
