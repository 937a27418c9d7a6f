"""Alembic environment: the URL comes from the caller's config or the server settings."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from spectrawatch_server.db.models import Base
from spectrawatch_server.db.session import make_engine

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from spectrawatch_server.config import get_settings

    return get_settings().resolved_database_url


def _include_name(name: str | None, type_: str, parents: object) -> bool:
    """procrastinate owns its tables (scale-out mode); they are not part of our schema."""
    return not (type_ == "table" and (name or "").startswith("procrastinate_"))


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,  # ALTER TABLE support on SQLite
        compare_type=True,
        include_name=_include_name,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(
        url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
    else:
        from spectrawatch_server.db.migrate import foreign_keys_off

        engine = make_engine(_url())
        with engine.connect() as conn, foreign_keys_off(conn):
            _run(conn)
        engine.dispose()
