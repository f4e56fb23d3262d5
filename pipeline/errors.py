"""Exceptions for mistakes a user can fix.

Every user-facing failure raises a subclass of :class:`UserError` whose message names the bad
input and says what to do about it. ``python -m pipeline`` prints such errors without a traceback
and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, configuration or environment (not a bug)."""


class ParamsError(UserError):
    """params.yaml has an unknown key, a wrong type or a value outside what is allowed."""


class DataError(UserError):
    """A dataset, tensor file or manifest is missing, malformed or fails its recorded hash."""


class DownloadError(UserError):
    """Every mirror failed with a network error, or a URL is not allowed."""


class ChecksumError(DownloadError):
    """Downloaded bytes do not match the pinned sha256 (fatal: no other mirror is tried)."""


class ArchiveError(DataError):
    """An archive is hostile or too large; nothing of it was extracted."""


class OutputError(UserError):
    """An output path holds files the stage did not write (or overlaps its input); nothing was replaced."""


class StorageError(UserError):
    """The disk refused a write: file-size limit (``ulimit -f``), full disk or quota; nothing partial is left."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, of another format, or refused by the safe loader."""


class TrainingDiverged(UserError):
    """A loss became NaN or Inf; the last good checkpoint is left intact."""
