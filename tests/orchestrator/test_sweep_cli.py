"""``adareg sweep plan|run|status`` and ``adareg ui`` in-process: output shapes and bad input."""

import json
import os
from pathlib import Path

import pytest

from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[2]
TABLE1 = str(ROOT / "sweeps" / "table1.yaml")


def adareg(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    out, err = capsys.readouterr()
    return e.value.code or 0, out, err


def test_plan_json_lists_the_200_runs_of_table1(isolated, capsys):
    code, out, _ = adareg(capsys, "sweep", "plan", TABLE1, "--format", "json")
    assert code == 0
    rows = json.loads(out)
    assert len(rows) == 200 and len({r["run_key"] for r in rows}) == 200
    assert len({r["group_key"] for r in rows}) == 40  # 200 runs / 5 seeds
    assert {r["state"] for r in rows} == {"pending"}
    assert set(rows[0]) >= {"run_key", "group_key", "arch", "dataset", "scheme", "seed", "state", "params"}
    assert {(r["arch"], r["dataset"]) for r in rows} == {(a, d) for a in ("resnet14", "resnet32")
                                                        for d in ("cifar10", "cifar100")}
    assert sorted({r["scheme"] for r in rows}) == sorted(
        ["01", "02", "21", "22", "23", "wd-1e-4", "wd-1e-3", "wd-2e-3", "wd-4e-3", "wd-8e-3"])
    first = rows[0]
    assert first["params"]["seed"] == first["seed"] and first["params"]["arch"] == first["arch"]
    assert first["total_epochs"] == 450
    assert not Path("mlflow.db").exists()  # planning creates no store


def test_plan_table_ends_with_the_counts(isolated, capsys):
    code, out, _ = adareg(capsys, "sweep", "plan", TABLE1, "--set", "datasets=[digits]", "--only", "scheme=01,22",
                          "--epochs-scale", "0.02")
    assert code == 0
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    assert lines[0] == f"store sqlite:///{isolated}/mlflow.db, runs folder {isolated / 'runs'}: no such store " \
                       f"({isolated / 'mlflow.db'} does not exist): nothing has been run here yet"
    assert lines[-1] == "20 runs: 0 done, 0 running, 0 resumable, 20 pending, 0 failed"
    assert sum(" 15 pending" in line or "0/15" in line for line in lines) == 20  # 15 epochs each


BAD_YAML = {
    "malformed": ("name: [unclosed\n", "invalid YAML"),
    "tab-indented": ("name: t\nexperiment: t\nschedule:\n\tlr: 0.1\n", "tab"),
    "misspelled key": ("name: t\nexperiment: t\ndatasets: [digits]\narchs: [resnet8]\nseeds: [0]\n"
                       "train: {batch_sise: 50}\nschemes: {a: {weight_decay: 0.0001}}\n",
                       "train.batch_sise: unknown key (did you mean 'batch_size'?)"),
    "out of range": ("name: t\nexperiment: t\ndatasets: [digits]\narchs: [resnet8]\nseeds: [0]\n"
                     "schemes: {a: {weight_decay: -1}}\n", "schemes.a.weight_decay: must be >= 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_YAML))
@pytest.mark.parametrize("command", ["plan", "run", "status"])
def test_bad_sweep_file_is_one_error_line_and_runs_nothing(isolated, capsys, case, command):
    text, message = BAD_YAML[case]
    Path("bad.yaml").write_text(text)
    extra = {"plan": ["--format", "json"], "run": ["--gpus", "none"], "status": []}[command]
    code, out, err = adareg(capsys, "sweep", command, "bad.yaml", *extra)
    assert code != 0 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: bad.yaml: ") and message in err, err
    assert not Path("mlflow.db").exists() and not Path("runs").exists()


@pytest.mark.parametrize("args, message", [
    (["--set", "nonsense"], "--set 'nonsense': expected KEY=VALUE"),
    (["--set", "train.batch_size=-5"], "train.batch_size"),
    (["--only", "color=red"], "--only 'color=red': unknown field 'color'"),
    (["--only", "scheme=99"], "--only 'scheme=99': no run has scheme 99"),
    (["--gpus", "99"], "--gpus '99': GPU 99 is not visible"),
    (["--gpus", "none", "--max-parallel", "0"], "--max-parallel 0: must be at least 1"),
    (["--gpus", "none", "--retries", "-1"], "--retries -1: must be >= 0"),
    (["--gpus", "none", "--store-timeout", "-1"], "--store-timeout -1: must be > 0 seconds"),
    (["--gpus", "none", "--claim-lease", "0"], "--claim-lease 0: must be > 0 seconds"),
    (["--backend", "ray", "--gpus", "0"], "--gpus '0': with --backend ray use all or none"),
    (["--backend", "ray", "--ray-address", "10.1.2.3:6379"], "is a remote cluster, but tracking URI sqlite:///"),
])
def test_bad_run_options_are_one_error_line_and_run_nothing(isolated, capsys, args, message):
    code, out, err = adareg(capsys, "sweep", "run", TABLE1, "--set", "datasets=[digits]", *args)
    assert code != 0 and "Traceback" not in out + err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not Path("mlflow.db").exists() and not Path("runs").exists()


@pytest.mark.parametrize("command", [("sweep", "run"), ("tune", "run")])
def test_every_launch_option_reaches_the_launch(isolated, capsys, monkeypatch, command):
    """``sweep run`` and ``tune run`` share one option set (``launch_options``): each of its options is a
    ``LaunchOptions`` field and arrives there as given."""
    import dataclasses

    from orchestrator.cli.common import LAUNCH_FIELDS
    from orchestrator.dispatch import launch

    assert set(LAUNCH_FIELDS) <= {f.name for f in dataclasses.fields(launch.LaunchOptions)}
    seen = {}

    def record(self):
        seen.update(dataclasses.asdict(self))
        raise SystemExit(42)  # launch nothing

    monkeypatch.setattr(launch.LaunchOptions, "__post_init__", record)
    given = {"gpus": "none", "jobs_per_gpu": "3", "max_parallel": "2", "stall_timeout": "11",
             "store_timeout": "12", "claim_lease": "13", "disk_timeout": "14", "pack": "off"}
    args = [a for name, value in given.items() for a in (f"--{name.replace('_', '-')}", value)]
    with pytest.raises(SystemExit) as e:
        main([*command, TABLE1, "--set", "datasets=[digits]", *args])
    assert e.value.code == 42
    assert {name: str(seen[name]).removesuffix(".0") for name in LAUNCH_FIELDS} == given


def test_missing_sweep_file(isolated, capsys):
    code, _, err = adareg(capsys, "sweep", "plan", "nope.yaml")
    assert code != 0
    assert err == "error: nope.yaml: no such file (installed with adareg: beyond, demo, fashion-anchor, table1, tune)\n"


def test_ui_execs_mlflow_on_the_same_store_bound_to_localhost(isolated, capsys, monkeypatch):
    calls = []

    def fake_execv(path, argv):
        calls.append((path, argv))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execv", fake_execv)
    code, out, _ = adareg(capsys, "ui", "--port", "5123")
    assert code == 0 and "http://127.0.0.1:5123" in out
    assert "from another machine: ssh -N -L 5123:127.0.0.1:5123 " in out  # a tunnel, not a public bind
    (path, argv), = calls
    assert argv[1:] == ["-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{isolated}/mlflow.db",
                        "--host", "127.0.0.1", "--port", "5123"]


def test_ui_on_a_tracking_server_points_at_it(isolated, capsys, monkeypatch):
    monkeypatch.setattr(os, "execv", lambda *a: pytest.fail("no server to start"))
    code, out, _ = adareg(capsys, "ui", "--tracking-uri", "http://mlflow.lab:5000")
    assert code == 0 and "http://mlflow.lab:5000" in out


def test_status_watch_redraws_until_ctrl_c(isolated, capsys, monkeypatch):
    import orchestrator.cli.sweep as cli_sweep

    naps = []

    def nap(seconds):
        naps.append(seconds)
        if len(naps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli_sweep.time, "sleep", nap)
    code, out, _ = adareg(capsys, "sweep", "status", TABLE1, "--only", "dataset=cifar10", "--watch", "0.5")
    assert code == 0 and naps == [0.5, 0.5]
    assert "sweep table1: 0/100 done · 0 running · 0 failed · 0 resumable · 100 pending" in out
