"""Errors and warnings of the kvlock-edit application.

Everything a user can get wrong (a file, a mask, a checkpoint, an option) raises an
``EditInputError``: a ``ValueError`` whose message says what was expected and what was
given.  The command prints it on one line and exits with status 2 (a usage error), never
with a traceback from inside torch.  A checkpoint or scheduler of the wrong kind raises
``UnsupportedModelError``, which is also a ``TypeError`` (the package's validation
policy: the wrong kind of object).  Conditions that let the edit run but change what it
means (an empty mask, a schedule that never activates, frames or pixels dropped to fit
the model) are ``KVLockEditWarning``s.
"""
from __future__ import annotations

__all__ = ["EditInputError", "UnsupportedModelError", "KVLockEditWarning", "USAGE_EXIT_CODE"]

USAGE_EXIT_CODE = 2


class EditInputError(ValueError):
    """Bad input to kvlock-edit (a file, a mask, an option): exit status 2 from the command."""

    exit_code = USAGE_EXIT_CODE


class UnsupportedModelError(EditInputError, TypeError):
    """A checkpoint, pipeline or scheduler that the KV-Lock edit loop cannot run."""


class KVLockEditWarning(UserWarning):
    """The edit runs, but something about its inputs changes what it does."""
