"""HTTP API v1: one routes module per resource, shared dependencies in ``deps``."""
