"""Benchmark implementations behind ``haba-fast bench`` and bench/ (timing via ``haba_fast.timing``)."""
