"""Benchmark implementations behind ``haba-fast bench`` and bench/ (timing via ``haba_fast.timing``)."""

import math

# torch.Generator.manual_seed takes [-2**63, 2**64); the benches also seed a generator with --seed + 1.
SEED_BOUNDS = (-(2**63), 2**64 - 2)


def check_flags(args, **bounds) -> None:
    """Raise ValueError naming the first flag of ``args`` out of its bounds, before a benchmark does any work.

    Args:
        args: the parsed arguments.
        **bounds: flag name (``args`` attribute) -> its least value, or (least, most). A value left at None (a flag
            not given) passes; a float must also be finite (nan and inf are refused).
    """
    for name, bound in bounds.items():
        value = getattr(args, name)
        if value is None:
            continue
        least, most = bound if isinstance(bound, tuple) else (bound, None)
        flag = "--" + name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{flag} must be a finite number, got {value}")
        if most is not None and not least <= value <= most:
            raise ValueError(f"{flag} must be between {least} and {most}, got {value}")
        if value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
