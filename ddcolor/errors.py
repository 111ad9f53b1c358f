"""`DDColorError`: the one base of the library's exceptions.

Every ddcolor exception class derives from it and keeps its older standard base (``ValueError``,
``FileNotFoundError``, ``RuntimeError``, ...), so ``except DDColorError`` catches any failure the library reports
with a message meant for a person, while existing ``except ValueError`` clauses keep working. Imports nothing.
"""

from __future__ import annotations

__all__ = ["DDColorError"]


class DDColorError(Exception):
    """A failure the library explains: the message names the file, URI or key concerned and what to do."""
