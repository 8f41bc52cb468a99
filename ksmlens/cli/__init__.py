"""The ``ksmlens`` command."""

from ksmlens.cli.main import main

__all__ = ["main"]
