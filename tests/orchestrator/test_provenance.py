"""Every run says where it came from (issue 25, part 2): adareg's version, the git commit and dirty flag of a
checkout, the command line, MLflow's source tags, the resolved sweep file and the run's config as artifacts,
params a researcher can filter on; read back through MLflow's client for runs made by ``train``, ``sweep run``
and a tuner."""

import csv
import json
import subprocess
from pathlib import Path

import pytest
import yaml
from tiny import TINY, adareg

from orchestrator.store.provenance import CODE_ROOT, version

TUNE = TINY.replace("experiment: adareg-tiny", "experiment: adareg-tiny-tune").replace(
    "lr: [0.1, 0.01]", "lr: [0.1, 0.01, 0.001, 0.0001, 0.00001]").replace("[0.0001, 0.001]", "0.0001") + """\
tune: {validation: 0.2, seeds: 1, weight_decay_base: {low: 1.0e-5, high: 1.0e-3, log: true},
       weight_decay_peak: {low: 1.0e-4, high: 1.0e-2, log: true}, grad_sparsity: 0.0, pruner: none}
"""



def client():
    from mlflow import MlflowClient

    return MlflowClient()  # the isolated store ($MLFLOW_TRACKING_URI)


def only_run(experiment: str):
    c = client()
    runs = [r for r in c.search_runs([c.get_experiment_by_name(experiment).experiment_id])
            if "adareg.run_key" in r.data.tags]
    assert len(runs) == 1, runs
    return runs[0]


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(CODE_ROOT), *args], capture_output=True, text=True).stdout.strip()


def assert_provenance(run, command: str, sweep_name: str, trial: bool = False) -> None:
    tags, c = run.data.tags, client()
    assert tags["adareg.version"] == version() != "unknown"
    assert tags["adareg.command"].startswith(command), tags["adareg.command"]
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"].startswith("adareg ")
    if (CODE_ROOT / ".git").exists():  # the tests run from a checkout
        assert tags["adareg.git_commit"] == tags["mlflow.source.git.commit"] == git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        assert tags["adareg.git_dirty"] == str(dirty).lower()
    assert all(value != "" for value in tags.values()), {k: v for k, v in tags.items() if v == ""}
    assert "adareg.failure" not in tags  # finished: no empty failure tag
    config = json.loads(Path(c.download_artifacts(run.info.run_id, "config.json")).read_text())
    assert config["arch"] == "resnet8" and config["train_subset"] == 100
    sweep = yaml.safe_load(Path(c.download_artifacts(run.info.run_id, "sweep.yaml")).read_text())
    assert sweep["name"] == sweep_name and sweep["train"]["train_subset"] == 100  # defaults filled in too:
    assert sweep["train"]["momentum"] == 0.9
    params = run.data.params
    if trial:
        assert config["validation"] == 0.2 and params["validation"] == "0.2"
        return
    assert config["weight_decay"][0] == [0.0001, 0.001] and sweep["schemes"]["a"]["weight_decay"] == [0.0001, 0.001]
    assert params["weight_decay"] == "[0.0001,0.001]" and params["grad_sparsity"] == "0.0"  # constant: a scalar
    assert params["lr"] == "[0.1,0.01]" and params["seed"] == "0"
    assert not {"per_epoch", "dropout", "variant", "label_smoothing"} & set(params), params  # no empty noise
    assert all(value not in ("", "None", "[]") for value in params.values()), params


def test_a_trained_run_carries_its_provenance_and_the_report_lists_it(isolated, capsys):
    Path("tiny.yaml").write_text(TINY)
    code, _, err = adareg(capsys, "train", "--sweep", "tiny.yaml", "--arch", "resnet8", "--dataset", "digits",
                          "--scheme", "a", "--device", "cpu", "--threads", "1")
    assert code == 0, err
    run = only_run("adareg-tiny")
    assert_provenance(run, "adareg train --sweep tiny.yaml --arch resnet8", "tiny")
    code, _, err = adareg(capsys, "report", "tiny.yaml", "--out", "rep", "--no-mechanism")
    assert code == 0, err
    rows = list(csv.DictReader(open("rep/runs.csv")))
    assert len(rows) == 1 and rows[0]["adareg_version"] == version()
    assert rows[0]["git_commit"] == run.data.tags.get("adareg.git_commit", "")


@pytest.mark.slow
def test_runs_of_sweep_run_and_of_a_tuner_carry_their_provenance(isolated, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    Path("tiny.yaml").write_text(TINY)
    code, _, err = adareg(capsys, "sweep", "run", "tiny.yaml", "--gpus", "none", "--max-parallel", "1")
    assert code == 0, err
    assert_provenance(only_run("adareg-tiny"), "adareg sweep run tiny.yaml --gpus none", "tiny")
    Path("tune.yaml").write_text(TUNE)
    code, _, err = adareg(capsys, "tune", "run", "tune.yaml", "--gpus", "none", "--trials", "1",
                          "--storage", f"{isolated}/s.journal")
    assert code == 0, err
    trial = only_run("adareg-tiny-tune")
    assert trial.data.tags["adareg.trial"] == "0"
    assert_provenance(trial, "adareg tune run tune.yaml --gpus none", "tiny", trial=True)
