"""Alembic migrations (env.py, versions/); shipped as package data beside api/."""
