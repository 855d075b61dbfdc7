"""Subcommands of ``haba-fast``; one module each, with ``register(subparsers)``."""
