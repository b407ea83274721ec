"""The `revpers` command line (``main``); its subcommands are thin layers over the library."""

from revpers.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
