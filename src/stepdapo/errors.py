"""User-facing errors. The CLI catches `StepdapoError` (and only it) and prints one line with exit
status 2; anything else is a bug and keeps its traceback.

Each subclass also inherits the builtin it replaces (ValueError, FileNotFoundError), so callers that
caught those keep working.
"""

from __future__ import annotations


class StepdapoError(Exception):
    """A problem with the user's input (config, data, paths, artifacts): the message says what and
    where (file, line, field)."""


class ConfigError(StepdapoError, ValueError):
    """A bad config file, override or value. The message names where it came from."""


class ArtifactError(StepdapoError, ValueError):
    """A missing, corrupt or mismatched artifact in a run directory; the message names the file."""


class DataError(StepdapoError, ValueError):
    """A bad data file or row; the message names the file, the line and the field."""


class ModelPathError(StepdapoError, FileNotFoundError):
    """A model path that is neither an HF model directory nor a GGUF file."""


class StageInputError(StepdapoError, ValueError):
    """A stage's inputs cannot give it anything to do (no training states, no pairs, a missing
    critic, ...); the message says which input and what to change."""
