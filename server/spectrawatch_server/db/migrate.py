"""Apply Alembic migrations programmatically (server start, tests, CLI)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text

from spectrawatch._version import __version__

# pg_advisory_xact_lock key: API processes and workers starting together migrate one at a time
_MIGRATION_LOCK_KEY = 0x5357_4D49


class SchemaTooNew(RuntimeError):
    """The database's schema revision is unknown to this version: a newer spectrawatch
    migrated it. Alembic can neither upgrade nor read it ("Can't locate revision"), and running
    on it anyway would read and write tables this version does not know the shape of."""


def alembic_config(url: str) -> Config:
    """An Alembic config pointing at the packaged migrations for database ``url``."""
    script_location = str(resources.files("spectrawatch_server.migrations"))
    cfg = Config()
    cfg.set_main_option("script_location", script_location)
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def check_revision(connection: Connection, url: str) -> None:
    """Raise :class:`SchemaTooNew` when the database at ``url`` (open on ``connection``) is at a
    revision this version's migrations do not contain. An empty database, or one at an older
    revision, passes (the upgrade brings it to head)."""
    script = ScriptDirectory.from_config(alembic_config(url))
    current = MigrationContext.configure(connection).get_current_heads()
    known = {rev.revision for rev in script.walk_revisions()}
    unknown = [rev for rev in current if rev not in known]
    if unknown:
        raise SchemaTooNew(
            f"its schema is at revision {', '.join(unknown)}, newer than this spectrawatch "
            f"{__version__} knows (its newest: {script.get_current_head()}): a newer "
            "spectrawatch has upgraded it; run that version (or newer) on it, or restore the "
            "backup made before the upgrade (see docs/deployment.md, Migrations)"
        )


SQLITE_MIGRATION_WAIT_MS = 30 * 60 * 1000  # a start waits this long for another's upgrade


def _at_head(connection: Connection, cfg: Config) -> bool:
    """Whether the database on ``connection`` is at this version's newest revision."""
    current = set(MigrationContext.configure(connection).get_current_heads())
    return current == set(ScriptDirectory.from_config(cfg).get_heads())


def lift_timeouts(connection: Connection) -> None:
    """No statement or lock timeout for the rest of this PostgreSQL transaction (nothing to
    do on SQLite): a migration may rewrite a large table, a process starting beside another
    waits on its advisory lock for as long as that one migrates, and the start-up blob
    reconciliation and the retention sweep read or update every frame."""
    if connection.dialect.name != "postgresql":
        return
    connection.execute(text("SET LOCAL statement_timeout = 0"))
    connection.execute(text("SET LOCAL lock_timeout = 0"))


def upgrade(engine: Engine) -> None:
    """Bring the database behind ``engine`` to the newest schema; :class:`SchemaTooNew` when
    it is already past it. On SQLite the migration runs with foreign keys off (see
    :func:`foreign_keys_off`)."""
    url = engine.url.render_as_string(hide_password=False)
    cfg = alembic_config(url)
    with engine.connect() as connection, foreign_keys_off(connection), connection.begin():
        if connection.dialect.name == "postgresql":
            lift_timeouts(connection)
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
        elif not _at_head(connection, cfg):
            # the driver begins at the first INSERT, not before DDL: a batch migration's first
            # CREATE TABLE _alembic_tmp_... committed alone, and a migration stopped after it
            # (killed, disk full) left that table, which failed every later start. One
            # explicit transaction makes the whole upgrade all or nothing (a start at head
            # takes no write lock). A process starting beside one that migrates waits for it,
            # as PostgreSQL's advisory lock makes it (the busy timeout, 3 s, gave up on a
            # 10-s rebuild), and then finds the schema at head.
            waits = connection.exec_driver_sql("PRAGMA busy_timeout").scalar()
            connection.exec_driver_sql(f"PRAGMA busy_timeout = {SQLITE_MIGRATION_WAIT_MS}")
            try:
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            finally:
                connection.exec_driver_sql(f"PRAGMA busy_timeout = {int(waits or 0)}")
        check_revision(connection, url)
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


@contextlib.contextmanager
def foreign_keys_off(connection: Connection) -> Iterator[None]:
    """SQLite: foreign-key enforcement off on ``connection`` while migrations run, on again after.

    A batch migration that SQLite cannot do in place (``alter_column``, ``drop_column``) copies
    the table, DROPs the old one and renames the copy; with enforcement on, that DROP deletes
    every row referencing the table through ``ON DELETE CASCADE``: 0007's rebuild of ``run``
    emptied frame, job, metric, spectrum, scalar and alert (Alembic's batch documentation says
    to turn the pragma off). The pragma is a no-op inside a transaction, so it is set before
    one begins (the driver begins lazily, at the first write). Other dialects: nothing.
    """
    if connection.dialect.name != "sqlite":
        yield
        return
    connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    connection.commit()
    try:
        yield
    finally:
        if connection.in_transaction():
            connection.rollback()
        connection.exec_driver_sql("PRAGMA foreign_keys=ON")  # pooled: the next user expects it
        connection.commit()
