"""Tracking URIs: which store a URI names, made absolute for workers started elsewhere, and UI links."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(uri: str | None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else MLflow's default ``sqlite:///mlflow.db``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite://`` URI, parsed as SQLAlchemy parses it (query arguments such as
    ``?timeout=60`` and ``%20`` escapes understood); None for other stores and in-memory sqlite."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    return Path(database) if database and database != ":memory:" else None


def absolute_tracking_uri(uri: str) -> str:
    """``uri`` with a relative sqlite path made absolute (query arguments kept), so that workers started in
    other folders find the same store."""
    path = sqlite_path(uri)
    if path is None or path.is_absolute():
        return uri
    from sqlalchemy.engine import make_url

    return make_url(uri).set(database=str(path.resolve())).render_as_string(hide_password=False)


def store_exists(uri: str) -> bool:
    """False only for a sqlite store whose file does not exist yet (nothing has been run there)."""
    path = sqlite_path(uri)
    return path is None or path.exists()


def ui_url(base: str, experiment_id: str | None = None) -> str:
    """A link into the MLflow UI that opens on the training runs: MLflow 3.17's UI starts in its GenAI
    mode (traces overview) whatever the experiment's kind; ``workflowType=machine_learning`` switches it
    to "Model training", and the UI remembers the choice."""
    page = f"experiments/{experiment_id}" if experiment_id else "experiments"
    return f"{base.rstrip('/')}/#/{page}?workflowType=machine_learning"

