"""Atomic outputs: a whole folder built in a temporary sibling and renamed into place, a file written
to a temporary name and renamed. A failure leaves nothing behind."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from river.errors import RiverError

# Every temporary name we create carries this mark and its owner's pid, so a later run can tell a
# temporary left by a killed process (owner gone) from one still being written.
TEMP_MARK = ".river-tmp-"


def temp_prefix(name: str) -> str:
    """Prefix for a temporary sibling of ``name``: ``.<name>.river-tmp-<pid>-``."""
    return f".{name}{TEMP_MARK}{os.getpid()}-"


def _owner_alive(entry: Path) -> bool:
    pid = entry.name.rpartition(TEMP_MARK)[2].partition("-")[0]
    if not pid.isdigit():
        return True  # not one of ours: leave it alone
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def clean_stale_temps(folder: str | Path) -> None:
    """Remove temporaries in ``folder`` whose owner process is gone (killed runs leave them behind)."""
    try:
        entries = [e for e in Path(folder).iterdir() if TEMP_MARK in e.name]
    except OSError:
        return
    for entry in entries:
        if not _owner_alive(entry):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def make_temp_dir(parent: str | Path, name: str) -> Path:
    """A fresh temporary folder in ``parent`` marked with our pid (stale ones are cleaned first)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(parent)
    return Path(tempfile.mkdtemp(prefix=temp_prefix(name), dir=parent))


@contextmanager
def temp_dir(parent: str | Path, name: str):
    """A temporary folder in ``parent`` for the duration of the block, removed afterwards."""
    tmp = make_temp_dir(parent, name)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def cache_lock(entry: str | Path):
    """Hold an exclusive lock beside the cache entry ``entry`` (``.<name>.lock``), so that concurrent
    processes build it once: the others wait, then find it complete."""
    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / f".{entry.name}.lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def require_empty(out_dir: str | Path, what: str = "output folder") -> None:
    """Refuse an ``out_dir`` that exists and is not an empty folder (call it before expensive work;
    ``atomic_dir`` calls it too)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise RiverError(f"{what} {out_dir} exists and is not empty")


ENTRY_FILE = "entry.json"  # a complete cache entry's files and their sizes, written last


def build_once(entry: str | Path, build) -> Path:
    """The cache folder ``entry``, built by ``build(tmp)`` into a temporary folder that becomes ``entry``
    unless an intact one is there. Concurrent processes build it once: the others wait and use it.
    Intact = it holds every file it was written with, at its size (ENTRY_FILE): a full disk, a killed
    copy or a hand clean-up that truncated the weights, emptied a graph or removed a tokenizer gets the
    entry rebuilt rather than failing (or running) later."""
    entry = Path(entry)
    with cache_lock(entry):
        if not _intact(entry):
            shutil.rmtree(entry, ignore_errors=True)  # we hold the lock: nobody writes it
            with atomic_dir(entry, what="cache entry") as tmp:
                build(tmp)
                sizes = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
                write_bytes_atomic(tmp / ENTRY_FILE, json.dumps(sizes, indent=1).encode())
    return entry


def _intact(entry: Path) -> bool:
    try:
        sizes = json.loads((entry / ENTRY_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(sizes, dict) and all((entry / name).is_file() and (entry / name).stat().st_size == size
                                           for name, size in sizes.items())


@contextmanager
def atomic_dir(out_dir: str | Path, prefix: str | None = None, what: str = "output folder"):
    """Yield a temporary folder beside ``out_dir``; when the block succeeds it becomes ``out_dir`` (an
    existing empty ``out_dir`` is replaced), when it fails it is removed: no partial output is left.
    A non-empty ``out_dir`` is refused up front."""
    out_dir = Path(out_dir)
    require_empty(out_dir, what)
    try:
        tmp = make_temp_dir(out_dir.parent, prefix or out_dir.name)
    except OSError as exc:
        raise RiverError(f"cannot write to {out_dir.parent}: {exc.strerror}") from None
    try:
        yield tmp
        tmp.chmod(0o755)
        try:
            tmp.rename(out_dir)  # replaces an empty folder; fails if another run filled it meanwhile
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise RiverError(f"{what} {out_dir} exists and is not empty") from None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes | memoryview) -> Path:
    """Temporary file in the same folder, fsync, rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), dir=path.parent)
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
