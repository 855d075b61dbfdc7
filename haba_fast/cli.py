"""``haba-fast``: the command-line entry point.

Each subcommand lives in ``haba_fast.commands.<name>`` and provides ``register(subparsers)``, which
adds its parser and sets ``func`` (called with the parsed args; returns an exit code). Command
modules import heavy dependencies inside ``func`` so ``haba-fast --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional

COMMANDS = ("info", "buffer", "distill", "eval", "export", "bench", "table")


def build_parser() -> argparse.ArgumentParser:
    from haba_fast import __version__

    parser = argparse.ArgumentParser(
        prog="haba-fast",
        description="Dataset distillation via factorization (HaBa), fast. Run `haba-fast distill` with no "
        "arguments for the embedded digits demo.",
    )
    parser.add_argument("--version", action="version", version=f"haba-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"haba_fast.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"haba_fast.commands.{name}":
                raise
            continue  # a subcommand not installed in this build
        module.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    finished = False
    try:
        code = int(args.func(args) or 0)
        finished = True
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError) as exc:
        # Bad input from the user: a clear one-line message, not a traceback.
        print(f"haba-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            raise
        print(f"haba-fast {args.command}: error: {_OOM_ADVICE} ({_allocator_message(exc)})", file=sys.stderr)
        return 2
    finally:
        _leave_process_group(wait=finished)


_OOM_ADVICE = (
    "out of memory: the sizes asked for do not fit this machine; use smaller ones (--ipc / --budget-ipc, "
    "--n_style, --batch_syn, --syn_steps, --batch-train, --batch), or for the trajectory engine "
    "--memory-budget 0 or min, or --offload-weights"
)


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: Python's MemoryError, torch's CPU allocator or CUDA's."""
    torch = sys.modules.get("torch")
    if isinstance(exc, MemoryError) or (torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ()))):
        return True
    text = str(exc)
    return "can't allocate memory" in text or "not enough memory" in text or "CUDA out of memory" in text


def _allocator_message(exc: BaseException) -> str:
    """The allocator's own words, without torch's source location: e.g. "you tried to allocate 40000000000 bytes"."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text.split("DefaultCPUAllocator: ", 1)[-1][:300]


def _leave_process_group(wait: bool) -> None:
    """Under torchrun, leave the process group the command joined before the process exits: after a barrier when it
    finished (a rank that exits while a peer's last collective still reads from it aborts that peer), at once when
    it failed (a peer may never arrive). Nothing when no group was joined (torch.distributed never imported)."""
    if "torch.distributed" not in sys.modules:
        return
    from haba_fast import dist

    dist.destroy(wait=wait)


def entry() -> None:
    """The ``haba-fast`` program. It owns its process, so it lets the engine reuse large CPU blocks through c10's
    allocator (``HABA_FAST_BUFFER_CACHE=1`` unless set; off for library use, including ``main()`` called in
    someone else's process: the cache replaces a process-wide allocator, see csrc/buffer_cache.h)."""
    os.environ.setdefault("HABA_FAST_BUFFER_CACHE", "1")
    sys.exit(main())


if __name__ == "__main__":
    entry()
