"""Persistence: the blob store (tensor bytes) and the repository (all SQL)."""
