"""adareg tune: tapers, the validation objective, pruning on the mean over seeds, export; end to end through
the scheduler (trials in parallel with the study on PostgreSQL, several tuners on one journal, a killed tuner's
trial retried)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from servers import postgres, postgres_uri  # noqa: F401, F811 (fixtures)

from orchestrator.dispatch.task import Task
from orchestrator.errors import UserError
from orchestrator.sweep.file import load_sweep
from orchestrator.tune.export import best_sweep, export_sweep
from orchestrator.tune.space import space_of, taper, trial_configs, trial_scheme, variant_of
from orchestrator.tune.tuner import TrialRuns, Tuner

ROOT = Path(__file__).resolve().parents[2]
TUNE = str(ROOT / "sweeps" / "tune.yaml")
ADAREG = str(Path(sys.executable).parent / "adareg")
# The test split must never be read during a trial: in every process of these tests that imports training.data
# (the workers), this guard makes training.data.load_test_arrays raise, and leaves a mark that it did.
GUARD = """\
import importlib.machinery
import os
import sys


def _never(*args, **kwargs):
    raise AssertionError("the test split was loaded during a trial")


class Guard:
    def find_spec(self, name, path, target=None):
        if name != "training.data":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.load_test_arrays = _never
            with open(os.path.join(os.environ["ADAREG_GUARD_MARKS"], str(os.getpid())), "w"):
                pass

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, Guard())
"""


# ----------------------------------------------------------------------------------------- unit


def test_taper_has_table1_shape():
    t = taper(1e-4, 1.6e-3, 0.5, phases=3)
    assert t["weight_decay"] == [1e-4, 1e-4, 8e-4, 1.6e-3, 1.6e-3]  # scheme 01 exactly
    assert t["grad_sparsity"] == [[0, 0, 0.5, 0.5, 0.5], [0.0] * 5, [0.0] * 5]  # scheme 21 exactly


def test_fixed_values_are_not_sampled():
    sweep = load_sweep(TUNE, ["tune.grad_sparsity=0.3", "tune.weight_decay_base=2e-4"])
    scheme = trial_scheme(sweep, {"weight_decay_peak": 4e-3})
    assert scheme["weight_decay"] == [2e-4, 2e-4, 2e-3, 4e-3, 4e-3]
    assert scheme["grad_sparsity"][0] == [0, 0, 0.3, 0.3, 0.3]


def test_a_trial_trains_the_tuning_seeds_on_a_validation_split_under_its_own_variant():
    sweep = load_sweep(TUNE, ["tune.seeds=2", "tune.validation=0.2"])
    configs = trial_configs(sweep, {"weight_decay_base": 1e-4, "weight_decay_peak": 1e-3, "grad_sparsity": 0.1},
                            variant_of(sweep.name, 7), 7)
    assert [c.seed for c in configs] == [0, 1]
    assert {(c.validation, c.variant, c.scheme, c.arch, c.dataset) for c in configs} == {
        (0.2, "tune-digits/trial-7", "trial-7", "resnet14", "digits")}
    same = trial_configs(sweep, {"weight_decay_base": 1e-4, "weight_decay_peak": 1e-3, "grad_sparsity": 0.1},
                         variant_of(sweep.name, 8), 8)
    from orchestrator.identity import run_key

    assert not {run_key(c) for c in configs} & {run_key(c) for c in same}  # equal params, other trial: other runs


def test_space_errors_name_the_problem():
    table1 = str(Path(TUNE).with_name("table1.yaml"))
    with pytest.raises(UserError, match="no 'tune' section"):
        space_of(load_sweep(table1))
    with pytest.raises(UserError, match="tune.weight_decay_peak.high: must be greater than low"):
        load_sweep(TUNE, ["tune.weight_decay_peak={low: 1.0e-2, high: 1.0e-3}"])
    with pytest.raises(UserError, match="tune.seeds: 4 tuning seeds, but the sweep lists 3 seeds"):
        space_of(load_sweep(TUNE, ["tune.seeds=4"]))
    with pytest.raises(UserError, match="tune.objective"):
        load_sweep(TUNE, ["tune.objective=test_error"])  # tuning never selects on the test set
    with pytest.raises(UserError, match="tune.validation"):
        load_sweep(TUNE, ["tune.validation=0"])


def space_file(path: Path, tune: str, schemes: str | None = None) -> Path:
    """sweeps/tune.yaml with its ``tune`` section replaced by ``tune`` (YAML; and ``schemes`` if given)."""
    doc = yaml.safe_load(Path(TUNE).read_text())
    doc["tune"] = yaml.safe_load(tune)
    if schemes is not None:
        doc["schemes"] = yaml.safe_load(schemes)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_a_space_over_any_field_of_a_scheme_varies_that_field_only(tmp_path):
    path = space_file(tmp_path / "t.yaml", """
        scheme: '01'
        seeds: 2
        space:
          weight_decay: {low: 1.0e-5, high: 1.0e-2, log: true}
          grad_sparsity: 0.25
    """)
    sweep = load_sweep(path)
    scheme = trial_scheme(sweep, {"weight_decay": 3e-3})
    assert scheme == {"weight_decay": 3e-3, "grad_sparsity": 0.25}  # scheme 01 with both fields replaced
    configs = trial_configs(sweep, {"weight_decay": 3e-3}, variant_of(sweep.name, 4), 4)
    assert [c.seed for c in configs] == [0, 1]
    assert {(c.weight_decay, c.grad_sparsity, c.scheme, c.validation, c.variant) for c in configs} == {
        (((3e-3,) * 5,) * 3, ((0.25,) * 5,) * 3, "trial-4", 0.1, "tune-digits/trial-4")}
    inline = load_sweep(space_file(tmp_path / "i.yaml", """
        scheme: {weight_decay: [0.0001, 0.0001, 0.0008, 0.0016, 0.0016]}
        space: {grad_sparsity: {low: 0, high: 0.5}}
    """))
    assert trial_scheme(inline, {"grad_sparsity": 0.5}) == {
        "weight_decay": [0.0001, 0.0001, 0.0008, 0.0016, 0.0016], "grad_sparsity": 0.5}


def test_a_space_reaches_into_tapers(tmp_path):
    """``weight_decay.alpha`` and ``dropout.max``: fields of the taper language's power laws; a trial at
    alpha 0 trains the constant weight decay, and its dropout follows the sampled ceiling."""
    sweep = load_sweep(space_file(tmp_path / "t.yaml", yaml.safe_dump({**SPACE, "seeds": 1})))
    config, = trial_configs(sweep, {"weight_decay.alpha": 0.0, "dropout.max": 0.2}, variant_of(sweep.name, 1), 1)
    assert config.weight_decay == ((1e-4,) * 5,) * 3
    assert max(max(row) for row in config.dropout) == 0.2
    steeper, = trial_configs(sweep, {"weight_decay.alpha": 1.0, "dropout.max": 0.2}, variant_of(sweep.name, 1), 1)
    assert steeper.weight_decay[0] == (1e-4, 1e-3, 0.01, 0.01, 0.01)  # 1e-4 x (lr / 0.1) ^ -1, clipped at 0.01
    with pytest.raises(UserError, match=r"tune.space.dropout.ref: at its low -1 the scheme is invalid: dropout"):
        load_sweep(space_file(tmp_path / "b.yaml", yaml.safe_dump(
            {**SPACE, "space": {"dropout.ref": {"low": -1.0, "high": 0.1}}})))


def test_the_table1_shape_is_the_space_without_one():
    """Today's three-number space is what a ``tune`` section without ``space`` searches, under the same
    Optuna parameter names (so its studies go on)."""
    from orchestrator.sweep.schema import Range
    from orchestrator.tune.space import parameters

    names = parameters(space_of(load_sweep(TUNE)))
    assert list(names) == ["weight_decay_base", "weight_decay_peak", "grad_sparsity"]
    assert names["grad_sparsity"] == Range(low=0.0, high=0.8)


@pytest.mark.parametrize("tune, schemes, message", [
    ("{space: {weight_decya: {low: 0, high: 1}}}", None,
     "tune.space.weight_decya: at its low 0 the scheme is invalid: weight_decya: unknown key (did you mean "
     "'weight_decay'?)"),
    ("{space: {weight_decay: {low: -1, high: 1}}}", None, "tune.space.weight_decay: at its low -1 the scheme is "
                                                           "invalid: weight_decay: must be >= 0, got -1.0"),
    ("{space: {grad_sparsity: {low: 0, high: 1}}}", None, "tune.space.grad_sparsity: at its high 1 the scheme"),
    ("{space: {weight_decay: {low: 0.01, high: 0.001}}}", None, "tune.space.weight_decay.high: must be greater"),
    ("{space: {weight_decay: {low: 0, high: 0.1, log: true}}}", None, "tune.space.weight_decay.low: must be > 0"),
    ("{space: {weight_decay.alpha: {low: 0, high: 1}}}", None, "tune.space.weight_decay.alpha: weight_decay is "),
    ("{space: {weight_decay: 0.1}, weight_decay_base: 0.001}", None, "tune.weight_decay_base: give either"),
    ("{space: {}}", None, "tune.space: is empty"),
    ("{scheme: '99', space: {weight_decay: {low: 0, high: 1}}}", None, "tune.scheme: unknown scheme '99'"),
    ("{scheme: '01'}", None, "tune.scheme: needs tune.space"),
])
def test_a_bad_space_is_one_error_naming_the_field(tmp_path, tune, schemes, message):
    with pytest.raises(UserError) as e:
        load_sweep(space_file(tmp_path / "t.yaml", tune, schemes))
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


class FakeTrial:
    number, _trial_id = 3, 3

    def __init__(self, prune_at):
        self.prune_at, self.reports = prune_at, []

    def report(self, value, step):
        self.reports.append((step, value))

    def should_prune(self):
        return len(self.reports) >= self.prune_at


def test_pruner_sees_the_mean_over_seeds_once_every_seed_reached_the_epoch(tmp_path):
    sweep = load_sweep(TUNE)
    tuner = Tuner.__new__(Tuner)
    tuner.space, tuner.note, notes = space_of(sweep), None, []
    tuner.note = notes.append
    trial = FakeTrial(prune_at=2)
    tasks = {k: Task(k, None, tmp_path / k) for k in ("a", "b")}
    runs = TrialRuns(trial, "v", tasks, values={"a": {}, "b": {}})
    runs.values["a"].update({1: 0.5, 2: 0.4, 3: 0.3})
    tuner._report(runs)
    assert trial.reports == []  # seed b has no epoch yet
    runs.values["b"].update({1: 0.7})
    tuner._report(runs)
    assert trial.reports == [(1, pytest.approx(0.6))] and not runs.pruned
    runs.ended["b"] = "finished"  # b is done: no stop request for it
    runs.values["b"].update({2: 0.6})
    tuner._report(runs)
    assert trial.reports == [(1, pytest.approx(0.6)), (2, pytest.approx(0.5))]
    assert runs.pruned == "pruned: trial 3 at epoch 2 (val_error 0.5000)" and notes == [runs.pruned]
    assert tasks["a"].folder.stop_requested() == runs.pruned and tasks["b"].folder.stop_requested() is None


def test_export_trains_the_tuned_taper_on_the_full_training_set_beside_the_baselines(tmp_path):
    import optuna

    sweep = load_sweep(TUNE, ["schemes={'01': {weight_decay: 0.0001}}"])
    study = optuna.create_study()
    params = {"weight_decay_base": 2e-4, "weight_decay_peak": 3e-3, "grad_sparsity": 0.25}
    dists = {k: optuna.distributions.FloatDistribution(0, 1) for k in params}
    study.add_trial(optuna.create_trial(params=params, distributions=dists, value=0.2))
    study.add_trial(optuna.create_trial(params={**params, "grad_sparsity": 0.5}, distributions=dists, value=0.3))
    summary, doc = best_sweep(sweep, study)
    export_sweep(doc, tmp_path / "best.yaml", summary)
    assert "mean val_error 0.2000 on the validation split" in (tmp_path / "best.yaml").read_text()
    exported = load_sweep(tmp_path / "best.yaml")
    assert list(exported.schemes) == ["tuned", "wd-1e-4", "wd-1e-3", "wd-8e-3", "01"]
    assert exported.seeds == [0, 1, 2] and exported.tune is None
    tuned = exported.run_config("tuned", "resnet14", "digits", 2)
    assert tuned.validation == 0 and tuned.variant == ""
    assert tuned.weight_decay[0] == (2e-4, 2e-4, 1.5e-3, 3e-3, 3e-3) and tuned.grad_sparsity[0][2] == 0.25
    assert exported.run_config("wd-8e-3", "resnet14", "digits", 0).weight_decay[1] == (8e-3,) * 5
    assert summary["trial"] == 0 and summary["completed"] == 2


# ----------------------------------------------------------------------------------- end to end


def tune_file(path: Path, *, seeds: int, steps: str = "[1]", pruner: str = "none") -> Path:
    """sweeps/tune.yaml made tiny: ResNet-8, 100 digits, one phase of 5 steps (5 epochs with [1])."""
    doc = yaml.safe_load(Path(TUNE).read_text())
    doc["archs"] = ["resnet8"]
    doc["schedule"]["epochs_per_step"] = yaml.safe_load(steps)
    doc["train"] = {"label_noise": 0.3, "train_subset": 100, "batch_size": 50}
    doc["tune"].update(seeds=seeds, pruner=pruner)
    path.write_text(yaml.safe_dump(doc))
    return path


def env_for(tmp_path: Path) -> dict[str, str]:
    guard, marks = tmp_path / "guard", tmp_path / "marks"
    guard.mkdir(exist_ok=True)
    marks.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(GUARD)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(guard), str(ROOT)]), "ADAREG_GUARD_MARKS": str(marks),
            "ADAREG_CLAIM_SETTLE_S": "0.3", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
            "ADAREG_RUNS_DIR": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1"}


def tune_cmd(path: Path, storage: str, *args: str) -> list[str]:
    return [ADAREG, "tune", "run", str(path), "--gpus", "none", "--storage", storage, *args]


def query(tmp_path: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(tmp_path / "mlflow.db") as con:
        return con.execute(sql).fetchall()


def trial_runs(tmp_path: Path) -> dict[str, dict]:
    """MLflow trial runs by id: status, times, tags, metric keys and the validation error per epoch."""
    runs = {rid: {"status": st, "start": s, "end": e} for rid, st, s, e in query(
        tmp_path, "SELECT run_uuid, status, start_time, end_time FROM runs WHERE lifecycle_stage = 'active'")}
    for rid, key, value in query(tmp_path, "SELECT run_uuid, key, value FROM tags"):
        if rid in runs:
            runs[rid].setdefault("tags", {})[key] = value
    for rid, key, step, value in query(tmp_path, "SELECT run_uuid, key, step, value FROM metrics"):
        if rid in runs:
            runs[rid].setdefault("metrics", {}).setdefault(key, {})[step] = value
    return {rid: r for rid, r in runs.items() if "adareg.trial" in r.get("tags", {})}


def load_study(storage: str, name: str = "tune-digits"):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    backend = storage if "://" in storage else JournalStorage(JournalFileBackend(storage))
    return optuna.load_study(study_name=name, storage=backend)


@pytest.mark.slow
def test_trials_run_in_parallel_on_a_validation_split_and_are_scored_by_the_mean_over_seeds(tmp_path, postgres_uri):  # noqa: F811
    """The study lives in Optuna's RDB storage on a real PostgreSQL server (the journal file is what the
    other tests use)."""
    path = tune_file(tmp_path / "t.yaml", seeds=2)
    env = env_for(tmp_path)
    done = subprocess.run(tune_cmd(path, postgres_uri, "--trials", "4", "--max-parallel", "2"),
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "this run 4 trials (4 complete)" in done.stdout, done.stdout
    study = load_study(postgres_uri)
    runs = trial_runs(tmp_path)
    assert len(runs) == 8 and {r["status"] for r in runs.values()} == {"FINISHED"}
    for r in runs.values():  # validation metrics at every epoch, nothing from the test split
        assert sorted(r["metrics"]["val_error"]) == [1, 2, 3, 4, 5]
        assert not [k for k in r["metrics"] if k.startswith("test_")], r["metrics"].keys()
    parent = {r["tags"]["mlflow.parentRunId"] for r in runs.values()}
    assert len(parent) == 1 and query(tmp_path, f"SELECT value FROM tags WHERE run_uuid = '{parent.pop()}' "
                                                "AND key = 'adareg.study_run'") == [("tune-digits",)]
    by_trial: dict[str, list] = {}
    for r in runs.values():
        by_trial.setdefault(r["tags"]["adareg.trial"], []).append(r)
    for t in study.trials:
        seeds = by_trial[str(t.number)]
        assert t.state.name == "COMPLETE" and len(seeds) == 2
        assert t.value == pytest.approx(sum(r["metrics"]["val_error"][5] for r in seeds) / 2, abs=1e-12)
        assert t.intermediate_values[5] == pytest.approx(t.value)
        assert t.user_attrs["variant"] == f"tune-digits/trial-{t.number}"
    running, most = 0, 0  # worker processes at once, from the tuner's own start/end lines (in event order)
    for line in done.stdout.splitlines():
        running += (" start trial-" in line) - (" end   trial-" in line)
        most = max(most, running)
    assert most == 2 and running == 0, done.stdout  # two slots: two runs at a time, never more
    assert len(os.listdir(tmp_path / "marks")) == 8  # the guard was in every worker that loaded the data
    from sqlalchemy import create_engine, text  # Optuna's own heartbeat was recorded for each trial

    with create_engine(postgres_uri).connect() as con:
        assert con.execute(text("SELECT COUNT(DISTINCT trial_id) FROM trial_heartbeats")).scalar() == 4


@pytest.mark.slow
def test_three_tuners_at_once_on_a_fresh_store_and_journal(tmp_path):
    path = tune_file(tmp_path / "t.yaml", seeds=1, pruner="median")
    env = env_for(tmp_path)
    cmd = tune_cmd(path, str(tmp_path / "s.journal"), "--trials", "3", "--max-parallel", "1")
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
             for _ in range(3)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(outputs)
    text = "\n".join(outputs).lower()
    assert "locked" not in text and "migration" not in text and "duplicate column" not in text, text
    study = load_study(str(tmp_path / "s.journal"))
    ended = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(ended) == len(study.trials) == 9
    assert len({tuple(sorted(t.params.items())) for t in ended}) == 9  # distinct proposals
    runs = trial_runs(tmp_path)
    assert sorted(int(r["tags"]["adareg.trial"]) for r in runs.values()) == list(range(9))  # a run per trial
    assert len({r["tags"]["adareg.run_key"] for r in runs.values()}) == 9
    assert len(query(tmp_path, "SELECT run_uuid FROM tags WHERE key = 'adareg.study_run'")) >= 1
    assert len({r["tags"]["mlflow.parentRunId"] for r in runs.values()}) == 1  # one study run won


@pytest.mark.slow
def test_a_killed_tuners_trial_is_retried_by_the_next_and_resumes_its_runs(tmp_path):
    path = tune_file(tmp_path / "t.yaml", seeds=1, steps="[3]")  # 15 epochs
    env = env_for(tmp_path)
    storage = str(tmp_path / "s.journal")
    cmd = tune_cmd(path, storage, "--trials", "1", "--max-parallel", "1", "--trial-lease", "2")
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 120
    progress = []
    while time.monotonic() < deadline and first.poll() is None:
        progress = list((tmp_path / "runs").glob("*/progress.json"))
        if progress and yaml.safe_load(progress[0].read_text()).get("epoch", 0) >= 3:
            break
        time.sleep(0.1)
    assert first.poll() is None and progress, "the tuner ended before epoch 3"
    os.kill(first.pid, signal.SIGKILL)  # its worker gets SIGTERM (it dies with its parent): the run ends KILLED
    first.communicate(timeout=30)
    killed_at = yaml.safe_load(progress[0].read_text())["epoch"]
    time.sleep(2.5)  # past the lease
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "trial 0 of a tuner that stopped: failed and enqueued again" in second.stdout, second.stdout
    study = load_study(storage)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    old, new = study.trials
    assert new.params == old.params and new.user_attrs["variant"] == "tune-digits/trial-0"
    (run,) = trial_runs(tmp_path).values()  # the same MLflow run, resumed from its checkpoint
    assert run["status"] == "FINISHED" and int(run["tags"]["adareg.attempts"]) == 2
    assert sorted(run["metrics"]["val_error"]) == list(range(1, 16))
    counts = query(tmp_path, "SELECT COUNT(*), COUNT(DISTINCT step) FROM metrics WHERE key = 'val_error'")
    assert counts == [(15, 15)] and killed_at >= 3
    assert new.value == run["metrics"]["val_error"][15]


@pytest.mark.slow
def test_a_trials_seeds_train_as_one_pack(tmp_path):
    """``tune run --pack 2`` with two tuning seeds: each trial's two runs train as one fused model in one
    worker (tag ``adareg.pack`` ``<id>/2``), each its own MLflow run, and the trial is scored as unpacked.
    The launch options of ``sweep run`` reach a trial's workers too (``--store-timeout``, ``--claim-lease``)."""
    path = tune_file(tmp_path / "t.yaml", seeds=2)
    done = subprocess.run(tune_cmd(path, str(tmp_path / "s.journal"), "--trials", "2", "--max-parallel", "1",
                                   "--pack", "2", "--store-timeout", "123", "--claim-lease", "45"),
                          capture_output=True, text=True, env=env_for(tmp_path), cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    specs = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/spec.json")]
    assert len(specs) == 4 and {(s["store_timeout"], s["claim_lease"]) for s in specs} == {(123.0, 45.0)}
    assert len(list((tmp_path / "runs" / "packs").iterdir())) == 2  # one pack (one worker) per trial
    study = load_study(str(tmp_path / "s.journal"))
    runs = trial_runs(tmp_path)
    assert len(runs) == 4 and {r["status"] for r in runs.values()} == {"FINISHED"}
    by_trial: dict[str, list] = {}
    for r in runs.values():
        by_trial.setdefault(r["tags"]["adareg.trial"], []).append(r)
    for t in study.trials:
        seeds = by_trial[str(t.number)]
        packs = {r["tags"]["adareg.pack"] for r in seeds}
        assert len(seeds) == 2 and len(packs) == 1 and packs.pop().endswith("/2")
        assert t.state.name == "COMPLETE"
        assert t.value == pytest.approx(sum(r["metrics"]["val_error"][5] for r in seeds) / 2, abs=1e-12)


SPACE = {"scheme": {"weight_decay": {"taper": "power", "ref": 1.0e-4, "ref_lr": 0.1, "alpha": 0.0, "max": 0.01},
                    "dropout": {"taper": "power", "ref": 0.05, "ref_lr": 0.1, "alpha": 0.25, "max": 0.3}},
         "space": {"weight_decay.alpha": {"low": -1.0, "high": 1.0}, "dropout.max": {"low": 0.0, "high": 0.5}}}


@pytest.mark.slow
def test_trials_of_one_shape_train_as_one_pack_and_the_best_exports(tmp_path):
    """``tune run --pack 4`` with two tuning seeds and a space over a weight-decay taper's alpha and a dropout
    taper's ceiling: two trials are asked
    at once and their four runs train as one fused model in one worker; each trial is told the mean of its
    own seeds; the test split is never read; ``tune best --export`` writes the best trial's scheme beside
    the baselines."""
    path = tune_file(tmp_path / "t.yaml", seeds=2)
    doc = yaml.safe_load(path.read_text())
    doc["tune"] = {**{k: v for k, v in doc["tune"].items() if k not in ("weight_decay_base", "weight_decay_peak",
                                                                       "grad_sparsity")}, **SPACE}
    path.write_text(yaml.safe_dump(doc))
    env, journal = env_for(tmp_path), str(tmp_path / "s.journal")
    done = subprocess.run(tune_cmd(path, journal, "--trials", "2", "--max-parallel", "1", "--pack", "4"),
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(list((tmp_path / "runs" / "packs").iterdir())) == 1  # one worker for both trials
    assert os.listdir(tmp_path / "marks")  # the guard (test split never loaded) was in the worker
    runs = trial_runs(tmp_path)
    assert len(runs) == 4 and {r["status"] for r in runs.values()} == {"FINISHED"}
    assert len({r["tags"]["adareg.pack"] for r in runs.values()}) == 1
    assert {r["tags"]["adareg.pack"].endswith("/4") for r in runs.values()} == {True}
    study = load_study(journal)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    for t in study.trials:
        seeds = [r for r in runs.values() if r["tags"]["adareg.trial"] == str(t.number)]
        assert len(seeds) == 2 and "test_error" not in seeds[0]["metrics"]
        assert t.value == pytest.approx(sum(r["metrics"]["val_error"][5] for r in seeds) / 2, abs=1e-12)
        assert set(t.params) == {"weight_decay.alpha", "dropout.max"}
    best = subprocess.run([ADAREG, "tune", "best", str(path), "--storage", journal, "--export",
                           str(tmp_path / "best.yaml")], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    assert best.returncode == 0, best.stderr
    assert "\nweight_decay: {" in best.stdout and "\ndropout: {" in best.stdout  # the best scheme, field by field
    exported = load_sweep(tmp_path / "best.yaml")
    winner = min(study.trials, key=lambda t: t.value)
    tuned = exported.schemes["tuned"].model_dump(exclude_none=True)
    assert tuned["weight_decay"]["alpha"] == winner.params["weight_decay.alpha"]
    assert tuned["dropout"]["max"] == winner.params["dropout.max"] and tuned["dropout"]["ref"] == 0.05
    assert {"wd-1e-4", "wd-1e-3", "wd-8e-3", "01"} <= set(exported.schemes)


def test_tune_run_refuses_bad_input_in_one_line(tmp_path):
    path = tune_file(tmp_path / "t.yaml", seeds=1)
    text = textwrap.dedent
    done = subprocess.run(tune_cmd(path, str(tmp_path / "s.journal"), "--max-parallel", "0"), capture_output=True,
                          text=True, env=env_for(tmp_path), cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and done.stderr.strip() == text("error: --max-parallel 0: must be at least 1")


def cli(capsys, *args: str) -> tuple[int, str, str]:
    from orchestrator.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def test_dashboard_without_optuna_dashboard_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # import fails as if not installed
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adareg_tune").mkdir()
    (tmp_path / "adareg_tune" / "tune-digits.journal").write_text("")
    code, _, err = cli(capsys, "tune", "dashboard", TUNE, "--port", "8089")
    assert (code, err) == (2, "error: optuna-dashboard is not installed: pip install optuna-dashboard\n")


def test_tune_file_is_an_alias_of_tune_run(capsys):
    code, out, _ = cli(capsys, "tune", TUNE, "--help")
    assert code == 0 and "Run TRIALS more trials" in out and "--max-parallel" in out


@pytest.mark.slow
def test_a_trial_that_fails_with_an_error_stops_the_tuner_with_its_reason(tmp_path):
    path = tune_file(tmp_path / "t.yaml", seeds=1)
    done = subprocess.run(tune_cmd(path, str(tmp_path / "s.journal"), "--trials", "3", "--set", "tune.validation=0.95"),
                          capture_output=True, text=True, env=env_for(tmp_path), cwd=tmp_path, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.startswith("error: trial 0: ") and "left after the validation hold-out" in done.stderr
    assert "(no further trial started)" in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
    assert [t.state.name for t in load_study(str(tmp_path / "s.journal")).trials] == ["FAIL"]
