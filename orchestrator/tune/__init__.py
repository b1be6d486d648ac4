"""Optuna search over taper schedules, launched like a sweep."""
