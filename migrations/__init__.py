"""Alembic migrations for the reverse-image-search schema (see ingest/models.py)."""
