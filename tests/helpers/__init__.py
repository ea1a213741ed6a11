"""Shared test helpers, built on production functions and published contracts."""
