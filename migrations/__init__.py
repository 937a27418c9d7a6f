"""Alembic environment and versions; applied automatically on server start."""
