"""Errors a user can act on. CLIs print them as one line and exit non-zero (no stack trace)."""

import errno
import json
import signal
from contextlib import contextmanager
from pathlib import Path

# a disk or path the user must fix: full, read-only, not theirs, a file where a folder should be (other
# OS errors are bugs and keep their traceback)
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR)


def disk_error(exc: OSError, where) -> str | None:
    """The one-line message for a write that failed on the disk's account, naming the path (the
    exception's own, else ``where``); None for any other OS error."""
    if exc.errno not in DISK_ERRNOS:
        return None
    return f"cannot write {exc.filename or where}: {exc.strerror or exc}"


class RiverError(Exception):
    """Base class: a problem with the user's input or environment, explained in the message."""


def read_json(path, error: type[Exception] = RiverError):
    """A JSON file's content, or ``error`` naming the file (unreadable, not UTF-8, not JSON)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} cannot be read as JSON: {exc}") from None


class ModelNotFound(RiverError):
    """A model name, file or directory that does not exist or is not recognised."""


class InvalidModelFile(RiverError):
    """A model file that exists but cannot be read (truncated, corrupt, wrong format)."""


class NotADecoderGraph(RiverError):
    """An ONNX graph that does not follow the decode-step contract (DESIGN section 3)."""


class CacheOverflow(RiverError):
    """A prompt or generation that does not fit in the KV cache."""


@contextmanager
def sigterm_as_interrupt():
    """CLIs: SIGTERM raises KeyboardInterrupt as Ctrl-C does, so context managers remove temporaries
    on the way out and the command reports one line instead of dying silently."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
