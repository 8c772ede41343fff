"""The ``ckptguard`` command line (ls, verify, doctor, prune, report, train, export)."""

from ckptguard.cli.main import main

__all__ = ["main"]
