"""On-disk spool: frames and scalar batches waiting for the server, replayed in order.

One directory per run (``<spool_dir>/<project>/<run>/``), one file per entry, named
``<counter:016d>-<tag>.sw`` so that sorted names are the write order and the tag tells what an
entry holds without opening it. A file is a JSON header line (kind, seq, encoding, ...) followed
by the body bytes, written to a temporary name and renamed, so a crash never leaves a torn entry.
Entries keep the frame's ``seq``: a replay sends the same idempotency key as the first try, so
the server stores each frame once however often it is replayed.

Cap policy (``max_bytes``): to make room the oldest *update-sketch* entries are deleted first;
if that is not enough the new entry is refused. Callers count both as drops.
Used only from the sender thread.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_NAME = re.compile(r"^(\d{16})-([a-z]+)\.sw$")
DROPPABLE_TAGS = frozenset({"us"})  # update_sketch entries may be evicted to make room


def safe_component(name: str) -> str:
    """A filesystem-safe version of a project or run name (stable, collision-resistant)."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "_"
    if clean != name:
        import zlib

        clean = f"{clean[:80]}-{zlib.crc32(name.encode()):08x}"
    return clean[:120]


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

    def _scan(self) -> None:
        if self._scanned:
            return
        self._scanned = True
        if not self.dir.is_dir():
            return
        for p in sorted(self.dir.iterdir()):
            m = _NAME.match(p.name)
            if m is None:
                if p.name.endswith(".tmp"):
                    p.unlink(missing_ok=True)
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
        evicted = 0
        if self._bytes + size > self.max_bytes:
            for entry in list(self._entries):
                if self._bytes + size <= self.max_bytes:
                    break
                if entry.tag in DROPPABLE_TAGS:
                    self._remove(entry)
                    evicted += 1
            if self._bytes + size > self.max_bytes:
                return False, evicted
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{self._next:016d}-{tag}.sw"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(head)
            fh.write(body)
        os.replace(tmp, path)
        self._entries.append(SpoolEntry(path, self._next, tag, size, meta.get("seq")))
        self._next += 1
        self._bytes += size
        return True, evicted

    @property
    def max_seq(self) -> int | None:
        """The largest frame ``seq`` waiting here (a new session must number above it)."""
        self._scan()
        seqs = [e.seq for e in self._entries if isinstance(e.seq, int)]
        return max(seqs) if seqs else None

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
