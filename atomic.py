"""Write a whole output folder atomically: build it in a temporary sibling, rename it into place."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from river.errors import RiverError


@contextmanager
def atomic_dir(out_dir: str | Path, prefix: str | None = None):
    """Yield a temporary folder beside ``out_dir``; when the block succeeds it becomes ``out_dir`` (an
    existing empty ``out_dir`` is replaced), when it fails it is removed: no partial output is left."""
    out_dir = Path(out_dir)
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
