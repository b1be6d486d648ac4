"""``adareg report`` on a small MLflow store built in the test (runs logged as the trainer logs them).

The store: a 3-seed digits sweep of 5 schemes over 20 epochs (3 phases), with one seed never run,
one run stopped at epoch 12 (still RUNNING), and one step logged twice (the later row must win).
Beside them, runs no report may read: two newer, finished runs tagged ``adareg.superseded`` (one of
them of the stopped run's key) and a deleted run of the seed never run.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import orchestrator.report.collect as collect_mod
from orchestrator.errors import UserError
from orchestrator.identity import plan, run_key
from orchestrator.report import figures, mechanism
from orchestrator.report.collect import (
    FRAME_COLUMNS,
    MECHANISM_METRICS,
    REPORT_METRICS,
    collect,
    dedupe,
    read_histories,
    read_sql,
)
from orchestrator.report.stats import holm, method_line
from orchestrator.report.synthetic import log_run
from orchestrator.store.runs import find_runs
from orchestrator.store.tags import TAG_GROUP_KEY, TAG_RUN_KEY, TAG_SUPERSEDED
from orchestrator.sweep.expand import expand
from orchestrator.sweep.file import load_sweep
from training.callbacks import METRICS as ALL_METRICS
from training.callbacks import NO_DECAY, STAGES
from training.schedules import phase_bounds, plan_for

SWEEP = """
name: rep
experiment: adareg-rep
datasets: [digits]
archs: [resnet14]
seeds: [0, 1, 2]
train: {epochs_scale: 0.04, label_noise: 0.3}
schemes:
  wd-1e-4: {weight_decay: 0.0001}
  "01": {weight_decay: [0.0001, 0.0001, 0.0008, 0.0016, 0.0016]}
  wd-8e-3: {weight_decay: 0.008}
  "22":
    weight_decay: 0.0001
    grad_sparsity: [[0, 0, 0.8, 0.8, 0.8], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
  tuned: {weight_decay: [0.0001, 0.0002, 0.0004, 0.0008, 0.0016]}
"""
MISSING = ("01", 2)
PARTIAL = ("wd-8e-3", 1, 12)
RELOGGED = [("wd-1e-4", 0, "test_error", 20, 0.5),  # scheme, seed, metric, step, new value
            ("tuned", 1, "train_loss", 5, float("nan"))]
SUPERSEDED = [("wd-8e-3", 1), ("22", 0)]  # a newer, whole and finished history, but superseded
DELETED = [("01", 2)]
STALE_VALUE = 0.99  # the stale runs' test error at epoch 20


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(client, uri, sweep file, sweep, planned runs) of the module's store."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    tmp = tmp_path_factory.mktemp("report")
    sweep_file = tmp / "rep.yaml"
    sweep_file.write_text(SWEEP)
    sweep = load_sweep(sweep_file)
    planned = expand(sweep)
    configs = [p.config for p in planned]
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment(sweep.experiment, artifact_location=str(tmp / "artifacts"))
    for cfg in configs:
        if (cfg.scheme, cfg.seed) == MISSING:
            continue
        partial = (cfg.scheme, cfg.seed) == PARTIAL[:2]
        run_id = log_run(client, exp, cfg, sweep.name, epochs=PARTIAL[2] if partial else None)
        for scheme, seed, metric, step, value in RELOGGED:
            if (cfg.scheme, cfg.seed) == (scheme, seed):
                client.log_batch(run_id, metrics=[Metric(metric, value, 1_800_000_000_000, step)])
    for cfg in configs:
        if (cfg.scheme, cfg.seed) in SUPERSEDED + DELETED:
            run_id = log_run(client, exp, cfg, sweep.name, finished=False)
            client.log_batch(run_id, metrics=[Metric("test_error", STALE_VALUE, 1_900_000_000_000, 20)])
            client.set_terminated(run_id, "FINISHED")
            if (cfg.scheme, cfg.seed) in SUPERSEDED:
                client.set_tag(run_id, TAG_SUPERSEDED, "restarted from epoch 1")
            else:
                client.delete_run(run_id)
    return client, uri, sweep_file, sweep, planned


@pytest.fixture(scope="module")
def stale(store):
    """The store's superseded and deleted runs."""
    from mlflow.entities import ViewType

    client, _, _, sweep, _ = store
    exp = client.get_experiment_by_name(sweep.experiment).experiment_id
    runs = client.search_runs([exp], run_view_type=ViewType.ALL, max_results=1000)
    out = [r for r in runs if r.data.tags.get(TAG_SUPERSEDED) or r.info.lifecycle_stage == "deleted"]
    assert len(out) == 3
    return out


METRICS = REPORT_METRICS + ("train_loss",)


@pytest.fixture(scope="module")
def col(store):
    client, uri, _, sweep, planned = store
    return collect(client, uri, sweep, planned, METRICS)


def latest_history(client, run_id: str, metric: str) -> dict[int, float]:
    """MLflow's own client: step -> value, the latest timestamp winning."""
    out: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, metric):
        if m.step not in out or m.timestamp >= out[m.step][0]:
            out[m.step] = (m.timestamp, m.value)
    return {step: v for step, (_, v) in out.items()}


def test_collect_frame_holds_every_logged_epoch_with_its_phase(store, col):
    client, _, _, _, planned = store
    assert list(col.frame.columns) == FRAME_COLUMNS
    assert len(col.runs) == 15 and col.runs["run_id"].notna().sum() == 14
    assert len(col.frame) == (13 * 20 + 12) * 3
    for cfg in (p.config for p in planned):
        key = run_key(cfg)
        run = col.runs.set_index("run_key").loc[key]
        if pd.isna(run["run_id"]):
            continue
        phases = {e.epoch: e.phase for e in plan_for(cfg)}
        for metric in METRICS:
            mine = col.frame[(col.frame["run_key"] == key) & (col.frame["metric"] == metric)]
            theirs = latest_history(client, run["run_id"], metric)
            assert mine["epoch"].tolist() == sorted(theirs)
            np.testing.assert_array_equal(mine["value"], [theirs[e] for e in sorted(theirs)])  # NaN == NaN here
            assert all(phases[e] == p for e, p in zip(mine["epoch"], mine["phase"]))
            assert set(mine["scheme"]) == {cfg.scheme} and set(mine["seed"]) == {cfg.seed}


def test_a_step_logged_twice_keeps_the_latest_row(store, col):
    f = col.frame
    for scheme, seed, metric, step, value in RELOGGED:
        rows = f[(f["scheme"] == scheme) & (f["seed"] == seed) & (f["metric"] == metric) & (f["epoch"] == step)]
        assert len(rows) == 1
        assert rows["value"].iloc[0] == value or (math.isnan(value) and math.isnan(rows["value"].iloc[0]))


def test_sql_client_and_rest_paths_give_the_same_frame(store, stale, monkeypatch):
    """The sqlite fast path, a thread pool over get_metric_history, and MLflow's bulk endpoint
    served by an in-process tracking server; then the endpoint sampling a long series, which is
    read again in full. None of the three reads a superseded or deleted run."""
    from mlflow.server import ARTIFACT_ROOT_ENV_VAR, BACKEND_STORE_URI_ENV_VAR, app, handlers
    from werkzeug.serving import WSGIRequestHandler, make_server

    client, uri, _, sweep, _ = store
    runs = list(find_runs(client, sweep.experiment).values())
    sql = read_histories(client, uri, runs, None, "sql")
    assert len(sql) == (13 * 20 + 12) * len(ALL_METRICS)  # every metric the trainer logs
    pd.testing.assert_frame_equal(sql, read_histories(client, uri, runs, None, "client"))
    pd.testing.assert_frame_equal(sql, read_histories(client, uri, runs + stale, None, "sql"))
    pd.testing.assert_frame_equal(sql, read_histories(client, uri, runs + stale, None, "client"))
    assert read_sql(uri, [r.info.run_id for r in stale], None).empty  # the store itself is asked too
    pd.testing.assert_frame_equal(sql, dedupe(read_sql(uri, [r.info.run_id for r in runs + stale], None)))
    assert len(read_sql(uri, [r.info.run_id for r in runs[:1]], ["test_error"])) == len(
        client.get_metric_history(runs[0].info.run_id, "test_error"))

    class Quiet(WSGIRequestHandler):
        def log(self, *args, **kwargs):
            pass

    monkeypatch.setenv(BACKEND_STORE_URI_ENV_VAR, uri)
    monkeypatch.setenv(ARTIFACT_ROOT_ENV_VAR, str(Path(uri[len("sqlite:///"):]).parent / "artifacts"))
    monkeypatch.setattr(handlers, "_tracking_store", None)
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        from mlflow import MlflowClient

        http = f"http://127.0.0.1:{server.server_port}"
        pd.testing.assert_frame_equal(sql, read_histories(MlflowClient(http), http, runs + stale, None))
        monkeypatch.setattr(collect_mod, "REST_MAX_RESULTS", 7)  # every 20-epoch series is sampled
        pd.testing.assert_frame_equal(sql, read_histories(MlflowClient(http), http, runs + stale, None, "rest"))
    finally:
        server.shutdown()
        thread.join()


def test_missing_seeds_and_unfinished_runs_are_reported(col):
    assert col.warnings() == [
        "digits/resnet14/01: 1 of 3 seeds not in MLflow (seed 2)",
        "digits/resnet14/wd-8e-3 seed 1: drawn up to epoch 12 of 20 (RUNNING)",
    ]
    bands = figures.seed_bands(col.frame, ["test_loss"])
    n = bands[bands["scheme"] == "wd-8e-3"].set_index("epoch")["n"]
    assert (n.loc[1:12] == 3).all() and (n.loc[13:20] == 2).all()


def test_superseded_and_deleted_runs_are_not_part_of_the_report(store, stale, col):
    client, _, _, sweep, _ = store
    stale_ids = {r.info.run_id for r in stale}
    assert all(r.info.status == "FINISHED" for r in stale)  # finished and newer: they would win a key
    assert not stale_ids & set(col.runs["run_id"].dropna())
    assert not stale_ids & {r.info.run_id for r in find_runs(client, sweep.experiment).values()}
    f = col.frame
    assert not (f["run_key"].astype(str).isin([r.data.tags["adareg.run_key"] for r in stale if r.info.lifecycle_stage
                                               == "deleted"])).any()
    assert not ((f["metric"] == "test_error") & (f["value"] == STALE_VALUE)).any()


PLAN = {"wd-1e-4": "wd-8e-3", "01": "wd-8e-3", "wd-8e-3": "wd-1e-4", "22": "wd-1e-4", "tuned": "wd-8e-3"}
"""The default baselines in this sweep (no wd-1e-3): wd-8e-3 for the weight-decay side, wd-1e-4 for
22 and, as a fallback, for wd-8e-3 itself."""


def test_phase_summary_equals_mlflows_own_client_and_scipy_at_each_phases_last_epoch(store, tmp_path):
    """The acceptance check: every n, mean, best and worst cell of phase_summary.csv from MLflow's
    own client; every paired difference, CI and p from scipy's ttest_rel on the seeds both schemes
    reached; p_holm is Holm over each (metric, baseline) table."""
    from scipy import stats

    from orchestrator.report.render import write_report

    client, uri, _, sweep, planned = store
    rep = write_report(collect(client, uri, sweep, planned), tmp_path, workers=1)
    csv = pd.read_csv(tmp_path / "phase_summary.csv", dtype={"scheme": str, "baseline": str})
    assert len(csv) == 5 * 3 * 2  # one baseline each
    runs = find_runs(client, sweep.experiment).values()
    by_key = {r.data.tags["adareg.run_key"]: r for r in runs}
    ends = {}  # (scheme, phase, metric) -> {seed: value at the phase's last epoch}
    for scheme in sweep.schemes:
        cfgs = [c for c in (p.config for p in planned) if c.scheme == scheme and run_key(c) in by_key]
        bounds = phase_bounds(plan_for(cfgs[0]))
        for metric in ("test_loss", "test_error"):
            hist = {c.seed: latest_history(client, by_key[run_key(c)].info.run_id, metric) for c in cfgs}
            for phase, (first, last) in bounds.items():
                end = {seed: h[last] for seed, h in hist.items() if last in h}
                ends[(scheme, phase, metric)] = end
                row = csv[(csv["scheme"] == scheme) & (csv["phase"] == phase) & (csv["metric"] == metric)].iloc[0]
                assert (row["epoch"], row["n"]) == (last, len(end))
                assert row["mean"] == pytest.approx(np.mean(list(end.values())), rel=1e-12, abs=0)
                assert (row["best"], row["worst"]) == (min(end.values()), max(end.values()))
                assert (row["best_seed"], row["worst_seed"]) == (min(end, key=end.get), max(end, key=end.get))
                mins = [min(h[e] for e in range(first, last + 1)) for h in hist.values() if last in h]
                assert row["phase_min_best"] == min(mins)
    for row in csv.itertuples():
        assert (row.baseline, row.test) == (PLAN[row.scheme], "paired t-test")
        mine, theirs = ends[(row.scheme, row.phase, row.metric)], ends[(row.baseline, row.phase, row.metric)]
        seeds = sorted(set(mine) & set(theirs))
        a, b = [mine[s] for s in seeds], [theirs[s] for s in seeds]
        assert row.n_pairs == len(seeds)
        assert row.diff == pytest.approx(np.mean(np.subtract(a, b)), rel=1e-9)
        if len(seeds) < 2:  # 01 lacks seed 2, wd-8e-3 seed 1 stopped in phase 2: one pair, no test
            assert math.isnan(row.ci_low) and math.isnan(row.p_raw) and math.isnan(row.p_signflip)
            continue
        t = stats.ttest_rel(a, b)
        ci = t.confidence_interval(0.95)
        assert (row.ci_low, row.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-9)
        assert row.p_raw == pytest.approx(t.pvalue, rel=1e-9)
        d = np.subtract(a, b)
        flips = [abs(np.dot(signs, d)) >= abs(d.sum()) - 1e-12 for signs in itertools.product((1, -1), repeat=len(d))]
        assert row.p_signflip == pytest.approx(np.mean(flips), rel=1e-12)
    pairs = csv.set_index(["scheme", "phase", "metric"])["n_pairs"]
    assert pairs[("01", 1, "test_error")] == 2 and pairs[("01", 2, "test_error")] == 1
    assert pairs[("wd-8e-3", 2, "test_error")] == 2 and pairs[("22", 2, "test_error")] == 3
    for _, table in csv.groupby(["metric", "baseline"]):
        assert table["p_holm"].to_numpy() == pytest.approx(holm(table["p_raw"].to_numpy()), rel=1e-12, nan_ok=True)
    relogged = csv[(csv["scheme"] == "wd-1e-4") & (csv["phase"] == 3) & (csv["metric"] == "test_error")].iloc[0]
    assert relogged["worst"] == 0.5
    partial = csv[(csv["scheme"] == "wd-8e-3") & (csv["metric"] == "test_loss")].set_index("phase")["n"]
    assert partial.to_dict() == {1: 3, 2: 2, 3: 2}
    assert rep.summary["n"].tolist() == csv["n"].tolist()
    assert csv.loc[csv["scheme"] == "tuned", "selected_on_validation"].all()
    assert not csv.loc[csv["scheme"] != "tuned", "selected_on_validation"].any()


def test_figures_draw_the_runs_the_table_names_best_and_worst(col):
    """The sparsity figure of the store: per axis and scheme the mean and the best and worst run,
    which are the runs phase_summary names best and worst by test error at the phase's end."""
    from orchestrator.report.stats import phase_summary

    palette = figures.scheme_palette(col.schemes)
    metrics = figures.FIGURE_METRICS + ("train_loss",)
    bands = figures.seed_bands(col.frame, metrics)
    picks = figures.pick_runs(col.frame, col.phase_bounds())
    curves = figures.picked_curves(col.frame, picks, metrics)
    present = col.frame[["dataset", "arch", "scheme"]].drop_duplicates().astype(str)
    specs = {s.family: s for s in figures.figure_specs(present, col.schemes, {k: (v,) for k, v in PLAN.items()})}
    assert {f: s.schemes for f, s in specs.items()} == {
        "weight-decay": ("wd-1e-4", "01", "wd-8e-3"), "sparsity": ("wd-1e-4", "22"), "other": ("wd-8e-3", "tuned")}
    spec = specs["sparsity"]
    plans = {s: col.scheme_plan("digits", "resnet14", s) for s in spec.schemes}
    labels = {s: f"label {s}" for s in spec.schemes}
    fig = figures.draw(spec, bands, plans, labels, palette, metrics, picks, curves)
    axes = fig.axes
    assert len(axes) == 9
    assert [ax.get_title() for ax in axes[:3]] == ["phase 1 (epochs 1–10)", "phase 2 (epochs 11–15)",
                                                    "phase 3 (epochs 16–20)"]
    assert [axes[i].get_ylabel() for i in (0, 3, 6)] == ["test loss (log)", "test error", "train loss (log)"]
    assert [ax.get_yscale() for ax in axes[::3]] == ["log", "linear", "log"]
    assert [ax.get_xlim() for ax in axes[:3]] == [(0.5, 10.5), (10.5, 15.5), (15.5, 20.5)]
    summary = phase_summary(col.frame, col.phase_bounds(), metrics=("test_error",))
    summary = summary.drop_duplicates(["scheme", "phase"]).set_index(["scheme", "phase"])
    _, legend = fig.legends
    texts = [t.get_text() for t in legend.get_texts()]
    assert [t.split(";")[0] for t in texts] == ["label wd-1e-4", "label 22"]
    for i, ax in enumerate(axes):
        phase = i % 3 + 1
        expected = []
        for s in spec.schemes:
            best, worst = summary.loc[(s, phase), ["best_seed", "worst_seed"]]
            expected += [f"{s}: worst run (seed {worst})", f"{s}: best run (seed {best})", f"{s}: mean of 3 seeds"]
        curves_ = [ln for ln in ax.lines if not ln.get_label().startswith("_")]
        assert [ln.get_label() for ln in curves_] == expected
        assert [ln.get_color() for ln in curves_] == [palette["wd-1e-4"]] * 3 + [palette["22"]] * 3
        assert len(ax.collections) == 0  # no envelope unless asked
        assert len([ln for ln in ax.lines if ln.get_linestyle() == ":"]) == 4  # 5 learning-rate steps
    mean_22 = [ln for ln in axes[3].lines if ln.get_label() == "22: mean of 3 seeds"][0]
    b = bands[(bands["scheme"] == "22") & (bands["metric"] == "test_error") & (bands["phase"] == 1)]
    assert list(mean_22.get_ydata()) == pytest.approx(list(b["mean"]))
    best = summary.loc[("22", 1), "best_seed"]
    run = [ln for ln in axes[3].lines if ln.get_label() == f"22: best run (seed {best})"][0]
    f = col.frame
    theirs = f[(f["scheme"] == "22") & (f["seed"] == best) & (f["metric"] == "test_error") & (f["epoch"] <= 10)]
    assert list(run.get_ydata()) == theirs["value"].tolist()


def test_mechanism_figure_draws_each_stage_and_the_decay_timescale(store):
    """Rows: test loss, test error, weight norm, effective step, decay timescale; a line per scheme (and per stage
    in rows 3-4, in the stage's style), each the mean over seeds; the timescale of an epoch without decay is
    not drawn."""
    client, uri, _, sweep, planned = store
    col = collect(client, uri, sweep, planned, REPORT_METRICS + MECHANISM_METRICS)
    assert set(col.frame["metric"].astype(str)) == set(REPORT_METRICS + MECHANISM_METRICS)
    spec = figures.FigureSpec("digits", "resnet14", "weight-decay", ("wd-1e-4", "01"))
    plans = {s: col.scheme_plan("digits", "resnet14", s) for s in spec.schemes}
    bands = figures.seed_bands(col.frame, mechanism.DRAWN)
    bands.loc[(bands["scheme"] == "01") & (bands["metric"] == "decay_epochs") & (bands["epoch"] == 3),
              "mean"] = NO_DECAY
    palette = figures.scheme_palette(col.schemes)
    fig = mechanism.draw_mechanism(spec, bands, plans, {s: s for s in spec.schemes}, palette)
    axes = fig.axes  # a row per quantity, the phases side by side on one epoch axis
    assert len(axes) == 5
    assert [ax.get_ylabel() for ax in axes] == [
        "test loss (log)", "test error", "weight norm ‖w‖ (log)", "effective step lr/‖w‖² (log)",
        "decay timescale (epochs) (log)"]
    assert [ax.get_yscale() for ax in axes] == ["log", "linear", "log", "log", "log"]
    assert [t.get_text() for t in axes[0].texts if t.get_text().startswith("phase")] == [
        "phase 1 (epochs 1–10)", "phase 2 (epochs 11–15)", "phase 3 (epochs 16–20)"]
    assert all(ax.get_xlim() == (0.5, 20.5) for ax in axes)

    def curves(ax):
        return [ln for ln in ax.lines if not ln.get_label().startswith("_")]

    assert [ln.get_label() for ln in curves(axes[2])] == [
        f"{s}: weight_norm_{st}, mean of {n}" for s, n in (("wd-1e-4", 3), ("01", 2)) for st in STAGES]
    styles = [ln.get_linestyle() for ln in curves(axes[3])]
    assert styles[:4] == styles[4:] and len(set(styles[:4])) == 4  # one style per stage
    f = col.frame
    for ax, metric in ((axes[2], "weight_norm_stage2"), (axes[3], "effective_lr_stage2")):  # every epoch
        line = next(ln for ln in curves(ax) if ln.get_label().startswith(f"01: {metric}"))
        one = f[(f["scheme"] == "01") & (f["metric"] == metric)]
        assert list(line.get_xdata()) == list(range(1, 21))
        assert list(line.get_ydata()) == pytest.approx(one.groupby("epoch")["value"].mean().tolist(), rel=1e-12)
    decay = next(ln for ln in curves(axes[4]) if ln.get_label().startswith("01:"))
    assert math.isnan(decay.get_ydata()[2]) and not np.isnan(np.delete(decay.get_ydata(), 2)).any()
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "first convolution", "stage 1 (16 ch.)", "stage 2 (32 ch.)", "stage 3 (64 ch.)"]


def cli(capsys, *args: str) -> subprocess.CompletedProcess:
    from orchestrator.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, exit_.value.code, out, err)


def test_cli_report_writes_figures_tables_and_logs_them_to_mlflow(store, tmp_path, capsys):
    client, uri, sweep_file, sweep, _ = store
    out = tmp_path / "rep"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file: not part of the report")
    proc = cli(capsys, "report", str(sweep_file), "--tracking-uri", uri, "--out", str(out), "--log-to-mlflow",
               "--train-loss")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "warning: digits/resnet14/01: 1 of 3 seeds not in MLflow (seed 2)",
        "warning: digits/resnet14/wd-8e-3 seed 1: drawn up to epoch 12 of 20 (RUNNING)"]
    stems = ["digits-resnet14-weight-decay", "digits-resnet14-sparsity", "digits-resnet14-other"]
    for stem, legend_rows in zip(stems, (3, 2, 2)):  # one column of schemes, and the line-style key
        png = Image.open(out / "figures" / f"{stem}.png")
        assert png.info["dpi"][0] >= 150
        assert png.size[1] == round(160 * (3 * 2.3 + 0.95 + 0.65 + 0.25 * (legend_rows + 1)))  # 3 rows: train loss
        assert (out / "figures" / f"{stem}.pdf").read_bytes().startswith(b"%PDF")
    for stem in stems:  # the mechanism figures: 5 rows; the schemes' labels fit on one row, and the stages' key
        png = Image.open(out / "figures" / f"{stem}-mechanism.png")
        assert png.size[1] == round(160 * (5 * 2.3 + 1.1 + 0.65 + 0.25 * 2))  # a line of phase titles on top
        assert (out / "figures" / f"{stem}-mechanism.pdf").read_bytes().startswith(b"%PDF")
    report_md = (out / "report.md").read_text()
    assert report_md.count("Does the taper act?") == 3
    for link in [f"figures/{s}{m}.{ext}" for s in stems for m in ("", "-mechanism") for ext in ("png", "pdf")] + [
            "phase_summary.csv", "phase_summary.md", "runs.csv"]:
        assert f"]({link})" in report_md
    assert "1 of 3 seeds not in MLflow (seed 2)" in report_md
    assert report_md.count(method_line(True, 3)) == 1 and "cannot fall below 2/2^n: 0.25 with 3 pairs" in report_md
    assert "- `tuned` (selected on validation) against `wd-8e-3`" in report_md
    assert "- `22` against `wd-1e-4`" in report_md
    assert "| `tuned` (selected on validation) | 3 | " in report_md  # the end-of-training table
    md = (out / "phase_summary.md").read_text()
    assert md.count("| `tuned` (selected on validation) |") == 12  # 3 phases x 2 metrics x (spread, against wd-8e-3)
    assert md.count("against `wd-8e-3` (paired t-test)") == 2 and md.count("against `wd-1e-4` (paired t-test)") == 2
    runs = client.search_runs([client.get_experiment_by_name(sweep.experiment).experiment_id],
                              filter_string="tags.`adareg.kind` = 'report'")
    assert len(runs) == 1 and runs[0].info.run_name == "report" and runs[0].info.status == "FINISHED"
    logged = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert logged == {"figures", "phase_summary.csv", "phase_summary.md", "report.md", "runs.csv"}
    assert len(client.list_artifacts(runs[0].info.run_id, "figures")) == 12  # 3 figures + 3 mechanism, PNG + PDF


def test_cli_report_of_a_selection_and_bad_baseline(store, tmp_path, capsys):
    _, uri, sweep_file, _, _ = store
    proc = cli(capsys, "report", str(sweep_file), "--tracking-uri", uri, "--out", str(tmp_path),
               "--only", "scheme=wd-1e-4,22", "--baseline", "22", "--envelope")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "digits-resnet14-sparsity-mechanism.pdf", "digits-resnet14-sparsity-mechanism.png",
        "digits-resnet14-sparsity.pdf", "digits-resnet14-sparsity.png"]
    png = Image.open(tmp_path / "figures" / "digits-resnet14-sparsity.png")
    assert png.size[1] == round(160 * (2 * 2.3 + 0.95 + 0.65 + 0.25 * 3))  # 2 rows; 2 schemes and the key
    summary = pd.read_csv(tmp_path / "phase_summary.csv", dtype={"scheme": str, "baseline": str})
    assert set(summary["scheme"]) == {"wd-1e-4", "22"} and set(summary["baseline"].dropna()) == {"22"}
    assert (summary.loc[summary["scheme"] == "wd-1e-4", "test"] == "paired t-test").all()

    proc = cli(capsys, "report", str(sweep_file), "--tracking-uri", uri, "--out", str(tmp_path / "u"),
               "--only", "scheme=wd-1e-4,01,wd-8e-3", "--baseline", "wd-1e-4", "--baseline", "wd-8e-3", "--unpaired",
               "--rank-by", "test_loss")
    assert proc.returncode == 0, proc.stderr
    summary = pd.read_csv(tmp_path / "u" / "phase_summary.csv", dtype={"scheme": str, "baseline": str})
    assert len(summary) == (1 + 2 + 1) * 3 * 2  # 01 against both baselines, the baselines each other
    assert (summary["test"] == "Welch t-test").all() and summary["n_pairs"].isna().all()
    assert summary.groupby("scheme", sort=False)["baseline"].unique().map(tuple).to_dict() == {
        "wd-1e-4": ("wd-8e-3",), "01": ("wd-1e-4", "wd-8e-3"), "wd-8e-3": ("wd-1e-4",)}
    report_md = (tmp_path / "u" / "report.md").read_text()
    assert method_line(False) in report_md and "by the lowest and highest test loss" in report_md

    proc = cli(capsys, "report", str(sweep_file), "--tracking-uri", uri, "--out", str(tmp_path / "b"),
               "--only", "scheme=22", "--baseline", "wd-1e-4")
    assert proc.returncode == 0
    assert proc.stderr == "warning: baseline 'wd-1e-4' has no runs in this selection: no differences to it\n"
    proc = cli(capsys, "report", str(sweep_file), "--tracking-uri", uri, "--out", str(tmp_path / "c"),
               "--only", "scheme=01,22")
    assert proc.returncode == 0
    assert proc.stderr == ("warning: digits/resnet14/01: 1 of 3 seeds not in MLflow (seed 2)\n"
                           "warning: none of the default baselines (wd-1e-3, wd-8e-3, wd-1e-4) has runs in this "
                           "selection: no differences (choose one with --baseline)\n")
    proc = cli(capsys, "report", str(sweep_file), "--tracking-uri", uri, "--out", str(tmp_path), "--baseline", "22",
               "--baseline", "wd-9")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: --baseline: scheme 'wd-9' is not in sweep 'rep' "
                                   "(its schemes: wd-1e-4, 01, wd-8e-3, 22, tuned)")


def test_cli_report_of_a_sweep_without_runs_says_what_to_do(store, tmp_path, capsys):
    _, uri, sweep_file, _, _ = store
    proc = cli(capsys, "report", str(sweep_file), "--tracking-uri", uri, "--out", str(tmp_path / "x"),
               "--set", "experiment=adareg-empty")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: no runs of sweep 'rep' in experiment 'adareg-empty' at {uri}: "
                                   f"run 'adareg sweep run {sweep_file}' first")
    assert not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="no runs of sweep 'rep'"):
        collect(store[0], uri, load_sweep(sweep_file), [plan(p.config.replace(seed=9)) for p in store[4][:2]])


def test_cli_report_on_a_missing_store_creates_nothing(store, tmp_path, capsys):
    _, _, sweep_file, _, _ = store
    uri = f"sqlite:///{tmp_path}/absent.db"
    proc = cli(capsys, "report", str(sweep_file), "--tracking-uri", uri, "--out", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: no MLflow store at {uri}: nothing has been run there yet "
                                   f"(adareg sweep run {sweep_file})")
    assert proc.stdout.splitlines()[0] == f"store {uri}: no such store ({tmp_path}/absent.db does not exist): " \
                                          "nothing has been run here yet"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_runs_that_logged_no_epoch_yet_are_not_a_report(store):
    client, uri, sweep_file, _, planned = store
    sweep = load_sweep(sweep_file, sets=["experiment=adareg-started"])
    exp = client.create_experiment(sweep.experiment)
    client.create_run(exp, tags={TAG_RUN_KEY: planned[0].key, TAG_GROUP_KEY: planned[0].group})
    with pytest.raises(UserError) as err:
        collect(client, uri, sweep, planned)
    assert str(err.value) == (f"the 1 run of sweep 'rep' in experiment 'adareg-started' at {uri} have logged no "
                              "epoch yet: nothing to report")


def test_a_schemes_legend_names_every_taper_it_uses():
    from training.config import RunConfig

    plain = RunConfig(weight_decay=[1e-4, 1e-4, 8e-4, 1.6e-3, 1.6e-3], grad_sparsity=0.0)
    assert figures.describe(plain) == "wd 1e-4→8e-4→1.6e-3"
    tapered = RunConfig(lr={"family": "cosine", "max": 0.1, "min": 1e-5, "steps": 5}, grad_sparsity=0.0,
                        weight_decay=1e-5, weight_decay_mode="decoupled",
                        dropout={"taper": "table", "values": {0.1: 0.0, 0.01: 0.3}},
                        batch_sizes={"taper": "table", "values": {0.1: 50, 0.001: 10}})
    label = figures.describe(tapered)
    assert label.startswith("cosine lr, decoupled wd 1e-5") and ", dropout 0" in label and ", batch 50" in label
