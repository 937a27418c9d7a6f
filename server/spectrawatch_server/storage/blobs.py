"""Blob store for frame bodies. Writes are atomic: temp file, fsync, rename."""

from __future__ import annotations

import errno
import os
import re
import time
import uuid
from pathlib import Path
from typing import BinaryIO, Protocol

# The only keys the server writes (``frame_blob_key``); the start-up clean-up deletes nothing
# else, so a blob directory pointed at the wrong place loses no foreign file.
FRAME_BLOB_KEY = re.compile(r"runs/[0-9]+/[a-z_]+/[0-9]{12,}-[0-9a-f]{8}\.safetensors(\.zst)?")


def frame_blob_key(run_id: int, kind: str, seq: int, encoding: str) -> str:
    """Key of a new frame body: ``runs/<run>/<kind>/<seq:012>-<8 hex>.safetensors[.zst]``."""
    suffix = ".safetensors.zst" if encoding == "zstd" else ".safetensors"
    return f"runs/{run_id}/{kind}/{seq:012d}-{uuid.uuid4().hex[:8]}{suffix}"


class BlobStoreFull(OSError):
    """The blob store has no space left (mapped to 507 by the API)."""


class BlobStore(Protocol):
    """Where frame bodies live; keys are relative, '/'-separated paths."""

    def new_upload(self) -> BinaryIO: ...

    def commit_upload(self, upload: BinaryIO, key: str) -> None: ...

    def abort_upload(self, upload: BinaryIO) -> None: ...

    def read(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def keys(self, min_age_seconds: float = 0.0) -> list[str]: ...

    def clear_temp(self, min_age_seconds: float = 0.0) -> int: ...


class LocalBlobStore:
    """Blobs as files under ``root``; uploads stream into ``root/.tmp`` and are renamed in."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / ".tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or any(p in {"", ".", ".."} for p in parts):
            raise ValueError(f"invalid blob key {key!r}")
        return self.root.joinpath(*parts)

    def new_upload(self) -> BinaryIO:
        """An open temp file to stream an upload into (deleted by abort or moved by commit)."""
        return open(self.tmp / f"{uuid.uuid4().hex}.part", "w+b")

    def commit_upload(self, upload: BinaryIO, key: str) -> None:
        """fsync the upload, atomically move it to ``key`` and fsync the directory entry, so
        the blob outlives a power loss as the row the caller commits next does (a rename alone
        can be lost with the page cache: a row naming a missing blob)."""
        try:
            upload.flush()
            os.fsync(upload.fileno())
        except OSError as exc:
            self.abort_upload(upload)
            raise _translate(exc) from exc
        upload.close()
        dest = self.path(key)
        for attempt in range(3):  # a concurrent ``delete`` may prune the directory just made
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(upload.name, dest)
                _fsync_dir(dest.parent)
                return
            except FileNotFoundError:
                if attempt == 2 or not os.path.exists(upload.name):
                    raise

    def abort_upload(self, upload: BinaryIO) -> None:
        upload.close()
        Path(upload.name).unlink(missing_ok=True)

    def read(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        """Remove a blob and the directories it leaves empty (never ``root`` itself)."""
        path = self.path(key)
        path.unlink(missing_ok=True)
        for parent in path.parents:
            if parent == self.root or self.root not in parent.parents:
                break
            try:
                parent.rmdir()
            except OSError:  # not empty (or already gone): stop pruning
                break

    def keys(self, min_age_seconds: float = 0.0) -> list[str]:
        """Committed blob keys (temp uploads excluded) last modified at least that long ago."""
        cutoff = time.time() - min_age_seconds
        return [
            path.relative_to(self.root).as_posix()
            for path in self.root.rglob("*")
            if path.is_file() and self.tmp not in path.parents and path.stat().st_mtime <= cutoff
        ]

    def clear_temp(self, min_age_seconds: float = 0.0) -> int:
        """Remove uploads left by a crash; returns how many were removed."""
        cutoff = time.time() - min_age_seconds
        removed = 0
        for path in self.tmp.glob("*.part"):
            if path.stat().st_mtime <= cutoff:
                path.unlink(missing_ok=True)
                removed += 1
        return removed


def delete_all(store: BlobStore, keys: list[str]) -> int:
    """Delete blobs after the commit that released them; returns how many could not be (an
    orphan is removed at the next start-up; never a row naming a missing blob)."""
    failed = 0
    for key in keys:
        try:
            store.delete(key)
        except Exception:
            failed += 1
    return failed


def _translate(exc: OSError) -> OSError:
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return BlobStoreFull(exc.errno, "blob store is full")
    return exc


# filesystems that cannot fsync a directory say so with these (some FUSE and network mounts);
# PostgreSQL ignores them there too: the rename is as durable as such a filesystem makes it
_NO_DIR_FSYNC = frozenset({errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EACCES})


def _fsync_dir(path: Path) -> None:
    """Make a rename into ``path`` durable (POSIX; elsewhere directories cannot be opened)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno not in _NO_DIR_FSYNC:
            raise
