"""Where derived artefacts (converted tokenizers, exported graphs) are cached between runs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("RIVER_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "river-llm")
    return Path(root)


def file_fingerprint(path: Path) -> str:
    """Cheap identity of a large file: path, size, mtime and its first/last MiB."""
    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > 1 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return h.hexdigest()[:16]


def files_fingerprint(paths) -> str:
    """Cheap identity of a set of files (a graph and its external weights): their file fingerprints."""
    h = hashlib.sha256()
    for p in paths:
        h.update(file_fingerprint(Path(p)).encode())
    return h.hexdigest()[:16]


def files_sha256(paths) -> str:
    """SHA-256 of the files' contents, in order."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def cached_sha256(paths) -> str:
    """``files_sha256``, remembered per ``files_fingerprint`` so a large model is hashed once, not every run."""
    from river.atomic import write_bytes_atomic

    paths = list(paths)
    memo = cache_root() / "sha256" / files_fingerprint(paths)
    if memo.is_file():
        return memo.read_text().strip()
    digest = files_sha256(paths)
    write_bytes_atomic(memo, digest.encode())
    return digest
