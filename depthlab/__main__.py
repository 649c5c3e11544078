"""`python -m depthlab …`: the command without an installed entry point (e.g. `PYTHONPATH=. python -m depthlab` in a checkout)."""

from .cli import main

main()
