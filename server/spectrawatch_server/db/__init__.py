"""Database models and sessions (SQLAlchemy 2, typed ORM); schema owned by Alembic."""
