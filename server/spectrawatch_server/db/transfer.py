"""Copy a whole server's database into another one (``spectrawatch db copy``): SQLite to
PostgreSQL when a server outgrows one machine, or any other pair.

Every table of the schema is copied in foreign-key order, primary keys included, in batches of
``batch_rows`` rows streamed from the source (memory does not grow with the table), inside one
transaction on the target: a failed copy leaves the target as it was. The source is read in one
snapshot (a SQLite read transaction; a PostgreSQL ``REPEATABLE READ, READ ONLY`` one), so rows
written meanwhile are not half copied, but they are not copied either: the source's server must
be stopped. Afterwards PostgreSQL's id sequences are moved past the copied ids, and each
table's row count on the target is checked against the source's.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, Table, delete, func, inspect, select, text
from sqlalchemy.engine import make_url

from spectrawatch_server.db import migrate
from spectrawatch_server.db.base import Base
from spectrawatch_server.db.models import Frame
from spectrawatch_server.db.session import make_engine

BATCH_ROWS = 5000  # rows of one read and one multi-row insert
PROCRASTINATE_ANALYSIS_QUEUE = "spectrawatch-analysis"  # queue.procrastinate.ANALYSIS_QUEUE
WAITING_FRAME_STATUSES = ("pending", "running")

Progress = Callable[[str, int], None]
"""Called with a table's name and the rows copied into it so far, after each batch."""


class CopyRefused(RuntimeError):
    """The copy cannot be made as asked; the message says why and what to do instead."""


class CopyMismatch(RuntimeError):
    """A table's row count on the target differs from the source's (the copy was rolled back)."""


@dataclass(frozen=True)
class TableCopy:
    name: str
    rows: int


@dataclass(frozen=True)
class CopyReport:
    """What :func:`copy_database` did: rows per table (foreign-key order), seconds, the schema
    revision, frames naming a blob, frames still waiting for analysis, and other sessions seen
    on a PostgreSQL source (0 on SQLite: its lock is checked by the command)."""

    tables: tuple[TableCopy, ...]
    seconds: float
    revision: str
    blob_frames: int
    waiting_frames: int
    other_sessions: int

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)


def copy_database(
    source_url: str,
    target_url: str,
    *,
    replace: bool = False,
    allow_waiting: bool = False,
    batch_rows: int = BATCH_ROWS,
    progress: Progress | None = None,
) -> CopyReport:
    """Copy every row of the spectrawatch database at ``source_url`` into ``target_url``.

    The source must be at this version's newest schema; the target is migrated to it and must
    hold no row (``replace``: its rows are deleted first, in the copy's transaction). Frames
    still waiting for analysis are refused unless ``allow_waiting`` (see :func:`_check_waiting`).
    Raises :class:`CopyRefused` before writing anything, :class:`CopyMismatch` after rolling back.
    """
    if batch_rows < 1:
        raise ValueError("batch_rows must be >= 1")
    _check_distinct(source_url, target_url)
    started = time.monotonic()
    source = _open_source(source_url)
    target: Engine | None = None
    try:
        with source.connect() as reading:
            _begin_snapshot(reading)
            revision = _check_source_schema(reading, source_url)
            waiting = _check_waiting(reading, allow_waiting)
            others = _other_sessions(reading)
            target = _open_target(target_url)
            _check_target(target, replace)
            migrate.upgrade(target)
            with target.begin() as writing:
                migrate.lift_timeouts(writing)
                if replace:
                    _empty(writing)
                copied = tuple(_copy_tables(reading, writing, batch_rows, progress))
                _reset_sequences(writing, _ids_handed_out(reading))
                _verify(reading, writing, copied)
            blob_frames = int(reading.scalar(select(func.count()).where(Frame.blob_key != "")) or 0)
    finally:
        source.dispose()
        if target is not None:
            target.dispose()
    return CopyReport(copied, time.monotonic() - started, revision, blob_frames, waiting, others)


@dataclass(frozen=True)
class BlobCopy:
    """What :func:`copy_blob_files` did: files copied, already there (same size), missing in
    the source directory, and the bytes copied; ``invalid`` names frames whose blob key is no
    relative path inside the store (``..``, empty parts), skipped."""

    copied: int
    present: int
    missing: int
    bytes: int
    invalid: tuple[int, ...] = ()


def copy_blob_files(database_url: str, source_dir: Path, target_dir: Path) -> BlobCopy:
    """Copy the blob file of every frame of the database at ``database_url`` from the local blob
    directory ``source_dir`` to ``target_dir`` (same relative keys), each through a temp file
    renamed into place; a file already there with the same size is kept (a re-run resumes).
    Folders are created private (0700) and files written 0600: the copy of a private data
    directory stays private whatever the umask."""
    copied = present = missing = size = 0
    invalid: list[int] = []
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execution_options(yield_per=BATCH_ROWS).execute(
                select(Frame.id, Frame.blob_key).where(Frame.blob_key != "").order_by(Frame.id)
            )
            for frame_id, key in rows:
                parts = key.split("/")
                if any(p in {"", ".", ".."} for p in parts):
                    invalid.append(frame_id)
                    continue
                src, dest = source_dir.joinpath(*parts), target_dir.joinpath(*parts)
                if not src.is_file():
                    missing += 1
                elif dest.is_file() and dest.stat().st_size == src.stat().st_size:
                    present += 1
                else:
                    _private_dirs(target_dir, dest.parent)
                    part = dest.with_name(dest.name + ".part")
                    with src.open("rb") as fin:
                        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                        with os.fdopen(fd, "wb") as fout:
                            shutil.copyfileobj(fin, fout)
                    os.replace(part, dest)
                    copied += 1
                    size += dest.stat().st_size
    finally:
        engine.dispose()
    return BlobCopy(copied, present, missing, size, tuple(invalid))


def _private_dirs(root: Path, folder: Path) -> None:
    """``mkdir -p folder`` with mode 0700 for each folder created (``root`` too)."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        if folder == root:
            break
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(mode=0o700, exist_ok=True)


def shown(url: str) -> str:
    """``url`` with its password hidden, for messages."""
    return make_url(url).render_as_string(hide_password=True)


def _check_distinct(source_url: str, target_url: str) -> None:
    a, b = make_url(source_url), make_url(target_url)
    same_file = (
        a.get_backend_name() == b.get_backend_name() == "sqlite"
        and a.database
        and b.database
        and Path(a.database).resolve() == Path(b.database).resolve()
    )
    if same_file or a.set(password=None) == b.set(password=None):
        raise CopyRefused(f"the source and the target are the same database ({shown(source_url)})")


def _open_source(url: str) -> Engine:
    """The source's engine; a SQLite file must exist (the engine would create an empty one)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise CopyRefused("the source must be a SQLite file or a PostgreSQL database")
        if not Path(parsed.database).is_file():
            raise CopyRefused(f"no SQLite database at {parsed.database}")
    return make_engine(url)


def _open_target(url: str) -> Engine:
    """The target's engine; a SQLite file's directory is made (0700, as a data directory)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return make_engine(url)


def _begin_snapshot(connection: Connection) -> None:
    """Start the one read transaction every source read runs in.

    PostgreSQL: ``REPEATABLE READ, READ ONLY`` (one snapshot for every statement). SQLite: an
    explicit ``BEGIN`` (the sqlite3 driver opens none before a write); in WAL mode its first
    read fixes the snapshot, and a running writer cannot check-point past it."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    else:
        connection.exec_driver_sql("BEGIN")


def _check_source_schema(connection: Connection, url: str) -> str:
    """The source's revision, which must be this version's head and its only one; its tables
    must be the schema's (plus Alembic's and procrastinate's, which are not copied)."""
    head = ScriptDirectory.from_config(migrate.alembic_config(url)).get_current_head()
    heads = MigrationContext.configure(connection).get_current_heads()
    if not heads:
        raise CopyRefused(f"{shown(url)} is not a spectrawatch database (no schema revision)")
    if heads != (head,):
        raise CopyRefused(
            f"the source's schema is at revision {', '.join(heads)}, this spectrawatch's is "
            f"{head}: run this version's `spectrawatch server` on the source once (it upgrades "
            "the schema as it starts), stop it, then copy"
        )
    known = set(Base.metadata.tables) | {"alembic_version"}
    unknown = sorted(
        name
        for name in inspect(connection).get_table_names()
        if name not in known and not name.startswith("procrastinate_")
    )
    if unknown:
        raise CopyRefused(f"the source has tables this copy does not know: {', '.join(unknown)}")
    return str(head)


def _check_waiting(connection: Connection, allow: bool) -> int:
    """How many frames wait for analysis (``pending`` or ``running``); refused unless ``allow``.

    Their jobs belong to the source's queue: the embedded queue's ``job`` rows are copied and
    run on a target served with the embedded queue, but PostgreSQL's procrastinate queue keeps
    its jobs elsewhere and would never run them (their frames would stay pending)."""
    waiting = connection.execute(
        select(Frame.run_id, func.count())
        .where(Frame.status.in_(WAITING_FRAME_STATUSES))
        .group_by(Frame.run_id)
        .order_by(Frame.run_id)
    ).all()
    total = sum(int(n) for _, n in waiting)
    if total and not allow:
        runs = ", ".join(str(run_id) for run_id, _ in waiting[:10])
        more = f" and {len(waiting) - 10} more" if len(waiting) > 10 else ""
        raise CopyRefused(
            f"{total} frame(s) of run(s) {runs}{more} still wait for analysis: start the source's "
            "server until its queue is empty (GET /api/v1/health), stop it, and copy again; or "
            "copy them waiting (--allow-pending) and queue them on the target with "
            "`spectrawatch runs reanalyze` (the PostgreSQL queue does not run the copied jobs)"
        )
    return total


def _other_sessions(connection: Connection) -> int:
    """PostgreSQL: other sessions connected to the source database (a server still running
    writes what the snapshot does not see); SQLite: 0 (the command checks the data directory's
    lock instead)."""
    if connection.dialect.name != "postgresql":
        return 0
    found = connection.scalar(
        text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        )
    )
    return int(found or 0)


def _check_target(engine: Engine, replace: bool) -> None:
    """Refuse a target with rows in any of the schema's tables (before migrating it), unless
    ``replace``, and one a newer spectrawatch migrated."""
    url = engine.url.render_as_string(hide_password=False)
    with engine.connect() as connection:
        try:
            migrate.check_revision(connection, url)
        except migrate.SchemaTooNew as exc:
            raise CopyRefused(f"the target {shown(url)} cannot be used: {exc}") from None
        present = set(inspect(connection).get_table_names())
        filled = [
            table.name
            for table in Base.metadata.sorted_tables
            if table.name in present
            and connection.execute(select(1).select_from(table).limit(1)).first() is not None
        ]
        others = _other_sessions(connection) if filled else 0
    if filled and not replace:
        raise CopyRefused(
            f"the target {shown(url)} is not empty (rows in {', '.join(filled)}): copy into an "
            "empty database, or pass --replace to delete the target's rows first"
        )
    if others:  # --replace under a live API or worker: what they write is deleted
        raise CopyRefused(
            f"the target {shown(url)} has {others} other session(s) connected (a running "
            "server or worker?): --replace would delete what they write; stop them first"
        )


def _empty(connection: Connection) -> None:
    """Delete every row of the target's tables (children first), and its analysis jobs in
    procrastinate's queue (they name frame ids the copy gives to other frames)."""
    for table in reversed(Base.metadata.sorted_tables):
        connection.execute(delete(table))
    if inspect(connection).has_table("procrastinate_jobs"):
        connection.execute(
            text("DELETE FROM procrastinate_jobs WHERE queue_name = :queue"),
            {"queue": PROCRASTINATE_ANALYSIS_QUEUE},
        )


def _copy_tables(
    reading: Connection, writing: Connection, batch_rows: int, progress: Progress | None
) -> Iterator[TableCopy]:
    """Copy each table, parents first, in primary-key order; yield its row count when done."""
    insert = _copy_rows if writing.dialect.name == "postgresql" else _insert_rows
    for table in Base.metadata.sorted_tables:
        rows = 0
        for batch in _batches(reading, table, batch_rows):
            insert(writing, table, batch)
            rows += len(batch)
            if progress is not None:
                progress(table.name, rows)
        yield TableCopy(table.name, rows)


Rows = Sequence[Sequence[Any]]
"""Rows of a table, each with every column's value in the table's column order."""


def _batches(connection: Connection, table: Table, size: int) -> Iterator[Rows]:
    """The table's rows, ``size`` at a time, streamed (a server-side cursor on PostgreSQL).
    Values come through the column types: tz-aware UTC datetimes, JSON documents, booleans,
    whatever each backend stores them as."""
    query = select(table).order_by(*table.primary_key.columns)
    result = connection.execution_options(yield_per=size).execute(query)
    yield from result.partitions()


def _insert_rows(connection: Connection, table: Table, rows: Rows) -> None:
    """One executemany ``INSERT`` of ``rows``."""
    names = table.columns.keys()
    connection.execute(table.insert(), [dict(zip(names, row, strict=True)) for row in rows])


def _copy_rows(connection: Connection, table: Table, rows: Rows) -> None:
    """PostgreSQL: ``rows`` through one ``COPY ... FROM STDIN`` on the transaction's connection,
    each value bound as SQLAlchemy binds it (JSON documents, UTC datetimes): 1.4x the rate of
    psycopg's pipelined executemany, an ``INSERT`` per row (``benchmarks/db_copy.py``)."""
    dialect = connection.dialect
    quote = dialect.identifier_preparer.quote
    binds = [c.type.dialect_impl(dialect).bind_processor(dialect) for c in table.columns]
    columns = ", ".join(quote(c.name) for c in table.columns)
    driver = connection.connection.driver_connection
    assert driver is not None  # an open connection's psycopg.Connection
    with (
        driver.cursor() as cursor,
        cursor.copy(f"COPY {quote(table.name)} ({columns}) FROM STDIN") as copy,
    ):
        for row in rows:
            copy.write_row([v if b is None else b(v) for b, v in zip(binds, row, strict=True)])


def _id_tables() -> list[Table]:
    """The tables with a single integer ``id`` key (metric_series: a composite key)."""
    return [
        t
        for t in Base.metadata.sorted_tables
        if "id" in t.c and t.primary_key.columns.keys() == ["id"]
    ]


def _ids_handed_out(connection: Connection) -> dict[str, int]:
    """The highest id each table of the source ever handed out, deleted rows' included
    (SQLite's ``sqlite_sequence``, PostgreSQL's sequences): a deleted alert's or webhook's id
    must not name a new one on the copy either."""
    if connection.dialect.name == "postgresql":
        out = {}
        for table in _id_tables():
            last = connection.scalar(
                text("SELECT pg_sequence_last_value(pg_get_serial_sequence(:t, 'id'))"),
                {"t": table.name},
            )
            out[table.name] = int(last or 0)
        return out
    known = text("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sqlite_sequence'")
    if connection.scalar(known) is None:  # no AUTOINCREMENT table yet (inspect hides it)
        return {}
    rows = connection.execute(text("SELECT name, seq FROM sqlite_sequence")).all()
    return {str(name): int(seq or 0) for name, seq in rows}


def _reset_sequences(connection: Connection, handed_out: dict[str, int]) -> None:
    """Move each id counter past the largest id the source handed out: PostgreSQL's sequences
    (the copy inserted the ids itself: the next insert would collide), SQLite's
    ``sqlite_sequence`` of its AUTOINCREMENT tables (it holds the largest copied id: a
    deleted newest row's id would come back)."""
    postgres = connection.dialect.name == "postgresql"
    for table in _id_tables():
        floor = handed_out.get(table.name, 0)
        if postgres:
            connection.execute(
                text(
                    f"SELECT setval(pg_get_serial_sequence(:table, 'id'), GREATEST("
                    f"COALESCE((SELECT max(id) FROM {table.name}), 0), :floor) + 1, false)"
                ),
                {"table": table.name, "floor": floor},
            )
        elif floor and table.dialect_options["sqlite"].get("autoincrement"):
            updated = connection.execute(
                text("UPDATE sqlite_sequence SET seq = max(seq, :floor) WHERE name = :table"),
                {"table": table.name, "floor": floor},
            )
            if not updated.rowcount:
                connection.execute(
                    text("INSERT INTO sqlite_sequence (name, seq) VALUES (:table, :floor)"),
                    {"table": table.name, "floor": floor},
                )


def _verify(reading: Connection, writing: Connection, copied: tuple[TableCopy, ...]) -> None:
    """Each table's row count on the target equals the source snapshot's; else
    :class:`CopyMismatch` (raised inside the target's transaction: it is rolled back)."""
    for entry in copied:
        table = Base.metadata.tables[entry.name]
        count = select(func.count()).select_from(table)
        expected = int(reading.scalar(count) or 0)
        found = int(writing.scalar(count) or 0)
        if not expected == found == entry.rows:
            raise CopyMismatch(
                f"table {entry.name}: {expected} row(s) in the source, {entry.rows} copied, "
                f"{found} in the target; the copy was rolled back"
            )
