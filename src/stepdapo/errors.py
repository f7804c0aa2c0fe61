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


# Error messages quote the user's input, and the input may be huge (a 10^6-column row, a 1 MB
# value): every message quotes at most an excerpt, and lists at most a few items.

def excerpt(value, limit: int = 60, _depth: int = 0) -> str:
    """repr(value), cut to `limit` characters with how much was left out. A container's repr is
    built item by item up to the limit and three levels deep: the repr of a deeply nested or
    alias-expanded value can be exponentially long, so it is never built whole."""
    if isinstance(value, (list, tuple, set, dict)):
        if _depth >= 3:
            return "[...]" if isinstance(value, list) else "{...}" if isinstance(value, (dict, set)) else "(...)"
        if isinstance(value, dict):
            opening, closing = "{", "}"
            items = (f"{excerpt(k, limit, _depth + 1)}: {excerpt(v, limit, _depth + 1)}" for k, v in value.items())
        else:
            opening, closing = {list: "[]", tuple: "()"}.get(type(value), "{}")
            items = (excerpt(v, limit, _depth + 1) for v in value)
        parts, size = [], 0
        for item in items:
            if parts and size + len(item) > limit:
                break
            parts.append(item)
            size += len(item) + 2
        more = f", ... ({len(value) - len(parts):,} more)" if len(parts) < len(value) else ""
        return opening + ", ".join(parts) + more + closing
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**60 else f"<an integer of {len(str(abs(value))) if abs(value) < 10**4000 else 'over 4000'} digits>"
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit:,} more characters)"


def listing(items, limit: int = 8) -> str:
    """'a, b, c' for a few items; the first `limit` and how many more for many."""
    items = list(items)
    shown = ", ".join(excerpt(x, 40) if not isinstance(x, str) else (x if len(x) <= 40 else x[:40] + "...")
                      for x in items[:limit])
    return shown + (f", ... ({len(items):,} in all)" if len(items) > limit else "")


MAX_MESSAGE = 3000


def cap_message(text: str, limit: int = MAX_MESSAGE) -> str:
    """The whole message, or its start and how much was left out: a backstop for the CLI, which
    prints one error line (several for config validation, one per bad key)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit:,} more characters)"
