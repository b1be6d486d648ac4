"""The image of docker/ built and run for real (issue: containers for real): built from a clean checkout
with a small context, a sweep in a container as a non-root user, ``docker stop`` mid-sweep, a second
container finishing, two containers with host networking sharing one store, the report written to a
mounted folder, and ``--gpus all`` as docker/README.md explains it. All on host networking."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
from containers import (
    IMAGE,
    ROOT,
    SMALL_CONTEXT,
    build,
    buildkit_unavailable,
    context_bytes,
    docker,
    docker_unavailable,
)
from e2e import FOUR_RUNS_EPOCHS, Store, assert_trained_once, epochs_done, four_runs, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.skipif(docker_unavailable() is not None,
                                                   reason=str(docker_unavailable()))]

USER = 1000  # the image's default user (ADAREG_UID)


def folders(tmp_path: Path, *names: str) -> list[Path]:
    """Host folders for bind mounts, owned by the image's user (README: ADAREG_UID=$(id -u) does this)."""
    out = []
    for name in names:
        d = tmp_path / name
        d.mkdir()
        os.chown(d, USER, USER) if os.geteuid() == 0 else d.chmod(0o777)
        out.append(d)
    return out


def run_args(store: Path, runs: Path, sweep: Path, *extra: str) -> list[str]:
    """``docker run --init`` as docker/README.md says, with host networking and the test's mounts."""
    return ["run", "--init", "--network", "host", "-v", f"{store}:/work/store", "-v", f"{runs}:/work/adareg_runs",
            "-v", f"{sweep}:/work/tiny.yaml:ro", "-e", "MLFLOW_TRACKING_URI=sqlite:////work/store/mlflow.db",
            *extra]


def sweep_in(name: str, store: Path, runs: Path, sweep: Path, *extra: str) -> list[str]:
    return [*run_args(store, runs, sweep, "--name", name, "-d", *extra), IMAGE, "sweep", "run", "tiny.yaml",
            "--gpus", "none", "--max-parallel", "2"]


def wait_exit(name: str, timeout: float = 600) -> int:
    done = docker("wait", name, timeout=timeout)
    return int(done.stdout.strip())


def logs(name: str) -> str:
    done = docker("logs", name, check=False)
    return (done.stdout + done.stderr)[-4000:]


@pytest.fixture
def containers():
    names: list[str] = []
    yield names
    for name in names:
        docker("rm", "-f", "-v", name, check=False)


def test_the_image_builds_from_a_clean_checkout_with_a_small_context(image):
    user = docker("run", "--rm", "--network", "host", "--entrypoint", "id", image).stdout.split()
    assert user[0] == f"uid={USER}(adareg)", user
    assert "usage" in docker("run", "--rm", "--init", "--network", "host", image, "--help").stdout.lower()


@pytest.mark.skipif(buildkit_unavailable() is not None if docker_unavailable() is None else True,
                    reason=str(buildkit_unavailable() if docker_unavailable() is None else docker_unavailable()))
def test_buildkit_sends_docker_dockerfile_the_same_small_context(checkout, build_args):
    """BuildKit looks for ``docker/Dockerfile.dockerignore`` first, then the root ``.dockerignore``; a probe
    beside docker/Dockerfile (so resolved the same way) lists the context BuildKit sends: exactly what
    the image copies. (The image itself is built once a session, by the legacy builder: a second full
    build would double the Docker tests' time; the compose test builds its server images with BuildKit.)"""
    assert not (checkout / "docker" / "Dockerfile.dockerignore").exists()
    probe = checkout / "docker" / "context-probe.Dockerfile"
    probe.write_text(f"FROM {build_args['PYTHON_IMAGE']}\nCOPY . /ctx\nRUN cd /ctx && ls -A && du -sb .\n")
    try:
        done = build(checkout, "adareg-context-probe", "docker/context-probe.Dockerfile", {}, buildkit=True,
                     no_cache=True)
    finally:
        probe.unlink()
    out = done.stdout + done.stderr
    assert context_bytes(out) < SMALL_CONTEXT, out[-3000:]
    listed = set(re.findall(r"^#\d+ [\d.]+ (\S+)$", out, re.M))
    assert {"pyproject.toml", "README.md", "training", "orchestrator", "sweeps"} <= listed, out[-3000:]
    assert not listed & {".venv", ".git", "tests", "docker", "benchmarks"}, listed


def test_docker_stop_then_docker_kill_mid_sweep_then_a_third_container_finishes_and_the_report_is_written(
        image, tmp_path, containers):
    """``docker stop`` ends runs resumably; ``docker kill`` leaves them RUNNING with their claims, which a new
    container on the same volumes (another PID namespace of the same kernel) takes back at once: the claims
    name the run folders' lock files that its workers then hold. (Here the kernel often gives the new
    container the dead one's PID-namespace number, so the claim also looks like this namespace's and its dead
    pid is looked up; test_hosts.py's killed-namespace test covers a fresh number.)"""
    store, runs, report = folders(tmp_path, "store", "runs", "report")
    sweep = four_runs(tmp_path / "tiny.yaml")
    containers += ["adareg-test-first", "adareg-test-second", "adareg-test-third"]
    docker(*sweep_in("adareg-test-first", store, runs, sweep))
    wait_until(lambda: epochs_done(runs) >= 4, 300, "four epochs in the first container")
    started = time.monotonic()
    docker("stop", "-t", "30", "adareg-test-first", timeout=60)
    took = time.monotonic() - started
    code = wait_exit("adareg-test-first")
    assert code == 143, (code, logs("adareg-test-first"))
    assert took < 10, f"docker stop took {took:.1f}s (SIGTERM not handled?)"

    plan = docker(*run_args(store, runs, sweep, "--rm"), image, "sweep", "plan", "tiny.yaml", "--format", "json")
    states = [r["state"] for r in json.loads(plan.stdout)]
    # the stopped runs are resumable, none failed (a run may have finished before the stop on a fast machine)
    assert len(states) == 4 and set(states) <= {"done", "resumable", "pending"} and "resumable" in states, states

    before = epochs_done(runs)
    docker(*sweep_in("adareg-test-second", store, runs, sweep))
    wait_until(lambda: epochs_done(runs) >= before + 2, 300, "two more epochs in the second container")
    docker("kill", "adareg-test-second")  # SIGKILL to every process: no run is marked, no claim released
    assert wait_exit("adareg-test-second") == 137, logs("adareg-test-second")
    db = Store(f"sqlite:///{store}/mlflow.db")
    killed = {r["run_id"] for r in db.runs() if r["status"] == "RUNNING"}
    assert killed, db.runs()

    started = time.monotonic()
    docker(*sweep_in("adareg-test-third", store, runs, sweep))
    assert wait_exit("adareg-test-third") == 0, logs("adareg-test-third")
    took = time.monotonic() - started
    assert took < 200, f"the killed container's runs were taken back after {took:.0f}s (a lease is 300 s)"
    active = db.active()
    assert len(active) == 4 and {r["status"] for r in active.values()} == {"FINISHED"}, active
    for run in active.values():
        db.assert_once_per_epoch(run["run_id"], FOUR_RUNS_EPOCHS)
    assert all(r["status"] != "RUNNING" for r in db.runs())
    assert not [r for r in db.runs() if r["superseded"]], db.runs()
    assert killed <= {r["run_id"] for r in active.values()}  # resumed in their own MLflow runs

    docker(*run_args(store, runs, sweep, "--rm", "-v", f"{report}:/work/report"), image,
           "report", "tiny.yaml", "--out", "report", timeout=300)
    figures = sorted(report.rglob("*.png"))
    assert figures and all(f.stat().st_size > 1000 for f in figures), sorted(report.rglob("*"))
    assert {p.stat().st_uid for p in report.rglob("*")} == {USER}


def test_two_containers_with_host_networking_share_one_store(image, tmp_path, reference, containers):
    """Host networking gives both containers the host's hostname but not its process table: neither may
    take the other's runs for dead."""
    store, runs_a, runs_b = folders(tmp_path, "store", "runs-a", "runs-b")
    sweep = four_runs(tmp_path / "tiny.yaml")
    containers += ["adareg-test-a", "adareg-test-b"]
    docker(*sweep_in("adareg-test-a", store, runs_a, sweep))
    wait_until(lambda: epochs_done(runs_a) >= 1, 300, "an epoch in the first container")  # the store exists
    docker(*sweep_in("adareg-test-b", store, runs_b, sweep))
    for name in containers:
        assert wait_exit(name) == 0, logs(name)
    assert_trained_once(Store(f"sqlite:///{store}/mlflow.db"), reference, FOUR_RUNS_EPOCHS, [runs_a, runs_b])


def test_gpus_all_is_harmless_with_the_nvidia_runtime_and_explained_without_it(image):
    """docker/README.md runs the image with ``--gpus all``; without the NVIDIA Container Toolkit Docker
    refuses to start the container, with the message the README quotes."""
    runtimes = docker("info", "--format", "{{json .Runtimes}}").stdout
    done = docker("run", "--rm", "--init", "--gpus", "all", "--network", "host", image, "--help", check=False)
    if "nvidia" in runtimes:
        assert done.returncode == 0, done.stderr
        return
    assert done.returncode != 0
    quoted = 'could not select device driver "" with capabilities: [[gpu]]'
    assert quoted in done.stderr, done.stderr
    assert quoted in (ROOT / "docker" / "README.md").read_text()
