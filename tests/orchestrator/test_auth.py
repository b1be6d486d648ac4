"""A store shared through an authenticated tracking server: a real ``mlflow server --app-name basic-auth`` on
127.0.0.1 (issue 26). The right user trains a sweep end to end, claims included; a wrong password, no
credentials and a user with READ permission only are told so at once in one ``error:`` line (exit 2), and
nothing is counted against a run."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from e2e import Store, run_bg, sweep_cmd, wait_until, write_sweep
from servers import MlflowServer

pytestmark = pytest.mark.slow

ADMIN_PASSWORD = "admin-password-of-the-test"  # >= 12 characters: MLflow refuses its old default
USERS = {"alice": "alice-password-1", "bob": "bob-password-22"}
EPOCHS = 4  # two steps of two


def api(server: MlflowServer, path: str, body: dict, user: str = "admin", password: str = ADMIN_PASSWORD) -> dict:
    """POST ``body`` to the server's REST API ``path`` as ``user``."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(server.uri + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"{}")


@pytest.fixture
def auth_server(tmp_path):
    pytest.importorskip("flask_wtf", reason="the basic-auth app needs mlflow[auth] (Flask-WTF)")
    env = {"MLFLOW_FLASK_SERVER_SECRET_KEY": "secret-key-of-the-test", "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD}
    with MlflowServer(f"sqlite:///{tmp_path}/mlflow.db", workdir=tmp_path / "server", env=env,
                      extra_args=["--app-name", "basic-auth"]) as server:
        for user, password in USERS.items():
            api(server, "/api/2.0/mlflow/users/create", {"username": user, "password": password})
        yield server


def adareg(cmd: list[str], user: str | None, password: str | None, timeout: float = 300) -> tuple[int, str, str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    if user is not None:
        env.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password or "")
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return done.returncode, done.stdout, done.stderr, time.monotonic() - started


def test_an_authenticated_server_trains_the_right_user_and_refuses_the_others_in_one_line(tmp_path, auth_server):
    server = auth_server
    trained = write_sweep(tmp_path / "a.yaml", "a: {weight_decay: 0.0001}\n", epochs=EPOCHS // 2)
    code, out, err, _ = adareg(sweep_cmd(trained, server.uri, tmp_path / "runs-alice"), "alice", USERS["alice"])
    assert code == 0, out + err
    store = Store(f"sqlite:///{tmp_path}/mlflow.db")
    active = store.active()
    assert len(active) == 1 and {r["status"] for r in active.values()} == {"FINISHED"}, store.runs()
    for run in active.values():
        store.assert_once_per_epoch(run["run_id"], EPOCHS)
    experiment_id = store.query("SELECT experiment_id FROM experiments WHERE name = 'tiny'")[0][0]
    api(server, "/api/3.0/mlflow/users/permissions/grant", {"username": "bob", "resource_type": "experiment",
                                                            "resource_id": str(experiment_id), "permission": "READ"})

    pending = write_sweep(tmp_path / "b.yaml", "b: {weight_decay: 0.0008}\n", seeds="[0, 1]", epochs=EPOCHS // 2)
    for who, password, refused in [("alice", "a-wrong-password", "user 'alice'"), (None, None, "without credentials"),
                                   ("bob", USERS["bob"], "user 'bob'")]:
        runs = tmp_path / f"runs-{who}-{password}"
        code, out, err, seconds = adareg(sweep_cmd(pending, server.uri, runs), who, password, timeout=120)
        said = f"{who}: exit {code} after {seconds:.0f}s\n{out}{err}"
        assert code == 2 and seconds < 30, said
        errors = [line for line in (out + err).splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in out + err, said
        assert server.uri in errors[0] and refused in errors[0], said
        assert ("HTTP 403" if who == "bob" else "HTTP 401") in errors[0], said
        assert not list(runs.glob("*/result.json")), said  # no worker started, no attempt counted
    assert sorted(r["key"] for r in store.runs()) == sorted(active), store.runs()  # nor any run created or failed
    assert {r["status"] for r in store.runs()} == {"FINISHED"}


def permit(server: MlflowServer, user: str, experiment_id: str, permission: str) -> None:
    """Make ``user``'s permission on the experiment ``permission`` (whatever it was: revoked, then granted)."""
    resource = {"username": user, "resource_type": "experiment", "resource_id": str(experiment_id)}
    api(server, "/api/3.0/mlflow/users/permissions/revoke", resource)
    api(server, "/api/3.0/mlflow/users/permissions/grant", {**resource, "permission": permission})


def progress_epoch(runs: Path) -> int:
    """The highest epoch any run folder of ``runs`` reports trained."""
    best = 0
    for progress in runs.glob("*/progress.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            best = max(best, int(json.loads(progress.read_text())["epoch"]))
    return best


def test_a_permission_revoked_mid_sweep_ends_it_as_a_refusal_and_a_plain_rerun_trains_every_run(tmp_path, auth_server):
    """bob creates the experiment (MANAGE), then an admin demotes him to READ while his first run trains (one
    worker at a time): that worker's next write is refused. The sweep ends at once with exit 2 and one
    ``error:`` line naming the server, bob and the refused write, not "N runs failed"; nothing is counted
    against a run (its result.json says ``refused``, no failures; the runs not started are left untouched),
    and once bob may write again the same sweep, without ``--retry-failed``, trains every run, each metric once
    per epoch."""
    server, epochs = auth_server, 8  # demoted after epoch 1: seven epochs before the run ends
    sweep = write_sweep(tmp_path / "c.yaml", "c: {weight_decay: 0.0001}\n", seeds="[0, 1]", epochs=epochs // 2)
    cmd = sweep_cmd(sweep, server.uri, tmp_path / "runs")  # two workers at once
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update(MLFLOW_TRACKING_USERNAME="bob", MLFLOW_TRACKING_PASSWORD=USERS["bob"])
    log = tmp_path / "sweep.log"
    proc = run_bg([*cmd, "--max-parallel", "1"], log, env=env)  # seed 1 waits for seed 0: never started
    try:
        wait_until(lambda: progress_epoch(tmp_path / "runs") >= 1 or proc.poll() is not None, 120,
                   "bob's first epoch")
        store = Store(f"sqlite:///{tmp_path}/mlflow.db")
        experiment_id = store.query("SELECT experiment_id FROM experiments WHERE name = 'tiny'")[0][0]
        permit(server, "bob", experiment_id, "READ")
        demoted = time.monotonic()
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = log.read_text()
    said = f"exit {code} {time.monotonic() - demoted:.0f}s after the demotion\n{out}"
    assert code == 2 and time.monotonic() - demoted < 60, said
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out and "runs failed" not in out, said
    assert server.uri in errors[0] and "user 'bob'" in errors[0] and "HTTP 403" in errors[0], said
    assert "writing to run" in errors[0], said  # what was refused: a write to the run it trained
    ends = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/result.json")}
    assert [e["status"] for e in ends.values()] == ["refused"] and ends.popitem()[1]["failures"] == 0, said
    assert not [r for r in store.runs() if r["status"] == "FAILED"], store.runs()

    permit(server, "bob", experiment_id, "EDIT")
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)  # no --retry-failed
    assert again.returncode == 0, again.stdout + again.stderr
    active = store.active()
    assert len(active) == 2 and {r["status"] for r in active.values()} == {"FINISHED"}, store.runs()
    for run in active.values():
        store.assert_once_per_epoch(run["run_id"], epochs)
