"""On-disk spool: frames and scalar batches waiting for the server, replayed in order.

One directory per run (``<spool_dir>/<project>/<run>/``), one file per entry, named
``<counter:016d>-<tag>.sw`` so that sorted names are the write order and the tag tells what an
entry holds without opening it. A file is a JSON header line (kind, seq, encoding, ...) followed
by the body bytes, written to a temporary name, fsynced, renamed and its directory fsynced, so
neither a crash nor a power loss leaves a torn entry (or loses a renamed one).
Entries keep the frame's ``seq``: a replay sends the same idempotency key as the first try, so
the server stores each frame once however often it is replayed.

Cap policy (``max_bytes``): to make room the oldest *update-sketch* entries are deleted first;
if deleting them all would not be enough, the new entry is refused and none is deleted. Callers
count both as drops.

Beside the entries: ``run.json`` names the run they belong to (project and run names as given,
config, tags, and the final status once the run finished) so that ``spectrawatch sync`` can
deliver them later without the training script; and ``.lock``, which the process using the
spool holds (``flock``, released when the process ends) so that a sync never replays entries
a live run is replaying too. Only the holder deletes a crashed writer's temporary files, when it
takes the lock: a scan (``len``, ``spectrawatch sync --dry-run``) may look at a directory a live
process is writing, and deleting its half-written ``.tmp`` made its rename fail and lose the
entry. Used only from the sender thread (or the sync command).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spectrawatch._eviction import oldest_droppable

_NAME = re.compile(r"^(\d{16})-([a-z]+)\.sw$")
RUN_META = "run.json"
_LOCK = ".lock"
DROPPABLE_TAGS = frozenset({"us"})  # update_sketch entries may be evicted to make room


def safe_component(name: str) -> str:
    """A filesystem-safe version of a project or run name (stable, collision-resistant)."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "_"
    if clean != name:
        import zlib

        clean = f"{clean[:80]}-{zlib.crc32(name.encode()):08x}"
    return clean[:120]


def spooled_run_dirs(root: str | Path) -> list[tuple[Path, list[Path]]]:
    """``(run directory, its entry files)`` of every ``<root>/<project>/<run>/`` holding
    entries or a ``run.json`` (a run whose final status is still to be set), in name order."""
    base = Path(root)
    if not base.is_dir():
        return []
    out = []
    for run_dir in sorted(p for p in base.glob("*/*") if p.is_dir()):
        files = [p for p in run_dir.iterdir() if p.is_file() and p.suffix == ".sw"]
        if files or (run_dir / RUN_META).is_file():
            out.append((run_dir, files))
    return out


def _sync_dir(path: Path) -> None:
    """Make the names ``path`` holds (a rename, a new file or directory) survive a power loss:
    POSIX syncs a directory's entries only by its own fsync (not possible on Windows)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (FUSE, CIFS) refuse a directory's fsync: as SQLite,
        pass  # keep the entry, which is renamed into place already, rather than lose it
    finally:
        os.close(fd)


def _make_dir(path: Path) -> None:
    """``mkdir -p path``, each directory it creates synced into its parent."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
        _sync_dir(folder.parent)


def _write_durably(path: Path, chunks: Sequence[bytes]) -> None:
    """Write ``path`` through ``<path>.tmp``: fsynced, renamed, the directory fsynced, so that
    after a crash or a power loss it is whole or absent (~6 ms an entry on an ext4 virtual disk)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        for chunk in chunks:
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _sync_dir(path.parent)


@dataclass(frozen=True)
class SpoolEntry:
    """One spooled request: ``meta`` (JSON header) and where its body lies."""

    path: Path
    counter: int
    tag: str
    size: int
    seq: int | None = None

    def read(self) -> tuple[dict[str, Any], bytes]:
        data = self.path.read_bytes()
        head, _, body = data.partition(b"\n")
        meta = json.loads(head.decode("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError(f"spool entry {self.path.name} has no JSON object header")
        return meta, body


class Spool:
    """The spool directory of one run."""

    def __init__(self, directory: str | Path, max_bytes: int) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self._entries: list[SpoolEntry] = []
        self._bytes = 0
        self._next = 0
        self._scanned = False
        self._lock_fd: int | None = None

    def lock(self) -> bool:
        """Hold this spool for this process; False if another live process holds it."""
        if self._lock_fd is not None:
            return True
        try:
            import fcntl
        except ImportError:  # no flock (Windows): no protection against a concurrent sync
            return True
        _make_dir(self.dir)
        fd = os.open(self.dir / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        self._remove_leftovers()
        return True

    def _remove_leftovers(self) -> None:
        """Delete the temporary files of a writer that died mid-write (only the lock holder
        may: no other process is writing this directory then)."""
        with contextlib.suppress(OSError):
            for p in self.dir.iterdir():
                if p.name == RUN_META + ".tmp" or (
                    p.name.endswith(".tmp") and _NAME.match(p.name[: -len(".tmp")])
                ):
                    p.unlink(missing_ok=True)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def write_meta(self, meta: dict[str, Any]) -> None:
        """Write ``run.json`` (atomically, durably)."""
        _make_dir(self.dir)
        body = json.dumps(meta, separators=(",", ":"), default=str).encode()
        _write_durably(self.dir / RUN_META, [body])

    def read_meta(self) -> dict[str, Any] | None:
        """``run.json``, or None when absent or unreadable."""
        try:
            meta = json.loads((self.dir / RUN_META).read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def remove_if_empty(self) -> None:
        """Delete the run's directory (meta and lock too) once no entry is left."""
        self._scan()
        if self._entries:
            return
        for name in (RUN_META, _LOCK):
            with contextlib.suppress(OSError):
                (self.dir / name).unlink()
        self.unlock()
        with contextlib.suppress(OSError):
            self.dir.rmdir()

    def _scan(self) -> None:
        if self._scanned:
            return
        self._scanned = True
        if not self.dir.is_dir():
            return
        for p in sorted(self.dir.iterdir()):
            m = _NAME.match(p.name)
            if m is None:  # a .tmp being written (or left by a crash): the lock holder's
                continue
            size = p.stat().st_size
            seq = None
            try:
                with open(p, "rb") as fh:
                    seq = json.loads(fh.readline().decode("utf-8")).get("seq")
            except (OSError, ValueError):
                pass
            self._entries.append(SpoolEntry(p, int(m.group(1)), m.group(2), size, seq))
            self._bytes += size
        if self._entries:
            self._next = self._entries[-1].counter + 1

    def __len__(self) -> int:
        self._scan()
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        self._scan()
        return self._bytes

    def put(self, tag: str, meta: dict[str, Any], body: bytes) -> tuple[bool, int]:
        """Append an entry; returns ``(stored, evicted)`` -- evicted = update sketches deleted."""
        self._scan()
        head = json.dumps(meta, separators=(",", ":")).encode() + b"\n"
        size = len(head) + len(body)
        victims = self._victims(size)
        if victims is None:
            return False, 0
        for entry in victims:
            self._remove(entry)
        _make_dir(self.dir)
        path = self.dir / f"{self._next:016d}-{tag}.sw"
        _write_durably(path, [head, body])
        self._entries.append(SpoolEntry(path, self._next, tag, size, meta.get("seq")))
        self._next += 1
        self._bytes += size
        return True, len(victims)

    def _victims(self, size: int) -> list[SpoolEntry] | None:
        """The oldest droppable entries to delete so that ``size`` more bytes fit (none when
        they fit as is), or None when deleting every one would not make room: then none is
        deleted for an entry refused anyway."""
        return oldest_droppable(
            self._entries,
            lambda entry: entry.tag in DROPPABLE_TAGS,
            lambda entry: entry.size,
            extra_bytes=self._bytes + size - self.max_bytes,
        )

    @property
    def max_seq(self) -> int | None:
        """The largest frame ``seq`` waiting here (a new session must number above it)."""
        self._scan()
        seqs = [e.seq for e in self._entries if isinstance(e.seq, int)]
        return max(seqs) if seqs else None

    def entries(self) -> list[SpoolEntry]:
        """Every entry, oldest first."""
        self._scan()
        return list(self._entries)

    def peek(self) -> SpoolEntry | None:
        """The oldest entry, or None."""
        self._scan()
        return self._entries[0] if self._entries else None

    def pop(self, entry: SpoolEntry) -> None:
        """Delete ``entry`` (after the server accepted or definitively refused it)."""
        self._remove(entry)

    def _remove(self, entry: SpoolEntry) -> None:
        entry.path.unlink(missing_ok=True)
        if entry in self._entries:
            self._entries.remove(entry)
            self._bytes -= entry.size
