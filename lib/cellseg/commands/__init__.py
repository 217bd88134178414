"""Subcommands of the ``cellseg`` command line."""
