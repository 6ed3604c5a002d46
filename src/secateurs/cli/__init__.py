"""The command line: argument parsing only; the library owns execution. `main` is the entry point."""

from secateurs.cli.main import main

__all__ = ["main"]
