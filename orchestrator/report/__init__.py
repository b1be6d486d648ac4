"""``adareg report``: a sweep in MLflow turned into the paper's figures (with seed bands) and the
statistics the paper lacks.

``collect.collect`` reads the runs in bulk into one long frame; ``stats.phase_summary`` and
``figures`` aggregate the seeds; ``render.write_report`` writes the report directory.
"""

DEFAULT_BASELINE = "wd-1e-4"
"""The scheme others are compared with: constant weight decay 1e-4, the paper's sparse-gradient setting."""
