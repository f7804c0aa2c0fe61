"""Paths the user gives: inputs are regular files, opened without blocking; a file output is
written only where nothing is, or over a file this tool wrote.

Why: `open()` on a FIFO blocks until a writer comes (forever, in a careless `--config <(...)` or a
hostile data path), a character device reads endlessly, and `os.replace` publishes over whatever is
at a path, `/dev/null` included. Every check here is an OSError-free `StepdapoError` naming the path.
Directories (run and stage outputs) are claimed by `stepdapo.runner`, which marks the ones it makes.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from stepdapo.errors import StepdapoError


class UserPathError(StepdapoError, OSError):
    """A path the user gave that cannot be used as given; the message names it."""


def kind_of(mode: int) -> str:
    """'a directory', 'a FIFO', ... for an `st_mode`."""
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def open_input(path: str | os.PathLike, what: str = "file", max_bytes: int | None = None) -> BinaryIO:
    """`path` opened for binary reading, if it is a regular file (of at most `max_bytes`): opened
    with O_NONBLOCK, so a FIFO is refused instead of waited on, then checked with fstat (no race
    between a check and the open)."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UserPathError(f"{what} not found: {p}") from None
    except OSError as e:
        raise UserPathError(f"{p}: cannot read the {what}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UserPathError(f"{p}: {kind_of(st.st_mode)}, not a {what}; give a regular file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise UserPathError(f"{p}: {st.st_size:,} bytes; a {what} is at most {max_bytes:,}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _stat(p: Path, what: str, follow: bool) -> os.stat_result | None:
    """The path's stat (of the link itself unless `follow`), None if nothing is there; any other
    error (a symbolic-link loop, a parent that is a file, no permission) names the path."""
    try:
        return os.stat(p) if follow else os.lstat(p)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserPathError(f"{p}: cannot use as the {what}: {e.strerror}") from None


def check_output_file(path: str | os.PathLike, is_ours: Callable[[Path], bool], what: str) -> Path:
    """`path`, if a file may be written there: nothing is there, or a regular file that `is_ours`
    recognises (a previous output of the same command). A directory, device, FIFO, socket, symbolic
    link or someone else's file is refused, and nothing is touched. Its parent directories are
    created by the writer."""
    p = Path(path)
    st = _stat(p, what, follow=False)
    if st is None:
        return p
    if not stat.S_ISREG(st.st_mode):
        raise UserPathError(f"{p}: exists and is {kind_of(st.st_mode)}; the {what} must be a new file "
                            f"(or one this command wrote), and nothing there was changed")
    if not is_ours(p):
        raise UserPathError(f"{p}: exists and is not a {what} written by stepdapo; refusing to replace it "
                            f"(nothing was changed): choose another path or remove it yourself")
    return p


def existing_output_dir(path: str | os.PathLike, what: str) -> bool:
    """Whether the output directory `path` exists (True) or is absent (False); anything else at
    the path (a file, a FIFO, a dangling symbolic link, a symbolic-link loop) is refused before any
    work starts, instead of failing when the finished work is published."""
    p = Path(path)
    st = _stat(p, what, follow=True)  # a symbolic link to a directory is a directory
    if st is None:
        if os.path.lexists(p):
            raise UserPathError(f"{p}: a symbolic link to nothing; the {what} needs a new or empty "
                                f"directory there")
        return False
    if not stat.S_ISDIR(st.st_mode):
        raise UserPathError(f"{p}: exists and is {kind_of(st.st_mode)}; the {what} needs a new or empty "
                            f"directory there")
    return True


def json_with_keys(keys: set[str], max_bytes: int = 64 << 20) -> Callable[[Path], bool]:
    """An `is_ours` for `check_output_file`: a JSON object with (at least) these top-level keys."""
    def is_ours(p: Path) -> bool:
        try:
            with open_input(p, max_bytes=max_bytes) as f:
                data = json.loads(f.read())
        except (StepdapoError, ValueError, RecursionError):
            return False
        return isinstance(data, dict) and keys <= set(data)
    return is_ours
