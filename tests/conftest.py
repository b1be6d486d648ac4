"""Shared test settings: never touch the network, the user's cache, ./mlflow.db or ./adareg_runs."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # test helpers such as cifar_archives

pytest_plugins = ["servers", "containers"]  # real PostgreSQL, mlflow server, Ray cluster; Docker images

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ["ADAREG_NO_DOWNLOAD"] = "1"
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A temp working directory with its own MLflow store, runs dir and data dir."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("ADAREG_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> dict[str, dict]:
    """``{run_key: history without timing}`` of ``e2e.four_runs`` (10 epochs each) trained once, uninterrupted,
    by one orchestrator on this host: what several hosts or containers sharing a store must reproduce."""
    from e2e import four_runs, reference_histories

    tmp = tmp_path_factory.mktemp("four-runs-reference")
    return reference_histories(tmp, four_runs(tmp / "s.yaml"))


@pytest.fixture(scope="session")
def fashion_files() -> str:
    """Debian's Fashion-MNIST folder (``apt-get install dataset-fashion-mnist``; ``.ci/run`` installs it). Tests
    that train on the real files skip where it is missing, except in CI, where a missing package fails them."""
    from training import fashion

    if all(os.path.isfile(os.path.join(fashion.DEBIAN_DIR, f"{name}.gz")) for name in fashion.FILES):
        return fashion.DEBIAN_DIR
    if os.environ.get("CI"):
        pytest.fail(f"{fashion.DEBIAN_DIR} lacks the Fashion-MNIST files: .ci/run installs dataset-fashion-mnist")
    pytest.skip("Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
