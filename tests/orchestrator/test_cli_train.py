"""``adareg train`` and ``adareg schedule`` end to end: the issue's acceptance at CPU scale."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TABLE1 = str(REPO / "sweeps" / "table1.yaml")
TIMING = ("epoch_seconds", "images_per_second")


def adareg(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from orchestrator.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=os.getcwd())


def db_rows(db: Path, sql: str, *params) -> list[tuple]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as con:
        try:
            return con.execute(sql, params).fetchall()
        except sqlite3.OperationalError:  # no tables yet
            return []


def runs(db: Path) -> list[tuple]:
    return db_rows(db, "SELECT run_uuid, status FROM runs")


def metric_rows(db: Path, run_id: str) -> list[tuple]:
    return db_rows(db, "SELECT key, step, value FROM metrics WHERE run_uuid = ? ORDER BY key, step", run_id)


def cli(capsys, *args: str) -> subprocess.CompletedProcess:
    """``adareg ARGS`` in this process (as fast as a unit test), with the CLI's own error handling."""
    from orchestrator.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, exit_.value.code, out, err)


def assert_one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# --- adareg schedule ------------------------------------------------------------------------------

TABLE1_ROWS = [  # first, last epoch, lr, wd 01, wd 02, sparsity 21, 22, 23 (the paper's Table 1)
    (1, 50, 0.1, 1e-4, 1e-4, 0, 0, 0), (51, 100, 0.01, 1e-4, 1e-4, 0, 0, 0),
    (101, 150, 1e-3, 8e-4, 4e-4, .5, .8, .3), (151, 200, 1e-4, 1.6e-3, 8e-4, .5, .8, .3),
    (201, 250, 1e-5, 1.6e-3, 8e-4, .5, .8, .3),
    (251, 270, 0.1, 1e-4, 1e-4, 0, 0, 0), (271, 290, 0.01, 1e-4, 1e-4, 0, 0, 0),
    (291, 310, 1e-3, 8e-4, 4e-4, 0, 0, 0), (311, 330, 1e-4, 1.6e-3, 8e-4, 0, 0, 0),
    (331, 350, 1e-5, 1.6e-3, 8e-4, 0, 0, 0),
    (351, 370, 0.1, 1e-4, 1e-4, 0, 0, 0), (371, 390, 0.01, 1e-4, 1e-4, 0, 0, 0),
    (391, 410, 1e-3, 8e-4, 4e-4, 0, 0, 0), (411, 430, 1e-4, 1.6e-3, 8e-4, 0, 0, 0),
    (431, 450, 1e-5, 1.6e-3, 8e-4, 0, 0, 0),
]


def expected(scheme: str, epoch: int) -> tuple[int, float, float, float]:
    for i, (first, last, lr, wd01, wd02, s21, s22, s23) in enumerate(TABLE1_ROWS):
        if first <= epoch <= last:
            phase = i // 5 + 1
            wd = {"01": wd01, "02": wd02}.get(scheme, 1e-4)
            if scheme.startswith("wd-"):
                wd = float(scheme[3:])
            sparsity = {"21": s21, "22": s22, "23": s23}.get(scheme, 0)
            return phase, lr, wd, sparsity
    raise AssertionError(epoch)


def schedule_csv(capsys, *args: str) -> list[dict]:
    proc = cli(capsys, "schedule", *args, "--format", "csv")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.splitlines()[0] == "epoch,phase,lr,weight_decay,grad_sparsity"
    return list(csv.DictReader(io.StringIO(out)))


@pytest.mark.parametrize("scheme", ["01", "02", "21", "22", "23", "wd-1e-4", "wd-1e-3", "wd-2e-3", "wd-4e-3",
                                    "wd-8e-3"])
def test_schedule_csv_is_table1(scheme, capsys):
    rows = schedule_csv(capsys, scheme, "--sweep", TABLE1)
    assert len(rows) == 450
    for row in rows:
        epoch = int(row["epoch"])
        phase, lr, wd, sparsity = expected(scheme, epoch)
        assert (int(row["phase"]), float(row["lr"]), float(row["weight_decay"]), float(row["grad_sparsity"])) \
            == (phase, lr, wd, sparsity), row


def test_schedule_scaled_has_45_rows(capsys):
    rows = schedule_csv(capsys, "22", "--sweep", TABLE1, "--epochs-scale", "0.1")
    assert len(rows) == 45
    assert [r["grad_sparsity"] for r in rows[:25]] == ["0"] * 10 + ["0.8"] * 15
    assert rows[-1]["lr"] == "1e-05" and rows[-1]["phase"] == "3"


# --- adareg train: bad input ----------------------------------------------------------------------

BASE = ["train", "--arch", "resnet14", "--dataset", "digits", "--scheme", "22", "--seed", "0", "--device", "cpu"]


def with_opt(args: list[str], opt: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(opt) + 1] = value
    return args


@pytest.mark.parametrize("args, needles", [
    (with_opt(BASE, "--arch", "vgg16"), ["arch", "vgg16"]),
    (with_opt(BASE, "--arch", "resnet15"), ["arch", "resnet15", "6n+2"]),
    (with_opt(BASE, "--dataset", "mnist"), ["dataset", "mnist"]),
    (with_opt(BASE, "--scheme", "99"), ["scheme", "99"]),
    (BASE + ["--epochs-scale", "0"], ["epochs_scale"]),
    (BASE + ["--epochs-scale", "-1"], ["epochs_scale"]),
    (with_opt(BASE, "--dataset", "cifar10"), ["cifar10", "cifar-10-python.tar.gz"]),
    (with_opt(BASE, "--dataset", "cifar100"), ["cifar100", "cifar-100-python.tar.gz"]),
    (BASE + ["--sweep", "missing.yaml"], ["missing.yaml"]),
    (BASE + ["--sweep", "bad.yaml"], ["bad.yaml", "line"]),
    (BASE + ["--sweep", "typo.yaml"], ["typo.yaml", "shedule"]),
])
def test_bad_input_is_one_error_line_and_no_run(args, needles, isolated, capsys):
    (isolated / "bad.yaml").write_text("name: x\nschemes: [unclosed\n")
    (isolated / "typo.yaml").write_text(Path(TABLE1).read_text().replace("schedule:", "shedule:"))
    if "--sweep" not in args:
        args = args + ["--sweep", TABLE1]
    proc = cli(capsys, *args)
    assert_one_error_line(proc, *needles)
    assert runs(isolated / "mlflow.db") == []


def test_unreachable_tracking_server_fails_fast(isolated):
    """A real process: the one-line error must also hold outside the test runner."""
    t0 = time.monotonic()
    proc = adareg(*BASE, "--sweep", TABLE1, "--tracking-uri", "http://127.0.0.1:9")
    assert time.monotonic() - t0 < 30
    assert_one_error_line(proc, "http://127.0.0.1:9", "unreachable")


# --- adareg train: a tracked run, re-run, and SIGKILL + resume --------------------------------------

def experiments_of_runs(db: Path) -> list[str]:
    return [name for name, in db_rows(db, "SELECT DISTINCT e.name FROM runs r JOIN experiments e "
                                          "ON r.experiment_id = e.experiment_id")]


def finished_run(db: Path) -> str:
    rows = runs(db)
    assert len(rows) == 1 and rows[0][1] == "FINISHED", rows
    return rows[0][0]


def assert_each_metric_once_per_epoch(db: Path, run_id: str, epochs: int) -> None:
    from training.callbacks import METRICS

    counts = db_rows(db, "SELECT key, step, COUNT(*) FROM metrics WHERE run_uuid = ? GROUP BY key, step", run_id)
    assert all(c == 1 for _, _, c in counts), [r for r in counts if r[2] > 1]
    assert sorted((k, s) for k, s, _ in counts) == sorted((m, e) for m in METRICS for e in range(1, epochs + 1))


@pytest.mark.slow
def test_acceptance_run_then_rerun_creates_nothing(isolated):
    """The issue's command: scheme 22 at epoch scale 0.04 is 20 epochs, 80 % sparse in epochs 5-10."""
    args = [*BASE, "--seed", "3", "--epochs-scale", "0.04", "--sweep", TABLE1]
    proc = adareg(*args, timeout=600)
    assert proc.returncode == 0, proc.stderr
    db = isolated / "mlflow.db"
    run_id = finished_run(db)
    assert_each_metric_once_per_epoch(db, run_id, 20)
    rows = dict(((k, s), v) for k, s, v in metric_rows(db, run_id))
    for epoch in range(1, 21):
        updated = rows[("updated_fraction", epoch)]
        if 5 <= epoch <= 10:
            assert rows[("grad_sparsity", epoch)] == 0.8
            assert 0.19 <= updated <= 0.2 + 1e-6, (epoch, updated)
        else:
            assert rows[("grad_sparsity", epoch)] == 0.0
            assert updated > 0.95, (epoch, updated)
    tags = dict(db_rows(db, "SELECT key, value FROM tags WHERE run_uuid = ?", run_id))
    params = dict(db_rows(db, "SELECT key, value FROM params WHERE run_uuid = ?", run_id))
    assert len(tags["adareg.run_key"]) == 12 and len(tags["adareg.group_key"]) == 12
    assert tags["adareg.sweep"] == "table1"
    assert (params["arch"], params["dataset"], params["scheme"], params["seed"]) == ("resnet14", "digits", "22", "3")
    assert params["batch_size"] == "50" and params["momentum"] == "0.9" and params["epochs_scale"] == "0.04"

    again = adareg(*args)
    assert again.returncode == 0, again.stderr
    assert "already finished" in again.stdout
    assert runs(db) == [(run_id, "FINISHED")]


def test_sigkill_then_rerun_resumes_the_same_run_bit_identically(isolated, monkeypatch):
    args = [*BASE, "--epochs-scale", "0.02", "--train-subset", "200", "--threads", "1", "--sweep", TABLE1]
    # the uninterrupted reference, in a store of its own
    ref_env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{isolated}/ref.db",
               "ADAREG_RUNS_DIR": str(isolated / "ref_runs")}
    ref = adareg(*args, env=ref_env)
    assert ref.returncode == 0, ref.stderr
    ref_id = finished_run(isolated / "ref.db")

    proc = subprocess.Popen([sys.executable, "-c", "from orchestrator.cli import main; main()", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        found = list((isolated / "runs").glob("*/progress.json"))
        if found and json.loads(found[0].read_text() or "{}").get("epoch", 0) >= 6:
            progress = found[0]
            break
        time.sleep(0.05)
    assert progress is not None, "the run never reached epoch 6"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    db = isolated / "mlflow.db"
    (killed_id, status), = runs(db)
    assert status == "RUNNING"
    assert 6 <= json.loads(progress.read_text())["epoch"] < 15

    resumed = adareg(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch" in resumed.stdout
    assert finished_run(db) == killed_id
    assert_each_metric_once_per_epoch(db, killed_id, 15)
    strip = lambda rows: [r for r in rows if r[0] not in TIMING]  # noqa: E731
    assert strip(metric_rows(db, killed_id)) == strip(metric_rows(isolated / "ref.db", ref_id))


def test_trains_on_cifar_archives_from_data_dir(isolated, capsys):
    """CIFAR-10 through torchvision's real loading path, from an archive in --data-dir."""
    from cifar_archives import write_cifar

    write_cifar(isolated / "data", "cifar10", per_file=10, archive=True)
    args = ("train", "--arch", "resnet8", "--dataset", "cifar10", "--scheme", "wd-1e-4", "--sweep", TABLE1,
            "--epochs-scale", "0.01", "--data-dir", str(isolated / "data"), "--device", "cpu")
    proc = cli(capsys, *args)  # a home-made archive is refused before anything is unpickled ...
    assert_one_error_line(proc, "cifar-10-python.tar.gz", "not the official CIFAR-10 archive",
                          "allow_unofficial_data")
    assert runs(isolated / "mlflow.db") == []
    proc = cli(capsys, *args, "--allow-unofficial-data")  # ... unless the user vouches for it
    assert proc.returncode == 0, proc.stderr
    kind = db_rows(isolated / "mlflow.db", "SELECT value FROM experiment_tags WHERE key = 'mlflow.experimentKind'")
    assert kind == [("custom_model_development",)]  # the MLflow UI opens on the runs, not on GenAI traces
    assert experiments_of_runs(isolated / "mlflow.db") == ["adareg-train"]  # resnet8 is off Table 1's grid
    run_id = finished_run(isolated / "mlflow.db")
    assert_each_metric_once_per_epoch(isolated / "mlflow.db", run_id, 15)
    assert (isolated / "data" / "cifar-10-batches-py" / "data_batch_5").exists()


def test_a_claim_of_another_host_is_kept_out_and_its_sighting_kept_in_the_run_folder(isolated, capsys):
    """A worker that finds the run claimed by an owner of another identity (another machine, container or PID
    namespace) stays out, and records when it first saw that heartbeat in its run folder (``claim-seen.json``),
    so that the run's next worker goes on counting the lease instead of starting it again."""
    from mlflow import MlflowClient

    from orchestrator.run.folder import SIGHTINGS
    from orchestrator.store import claims
    from orchestrator.store.tags import TAG_HEARTBEAT, TAG_OWNER

    args = [*BASE, "--epochs-scale", "0.02", "--train-subset", "100", "--threads", "1", "--sweep", TABLE1]
    assert cli(capsys, *args).returncode == 0
    db = isolated / "mlflow.db"
    (run_id, _), = runs(db)
    # digits is not on Table 1's grid: the run goes to adareg-train, not to the CIFAR experiment, still tagged table1
    assert experiments_of_runs(db) == ["adareg-train"]
    assert db_rows(db, "SELECT value FROM tags WHERE run_uuid = ? AND key = 'adareg.sweep'", run_id) == [("table1",)]
    note, = db_rows(db, "SELECT value FROM experiment_tags WHERE key = 'mlflow.note.content'")
    assert "off their sweep's grid" in note[0] and "CIFAR" not in note[0]
    client = MlflowClient(f"sqlite:///{db}")
    client.update_run(run_id, status="RUNNING")
    other = claims.Owner("0ther", "elsewhere", 1, "/elsewhere/k", time.time() - 5000, "another-boot/pid:[1]")
    client.set_tag(run_id, TAG_OWNER, other.tag())
    client.set_tag(run_id, TAG_HEARTBEAT, "1700000000.000")  # its clock, not ours
    for _ in range(2):
        busy = cli(capsys, *args)
        assert_one_error_line(busy, "running elsewhere", "elsewhere")
    seen, = (isolated / "runs").glob(f"*/{SIGHTINGS}")
    assert json.loads(seen.read_text())["owner"] == "0ther"
    assert json.loads(seen.read_text())["beat"] == "1700000000.000"


@pytest.mark.parametrize("case", ["missing", "corrupt"])
def test_fashion_mnist_missing_or_corrupt_is_one_error_line_exit_2_and_nothing_written(case, isolated, capsys,
                                                                                        monkeypatch):
    from training import fashion

    monkeypatch.setattr(fashion, "DEBIAN_DIR", str(isolated / "no-debian-package"))
    monkeypatch.delenv(fashion.DATA_ENV, raising=False)
    data = isolated / "data"
    data.mkdir()
    if case == "corrupt":
        for name in fashion.FILES:
            (data / f"{name}.gz").write_bytes(b"\x1f\x8b not really gzip")
    proc = cli(capsys, "train", "--arch", "resnet8", "--dataset", "fashion-mnist", "--scheme", "wd-1e-4",
               "--sweep", TABLE1, "--epochs-scale", "0.01", "--data-dir", str(data), "--device", "cpu")
    needles = ([str(data), fashion.DEBIAN_DIR, "apt-get install dataset-fashion-mnist"] if case == "missing"
               else [str(data / "train-images-idx3-ubyte.gz"), "cannot read"])
    assert_one_error_line(proc, *needles)
    assert proc.returncode == 2
    assert all(n in proc.stderr for n in needles), proc.stderr
    assert runs(isolated / "mlflow.db") == []  # no MLflow run, and no data half-written
    assert not (data / "FashionMNIST").exists() and not list(data.glob(".fashion-*"))
