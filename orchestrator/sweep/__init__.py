"""Sweep files (load, validate, expand) and reconcile: where each run of a sweep stands."""
