"""Errors a user can act on. CLIs print them as one line and exit non-zero (no stack trace)."""

import errno
import json
import signal
import threading
import sys
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


_INTERRUPTED = threading.Event()  # set by the CLIs' SIGINT/SIGTERM handler


@contextmanager
def sigterm_as_interrupt():
    """CLIs: SIGTERM raises KeyboardInterrupt as Ctrl-C does, so context managers remove temporaries
    on the way out and the command reports one line instead of dying silently. Both signals are also
    recorded: native code (the torch exporter, ONNX Runtime) may turn the KeyboardInterrupt into an
    error of its own, which is still an interruption, not a bug."""
    def interrupt(signum, frame):
        _INTERRUPTED.set()
        raise KeyboardInterrupt

    _INTERRUPTED.clear()
    # an inherited SIG_IGN for SIGINT (a background job of a shell without job control) is respected
    signals = [signal.SIGTERM] + ([] if signal.getsignal(signal.SIGINT) == signal.SIG_IGN else [signal.SIGINT])
    previous = {sig: signal.signal(sig, interrupt) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_command(prog: str, body, disk_path, user_errors: tuple = (RiverError,), on_interrupt=None) -> int:
    """A command's body under the project's error contract: a user's mistake (``user_errors``) or a full,
    read-only or foreign disk (named from ``disk_path`` when the error names no file) is one line and exit
    code 2; Ctrl-C or SIGTERM is one line and 130 (temporaries already removed on the way out). Anything
    else is a bug and keeps its traceback."""
    try:
        with sigterm_as_interrupt():
            return body()
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt) or (isinstance(exc, Exception) and _INTERRUPTED.is_set()):
            if on_interrupt is not None:
                on_interrupt()
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        if isinstance(exc, user_errors):
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 2
        if not isinstance(exc, OSError):
            raise
        message = disk_error(exc, disk_path)
        if message is None:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
