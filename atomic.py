"""Atomic outputs: a whole folder built in a temporary sibling and renamed into place, a file written
to a temporary name and renamed. A failure leaves nothing behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from river.errors import RiverError


def require_empty(out_dir: str | Path, what: str = "output folder") -> None:
    """Refuse an ``out_dir`` that exists and is not an empty folder (call it before expensive work;
    ``atomic_dir`` calls it too)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise RiverError(f"{what} {out_dir} exists and is not empty")


@contextmanager
def atomic_dir(out_dir: str | Path, prefix: str | None = None, what: str = "output folder"):
    """Yield a temporary folder beside ``out_dir``; when the block succeeds it becomes ``out_dir`` (an
    existing empty ``out_dir`` is replaced), when it fails it is removed: no partial output is left.
    A non-empty ``out_dir`` is refused up front."""
    out_dir = Path(out_dir)
    require_empty(out_dir, what)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{prefix or out_dir.name}.", dir=out_dir.parent))
    except OSError as exc:
        raise RiverError(f"cannot write to {out_dir.parent}: {exc.strerror}") from None
    try:
        yield tmp
        tmp.chmod(0o755)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes | memoryview) -> Path:
    """Temporary file in the same folder, fsync, rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
