"""Errors raised by the model loaders."""

from __future__ import annotations

import os


class ModelFileError(ValueError):
    """A model file (or download) is missing, corrupt, truncated, or not what we expected.

    Attributes:
      path: the offending file or directory.
      problem: what is wrong with it, in words.
    """

    def __init__(self, path: str | os.PathLike, problem: str):
        # Keep both pieces in args so the exception pickles (multiprocessing, pytest-xdist) intact.
        super().__init__(str(path), problem)
        self.path = str(path)
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"
