"""haba_fast: dataset distillation via factorization (HaBa), fast.

Public entry points live in submodules (``haba_fast.data``, ``haba_fast.models``,
``haba_fast.factorization``, ``haba_fast.ops``, ``haba_fast.trajectory``, ...). Importing the
package is cheap: it neither loads the C++ extension nor queries CUDA.
"""

__version__ = "0.1.0"
