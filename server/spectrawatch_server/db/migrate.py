"""Apply Alembic migrations programmatically (server start, tests, CLI)."""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, text

# pg_advisory_xact_lock key: API processes and workers starting together migrate one at a time
_MIGRATION_LOCK_KEY = 0x5357_4D49


def alembic_config(url: str) -> Config:
    """An Alembic config pointing at the packaged migrations for database ``url``."""
    script_location = str(resources.files("spectrawatch_server.migrations"))
    cfg = Config()
    cfg.set_main_option("script_location", script_location)
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(engine: Engine) -> None:
    """Bring the database behind ``engine`` to the newest schema."""
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")
