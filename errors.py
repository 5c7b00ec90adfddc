"""Errors a user can act on. CLIs print them as one line and exit non-zero (no stack trace)."""

import signal
from contextlib import contextmanager


class RiverError(Exception):
    """Base class: a problem with the user's input or environment, explained in the message."""


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
