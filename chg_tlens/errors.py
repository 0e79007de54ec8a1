"""The one exception a user can fix: everything else raised from chg_tlens is a bug.

``InputError`` is a ``ValueError`` so ``except ValueError`` keeps working in notebooks. The CLI turns it
(and file errors naming a user's path) into one line and exit status 2; any other exception is a bug and
keeps its full traceback (exit 1).
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input: an argument, a file or a setting the caller can change. The message says which."""


class MissingDependencyError(InputError, ImportError):
    """An optional package a requested feature needs is not installed; the message names the pip line.
    Still an ImportError, so ``except ImportError`` keeps working."""


class HubUnavailableError(InputError, OSError):
    """A named hub model cannot be fetched now (offline, gated, download failed); the message says what
    to do instead. Still an OSError, so ``except OSError`` keeps working."""
