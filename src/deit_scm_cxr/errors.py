"""The one error every part of a run raises for a refused input."""

from __future__ import annotations

from typing import NoReturn


class RunInputError(ValueError):
    """A mistake in what the user gave a run (flags, data folder, model folder, checkpoint). The command-line
    entry points print it in one line and exit with status 2, as argparse does; a library caller catches it."""


def refuse(message: str) -> NoReturn:
    """Raise `RunInputError(message)`: the one way the run's modules reject an input."""
    raise RunInputError(message)


__all__ = ["RunInputError", "refuse"]
