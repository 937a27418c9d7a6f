"""The ``spectrawatch`` command. Server-side commands import the ``[server]`` extra lazily."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from spectrawatch._version import __version__

Command = Callable[[argparse.Namespace], int]

# settings that a flag of `server` / `worker` can set: the flag is named in errors when given
_FLAGS = {
    "host": "host",
    "port": "port",
    "data_dir": "data_dir",
    "device": "device",
    "require_auth": "require_auth",
    "run_worker": "no_worker",
}

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's
LOG_LEVEL_HELP = f"{', '.join(LOG_LEVELS)} (default SPECTRAWATCH_LOG_LEVEL, else info)"


class CommandError(Exception):
    """A command that cannot run; each line of the message is printed as ``error: <line>``."""


def _setting_label(args: argparse.Namespace, name: str) -> str:
    """``--flag`` when the command line set the setting, else ``SPECTRAWATCH_<NAME>``."""
    flag = _FLAGS.get(name)
    if flag is not None and getattr(args, flag, None) not in (None, False):
        return "--" + flag.replace("_", "-")
    return f"SPECTRAWATCH_{name.upper()}"


def _server_settings(args: argparse.Namespace, **overrides: Any) -> Any:
    """ServerSettings from the environment, with command-line flags taking precedence."""
    try:
        from pydantic import ValidationError

        from spectrawatch_server.config import ServerSettings
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SystemExit(
            f"the server is not installed: pip install 'spectrawatch[server]' ({exc})"
        ) from exc
    values = {k: v for k, v in overrides.items() if v is not None}
    if getattr(args, "data_dir", None) is not None:
        values["data_dir"] = Path(args.data_dir)
    try:
        return ServerSettings(**values)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            name = str(error["loc"][0]) if error["loc"] else "settings"
            reason = error["msg"].removeprefix("Value error, ")
            lines.append(f"{_setting_label(args, name)}: {reason}")
        raise CommandError("\n".join(lines)) from None


def _startup_check(args: argparse.Namespace, check: Callable[[], Any]) -> Any:
    """Run a start-up check, turning its refusal into a :class:`CommandError`."""
    from spectrawatch_server.config import SettingError
    from spectrawatch_server.startup import StartupError

    try:
        return check()
    except SettingError as exc:
        raise CommandError(f"{_setting_label(args, exc.name)}: {exc.reason}") from None
    except StartupError as exc:
        raise CommandError(str(exc)) from None


def _log_level(args: argparse.Namespace) -> str:
    """``--log-level``, else ``SPECTRAWATCH_LOG_LEVEL`` (empty: unset), else ``info``; checked up
    front like the other settings (uvicorn failed on an unknown level with a traceback, after
    the server had printed that it was serving)."""
    flag = args.log_level is not None
    raw = args.log_level if flag else os.environ.get("SPECTRAWATCH_LOG_LEVEL") or "info"
    if raw.lower() not in LOG_LEVELS:
        label = "--log-level" if flag else "SPECTRAWATCH_LOG_LEVEL"
        raise CommandError(f"{label}: must be one of {', '.join(LOG_LEVELS)}, got {raw!r}")
    return str(raw.lower())


def cmd_server(args: argparse.Namespace) -> int:
    """Serve the API, dashboards and the in-process worker with uvicorn.

    Every check runs before anything is printed or started; an embedded server holds the data
    directory's lock (:func:`~spectrawatch_server.startup.lock_data_dir`) until it exits.
    """
    import uvicorn

    from spectrawatch_server import startup
    from spectrawatch_server.app import create_app

    log_level = _log_level(args)
    settings = _server_settings(
        args,
        host=args.host,
        port=args.port,
        require_auth=True if args.require_auth else None,
        run_worker=False if args.no_worker else None,
        device=args.device,
    )
    if args.workers < 1:
        raise CommandError(f"--workers: must be >= 1, got {args.workers}")
    if args.workers > 1 and settings.queue != "procrastinate":
        raise CommandError(
            "--workers > 1 needs the PostgreSQL queue (SPECTRAWATCH_QUEUE=procrastinate): "
            "the embedded queue and its in-process worker belong to one process"
        )
    _startup_check(args, settings.check_startable)
    _startup_check(args, lambda: startup.make_data_dir(settings.data_dir))
    with contextlib.ExitStack() as held:
        if settings.queue == "embedded":
            held.enter_context(
                _startup_check(args, lambda: startup.lock_data_dir(settings.data_dir))
            )
        _startup_check(args, lambda: startup.check_port_free(settings.host, settings.port))
        _startup_check(args, lambda: startup.check_device(settings.device))
        _startup_check(args, lambda: _check_database(settings))
        print(
            f"spectrawatch {__version__} serving on {settings.base_url} "
            f"(data in {settings.data_dir})"
        )
        print(f"  API docs: {settings.base_url}/docs", flush=True)
        _log_to_stderr(log_level)
        app: Any = create_app(settings)
        if args.workers > 1:  # uvicorn starts each process from an import string: env settings
            _export_settings(settings)
            app = "spectrawatch_server.app:create_served_app"
        uvicorn.run(
            app,
            factory=args.workers > 1,
            workers=args.workers,
            host=settings.host,
            port=settings.port,
            log_level=log_level,
            timeout_graceful_shutdown=5,
        )
    return 0


def _check_database(settings: Any) -> None:
    """The database opened as the server's engine will open it (timeouts, pooling mode)."""
    from spectrawatch_server import startup

    startup.check_database(
        settings.resolved_database_url,
        statement_timeout=settings.db_statement_timeout_seconds,
        lock_timeout=settings.db_lock_timeout_seconds,
        transaction_pooling=settings.db_transaction_pooling,
    )


def _export_settings(settings: Any) -> None:
    """Put the settings that command-line flags can change into ``SPECTRAWATCH_*`` env vars, so
    worker processes started by uvicorn read the same values."""
    for name in ("host", "port", "require_auth", "run_worker", "device", "data_dir"):
        os.environ[f"SPECTRAWATCH_{name.upper()}"] = str(getattr(settings, name))


def _log_to_stderr(level: str) -> None:
    """The server's own log lines (analysed frames, alerts, start-up clean-up) at ``level``:
    uvicorn configures only its loggers, which left every ``spectrawatch_server`` INFO line
    unprinted."""
    import logging

    numeric = getattr(logging, level.upper(), logging.DEBUG)  # uvicorn's "trace": debug here
    logging.basicConfig(level=numeric, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its per-migration INFO lines
    # httpx logs each request's full URL at INFO; a webhook's URL can be its receiver's
    # credential (Slack's and Discord's incoming webhooks, a ?token= query)
    logging.getLogger("httpx").setLevel(max(numeric, logging.WARNING))


def cmd_worker(args: argparse.Namespace) -> int:
    """Consume analysis jobs from the procrastinate queue (scale-out mode)."""
    _log_to_stderr(_log_level(args))
    from spectrawatch_server import startup, worker_main

    settings = _server_settings(args, queue="procrastinate", device=args.device)
    try:
        worker_main.check_config(settings, args.concurrency)
    except worker_main.WorkerConfigError as exc:
        raise CommandError(str(exc)) from None
    _startup_check(args, lambda: startup.check_device(settings.device))
    _startup_check(args, lambda: _check_database(settings))
    return worker_main.run(settings, args.concurrency, args.name)


CLI_SQLITE_LOCK_SECONDS = 30.0  # offline token commands on a live SQLite file


def _open_db(args: argparse.Namespace, create: bool = False) -> Any:
    """Session factory on the server's database (migrated), for offline admin commands.

    Only ``create`` makes a missing data directory and SQLite database (``token create`` may
    bootstrap a server); otherwise a missing one is a typo, refused.
    """
    from spectrawatch_server import startup
    from spectrawatch_server.db import migrate
    from spectrawatch_server.db.session import make_engine, make_session_factory

    settings = _server_settings(args)
    database = settings.sqlite_path
    if not create and database is not None and not database.exists():
        raise CommandError(
            f"no spectrawatch database at {database}: check --data-dir / SPECTRAWATCH_DATA_DIR"
        )
    if create:
        _startup_check(args, lambda: startup.make_data_dir(settings.data_dir))
    _startup_check(args, lambda: _check_database(settings))
    engine = make_engine(
        settings.resolved_database_url,
        # SQLite: wait for a running server's write lock as long as before (the API's busy
        # timeout is its 3 s lock timeout now), not without a limit
        lock_timeout=CLI_SQLITE_LOCK_SECONDS if database is not None else 0.0,
        transaction_pooling=settings.db_transaction_pooling,
    )
    migrate.upgrade(engine)
    return make_session_factory(engine)


def cmd_token_create(args: argparse.Namespace) -> int:
    """Create a project-scoped (or server-wide) API token and print it once (only its hash is
    stored)."""
    from pydantic import ValidationError

    from spectrawatch.wire import DOT_NAMES
    from spectrawatch_server.schemas import ProjectCreate
    from spectrawatch_server.storage import repository as repo

    if args.all_projects:
        with _open_db(args, create=True).begin() as session:
            token, secret = repo.create_token(session, None, args.name or "", args.role)
            token_id = token.id
        return _print_new_token(secret, token_id, args.role, "every project")

    refused = CommandError(
        f"--project: {args.project!r} is not a valid project name (1-200 characters, "
        "not blank, not '.' or '..', no '/' and no control characters)"
    )
    try:
        ProjectCreate(name=args.project)  # the API's rule for new project names
        valid = True
    except ValidationError:
        if args.project not in DOT_NAMES:
            raise refused from None
        valid = False  # "." or "..": only for a project stored before they were refused
    try:
        sessions = _open_db(args, create=valid)
    except CommandError:
        if valid:
            raise
        raise refused from None  # no database: no such project either
    with sessions.begin() as session:
        if not valid and repo.get_project(session, args.project) is None:
            raise refused
        project, _ = repo.get_or_create_project(session, args.project)
        token, secret = repo.create_token(session, project, args.name or "", args.role)
        token_id = token.id
    return _print_new_token(secret, token_id, args.role, f"project {args.project!r}")


def _print_new_token(secret: str, token_id: int, role: str, scope: str) -> int:
    """Print a new token's secret (stdout, for scripts) and what it is (stderr); exit 0."""
    print(secret)
    print(
        f"token {token_id} ({role}) for {scope}; store it now, it is not shown again",
        file=sys.stderr,
    )
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    from spectrawatch_server.storage import repository as repo

    with _open_db(args)() as session:
        for token, project in repo.list_tokens(session):
            state = f"revoked {token.revoked_at:%Y-%m-%d}" if token.revoked_at else "active"
            scope = "*" if project is None else project  # server-wide
            print(f"{token.id}\t{scope}\t{token.role}\t{token.prefix}…\t{token.name}\t{state}")
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from spectrawatch_server.storage import repository as repo

    with _open_db(args).begin() as session:
        # an id beyond the database's 64-bit integers names no token (SQLite would overflow)
        revoked = 0 < args.id < 2**63 and repo.revoke_token(session, args.id)
    if not revoked:
        print(f"error: no active token with id {args.id}", file=sys.stderr)
        return 1
    print(f"token {args.id} revoked")
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    """Give the SQLite database's free pages back to the file system (``VACUUM``), offline.

    A database made before incremental auto-vacuum keeps the pages of deleted runs inside the
    file (SQLite reuses them but never returns them); this VACUUM gives them back and switches
    the file to ``auto_vacuum=INCREMENTAL``, after which the server returns a deleted run's
    pages itself. The write-ahead log is cut back too. The server must be stopped:
    the command takes the data directory's lock, and ``VACUUM`` needs up to the database's size
    again in free disk space while it copies.
    """
    import sqlite3

    from spectrawatch_server import startup

    settings = _server_settings(args)
    database = settings.sqlite_path
    if database is None:
        raise CommandError(
            "compact is for the SQLite database; PostgreSQL's autovacuum reuses freed space "
            "(VACUUM FULL on its tables gives it back to the file system)"
        )
    if not database.exists():
        raise CommandError(
            f"no spectrawatch database at {database}: check --data-dir / SPECTRAWATCH_DATA_DIR"
        )
    files = [database, database.with_name(database.name + "-wal")]

    def size() -> int:
        return sum(f.stat().st_size for f in files if f.exists())

    with _startup_check(args, lambda: startup.lock_data_dir(settings.data_dir)):
        _startup_check(args, lambda: _check_database(settings))
        before = size()
        connection = sqlite3.connect(database, isolation_level=None)  # VACUUM: no transaction
        try:
            connection.execute("PRAGMA busy_timeout=30000")
            # a database made before incremental auto-vacuum switches to it with this
            # VACUUM: from then on the server gives deleted runs' pages back by itself
            connection.execute("PRAGMA auto_vacuum=INCREMENTAL")
            connection.execute("VACUUM")
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            raise CommandError(f"cannot compact {database}: {exc}") from None
        finally:
            connection.close()
        after = size()
    print(
        f"compacted {database}: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB "
        f"({(before - after) / 2**20:.1f} MiB given back)"
    )
    return 0


DATA_DIR_HELP = "the server's data directory (default SPECTRAWATCH_DATA_DIR, else ~/.spectrawatch)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spectrawatch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"spectrawatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    server = sub.add_parser("server", help="run the server (API + dashboards + worker)")
    server.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    server.add_argument("--port", type=int, default=None, help="port (default 8765)")
    server.add_argument(
        "--data-dir", default=None, help="SQLite database and blobs (default ~/.spectrawatch)"
    )
    server.add_argument(
        "--require-auth", action="store_true", help="refuse requests without a token"
    )
    server.add_argument("--no-worker", action="store_true", help="do not run the in-process worker")
    server.add_argument("--device", default=None, help="worker device: auto, cpu, cuda, cuda:N")
    server.add_argument(
        "--workers",
        type=int,
        default=1,
        help="API processes (PostgreSQL queue only; analysis runs in `spectrawatch worker`)",
    )
    server.add_argument("--log-level", default=None, help=LOG_LEVEL_HELP)
    server.set_defaults(func=cmd_server)

    worker = sub.add_parser("worker", help="run an analysis worker (PostgreSQL + procrastinate)")
    worker.add_argument(
        "--device", default=None, help="auto, cpu, cuda, cuda:N (one GPU per worker)"
    )
    worker.add_argument("--concurrency", type=int, default=1, help="worker processes (CPU only)")
    worker.add_argument("--name", default=None, help="worker name (default host-pid-device)")
    worker.add_argument("--data-dir", default=None, help="blob directory root, as the API's")
    worker.add_argument("--log-level", default=None, help=LOG_LEVEL_HELP)
    worker.set_defaults(func=cmd_worker)

    token = sub.add_parser("token", help="manage API tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", help="create a token scoped to a project")
    scope = create.add_mutually_exclusive_group(required=True)
    scope.add_argument("--project", help="the project the token may see (made if missing)")
    scope.add_argument(
        "--all-projects",
        action="store_true",
        help="a server-wide token: every project, present and future (give it --role read "
        "for a dashboard of them all)",
    )
    create.add_argument("--name", default="", help="a label, shown by `token list`")
    create.add_argument(
        "--role",
        choices=("read", "write", "admin"),
        default="write",
        help="read: GET only (dashboards); write (default): what a training run needs; "
        "admin: also deletions, alert rules, webhooks",
    )
    create.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    create.set_defaults(func=cmd_token_create)
    listing = token_sub.add_parser("list", help="list tokens (ids, projects, roles, prefixes)")
    listing.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    listing.set_defaults(func=cmd_token_list)
    revoke = token_sub.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("id", type=int, help="the token's id (`token list`)")
    revoke.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    revoke.set_defaults(func=cmd_token_revoke)
    compact = sub.add_parser(
        "compact",
        help="give a stopped server's free SQLite pages back to the disk (VACUUM)",
        description=cmd_compact.__doc__,
    )
    compact.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    compact.set_defaults(func=cmd_compact)
    from spectrawatch._cli_db import add_db_commands  # db copy

    add_db_commands(sub)
    from spectrawatch._cli_alerts import add_alerts_commands  # alerts list|ack|rules|set|reset
    from spectrawatch._demo import add_demo_command

    add_alerts_commands(sub)
    add_demo_command(sub)
    from spectrawatch._cli_tools import add_tool_commands  # analyze|runs|export|import|sync|doctor

    add_tool_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; exit 1 without a traceback when stdout's reader went away (``| head``),
    as the Python docs' recipe for SIGPIPE does, for every command alike."""
    try:
        code = _run(argv)
        sys.stdout.flush()  # output that fit in the buffer meets the closed pipe here
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at devnull so that flush succeeds
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return code


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    func: Command = args.func
    try:
        return func(args)
    except CommandError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
