"""haba_fast: dataset distillation via factorization (HaBa), fast.

``import haba_fast as hf`` gives the public API, loaded on first use (module ``__getattr__``): importing the
package imports neither torch nor the C++ extension and never queries CUDA.

- data and models: ``hf.load`` (a dataset), ``hf.get_network``;
- synthetic sets: ``hf.HaBa``, ``hf.Pixels``, ``hf.load_synthetic``;
- ops: ``hf.generate``, ``hf.augment``, ``hf.generate_augment``; DSA parameters: ``hf.sample``, ``hf.AugParams``,
  ``hf.DSAConfig``;
- pipeline: ``hf.train_experts``, ``hf.load_buffer``, ``hf.Distiller``, ``hf.DistillConfig``, ``hf.distill``,
  ``hf.evaluate_synthetic``, ``hf.get_engine``.

``hf.augment`` and ``hf.distill`` are also the submodules of those names; the two modules are callable, so
``hf.augment(x, params)`` is ``haba_fast.augment.apply`` and ``hf.distill(cfg, ...)`` is
``haba_fast.distill.distill``, while ``hf.augment.sample(...)`` and ``from haba_fast import distill`` keep working.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> (module, attribute); attribute None: the submodule itself.
_EXPORTS = {
    "load": ("haba_fast.data", "load"),
    "get_network": ("haba_fast.models", "get_network"),
    "HaBa": ("haba_fast.factorization", "HaBa"),
    "Pixels": ("haba_fast.factorization", "Pixels"),
    "load_synthetic": ("haba_fast.factorization", "load_synthetic"),
    "generate": ("haba_fast.ops", "generate"),
    "generate_augment": ("haba_fast.ops", "generate_augment"),
    "augment": ("haba_fast.augment", None),
    "sample": ("haba_fast.augment", "sample"),
    "AugParams": ("haba_fast.augment", "AugParams"),
    "DSAConfig": ("haba_fast.augment", "DSAConfig"),
    "train_experts": ("haba_fast.experts", "train_experts"),
    "load_buffer": ("haba_fast.experts", "load_buffer"),
    "Distiller": ("haba_fast.distill", "Distiller"),
    "DistillConfig": ("haba_fast.distill", "DistillConfig"),
    "distill": ("haba_fast.distill", None),
    "evaluate_synthetic": ("haba_fast.evaluate", "evaluate_synthetic"),
    "get_engine": ("haba_fast.engines", "get_engine"),
}
__all__ = sorted(_EXPORTS) + ["__version__"]

# Submodules that are also the function of their name: module -> the attribute a call runs.
_CALLABLE_SUBMODULES = {"haba_fast.augment": "apply", "haba_fast.distill": "distill"}


class _CallableModule(types.ModuleType):
    """A module whose call runs one of its functions (``hf.augment(x, p)`` next to ``hf.augment.sample``)."""

    def __call__(self, *args, **kwargs):
        return getattr(self, _CALLABLE_SUBMODULES[self.__name__])(*args, **kwargs)


class _CallableSubmoduleFinder:
    """Makes the modules of ``_CALLABLE_SUBMODULES`` callable as they are imported, whoever imports them first."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name not in _CALLABLE_SUBMODULES:
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_mark(module):
            exec_module(module)
            module.__class__ = _CallableModule

        spec.loader.exec_module = exec_and_mark  # this spec's own loader instance
        return spec


if not any(isinstance(f, type) and f.__name__ == "_CallableSubmoduleFinder" for f in sys.meta_path):
    sys.meta_path.insert(0, _CallableSubmoduleFinder)


def __getattr__(name: str):
    entry = _EXPORTS.get(name)
    if entry is None:
        raise AttributeError(f"module 'haba_fast' has no attribute {name!r}")
    module = importlib.import_module(entry[0])
    value = module if entry[1] is None else getattr(module, entry[1])
    if entry[1] is not None:
        globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
