"""Sweep files (schema, loading with one-line errors, expansion into planned runs) and reconcile."""
