"""Triton kernels (GPU; run on the CPU under TRITON_INTERPRET=1), importable as ``haba_fast.kernels``.

Triton is imported lazily by each kernel module; importing this package never imports Triton.
"""
