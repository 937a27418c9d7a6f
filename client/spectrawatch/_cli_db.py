"""``spectrawatch db copy``: move a whole server's database (SQLite to PostgreSQL, or any other
pair) with everything in it. The work is :mod:`spectrawatch_server.db.transfer`, imported when
the command runs (the ``[server]`` extra)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from pathlib import Path
from typing import Any

from spectrawatch.cli import CommandError, _startup_check

DATABASE_FILE = "spectrawatch.db"  # a data directory's SQLite database (ServerSettings)
PROGRESS_ROWS = 1_000_000  # a progress line on stderr every this many rows of a table


def database_url(value: str) -> str:
    """A ``sqlite:///`` or ``postgresql+psycopg://`` URL as given; a path to a ``.db`` file or
    an existing file is that SQLite file; any other path is a data directory (its
    ``spectrawatch.db``)."""
    if "://" in value:
        return value
    path = Path(value).expanduser()
    if path.suffix != ".db" and not path.is_file():
        path = path / DATABASE_FILE
    return f"sqlite:///{path.resolve()}"


def _sqlite_dir(url: str) -> Path | None:
    """The directory of a SQLite URL's file (its data directory), else None."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).parent


def _hold_locks(args: argparse.Namespace, held: contextlib.ExitStack, urls: list[str]) -> None:
    """Take the data-directory lock of each SQLite side that has one (``server.lock``), as a
    server does: refused while a server runs on it, and none starts until the copy ends."""
    from spectrawatch_server import startup

    for url in urls:
        folder = _sqlite_dir(url)
        if folder is not None and (folder / startup.LOCK_FILE).exists():
            held.enter_context(
                _startup_check(args, functools.partial(startup.lock_data_dir, folder))
            )


def cmd_db_copy(args: argparse.Namespace) -> int:
    """``db copy``: check both sides, copy, verify, then say what to set on the new server."""
    from spectrawatch_server.db import transfer

    if (args.blobs_from is None) != (args.blobs_to is None):
        raise CommandError("--blobs-from and --blobs-to go together")
    if args.blobs_from is not None and not Path(args.blobs_from).is_dir():
        raise CommandError(f"--blobs-from {args.blobs_from}: no such directory")
    source, target = database_url(args.source), database_url(args.target)
    print(f"copying {transfer.shown(source)} to {transfer.shown(target)}", flush=True)

    def progress(table: str, rows: int) -> None:
        if rows >= PROGRESS_ROWS and rows % PROGRESS_ROWS < args.batch_rows:
            print(f"  {table}: {rows:,} rows...", file=sys.stderr, flush=True)

    with contextlib.ExitStack() as held:
        _hold_locks(args, held, [source, target])
        try:
            report = transfer.copy_database(
                source,
                target,
                replace=args.replace,
                allow_waiting=args.allow_pending,
                batch_rows=args.batch_rows,
                progress=progress,
            )
        except (transfer.CopyRefused, transfer.CopyMismatch) as exc:
            raise CommandError(str(exc)) from None
    _print_report(report)
    return _blobs(args, report, source, target)


def _print_report(report: Any) -> None:
    width = max(len(t.name) for t in report.tables)
    for table in report.tables:
        print(f"  {table.name:<{width}}  {table.rows:>12,} rows")
    rate = report.rows / report.seconds if report.seconds > 0 else 0.0
    print(
        f"copied {report.rows:,} rows of {len(report.tables)} tables in {report.seconds:.1f} s "
        f"({rate:,.0f} rows/s) at schema revision {report.revision}; row counts verified"
    )
    if report.other_sessions:
        print(
            f"warning: {report.other_sessions} other session(s) were connected to the source; "
            "what they wrote after the copy started is not in the target",
            file=sys.stderr,
        )
    if report.waiting_frames:
        print(
            f"note: {report.waiting_frames} frame(s) were copied waiting for analysis: a target "
            "served with the embedded queue runs their copied jobs; with the PostgreSQL queue "
            "(SPECTRAWATCH_QUEUE=procrastinate) queue them with `spectrawatch runs reanalyze`",
            file=sys.stderr,
        )


def _blobs(args: argparse.Namespace, report: Any, source: str, target: str) -> int:
    """Copy the frames' blob files (``--blobs-from/--blobs-to``), or say where they stay; the
    exit status: 1 when blobs were missing from ``--blobs-from`` or skipped."""
    from spectrawatch_server.db import transfer

    if args.blobs_from is not None:
        done = transfer.copy_blob_files(target, Path(args.blobs_from), Path(args.blobs_to))
        print(
            f"blobs: {done.copied:,} copied ({done.bytes / 2**20:,.1f} MiB), {done.present:,} "
            f"already there, {done.missing:,} missing in {args.blobs_from}; set "
            f"SPECTRAWATCH_BLOB_DIR={Path(args.blobs_to).resolve()} for the new server"
        )
        if done.invalid:
            shown = ", ".join(str(i) for i in done.invalid[:10])
            more = f" and {len(done.invalid) - 10} more" if len(done.invalid) > 10 else ""
            print(
                f"warning: {len(done.invalid):,} frames have a blob key that is no path inside "
                f"the store (frames {shown}{more}): not copied",
                file=sys.stderr,
            )
        if done.missing:
            print(
                f"warning: {done.missing:,} frames' blobs are not in {args.blobs_from}: their "
                "frames cannot be re-analysed (runs reanalyze) on the new server",
                file=sys.stderr,
            )
        return 1 if done.missing or done.invalid else 0
    if not report.blob_frames:
        return 0
    folder = _sqlite_dir(source)
    where = f" (a data directory's default: {folder / 'blobs'})" if folder is not None else ""
    print(
        f"blobs: {report.blob_frames:,} frames name files of the source's blob store{where}; "
        "set SPECTRAWATCH_BLOB_DIR to that directory for the new API and workers (or copy it: "
        "--blobs-from/--blobs-to); an S3 store (SPECTRAWATCH_BLOB_URL) stays as it is"
    )
    return 0


def add_db_commands(subparsers: Any) -> None:
    """Register ``db copy``."""
    db = subparsers.add_parser("db", help="database administration (copy a whole server)")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    copy = db_sub.add_parser(
        "copy",
        help="copy every table of a stopped server's database into an empty one",
        description="Copy a whole server (projects, runs, frames, metrics, spectra, scalars, "
        "alerts, rules, webhooks, deliveries, tokens) into another database, e.g. from the "
        "embedded SQLite to PostgreSQL: the target is migrated to the source's schema and must "
        "be empty; ids are kept; row counts are checked; the source's server must be stopped. "
        "See docs/deployment.md, Moving from SQLite to PostgreSQL.",
    )
    copy.add_argument(
        "--from",
        dest="source",
        metavar="SOURCE_URL",
        required=True,
        help="the source: a database URL, or a data directory / .db file (SQLite)",
    )
    copy.add_argument(
        "--to",
        dest="target",
        metavar="TARGET_URL",
        required=True,
        help="the target: postgresql+psycopg://user:pass@host/db, or a data directory / .db file",
    )
    copy.add_argument(
        "--replace",
        action="store_true",
        help="delete the target's rows first (default: refuse a target that has any)",
    )
    copy.add_argument(
        "--allow-pending",
        action="store_true",
        help="copy frames still waiting for analysis (default: refuse; see the docs)",
    )
    copy.add_argument(
        "--blobs-from",
        metavar="DIR",
        default=None,
        help="also copy the frames' blob files from this directory",
    )
    copy.add_argument(
        "--blobs-to", metavar="DIR", default=None, help="... into this one (SPECTRAWATCH_BLOB_DIR)"
    )
    copy.add_argument(
        "--batch-rows",
        metavar="N",
        type=_positive,
        default=5000,
        help="rows per read and insert (5000)",
    )
    copy.set_defaults(func=cmd_db_copy)


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number
