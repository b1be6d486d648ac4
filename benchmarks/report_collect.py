"""Benchmark of ``adareg report`` on a Table-1-sized MLflow store (not a test).

Builds (or reuses) a sqlite store holding the 200 runs of sweeps/table1.yaml, 450 epochs x every
metric the trainer logs (20: 1,800,000 metric rows), logged through MlflowClient exactly as the trainer logs them.
Then times the bulk collect + the whole report (figures and tables), and beside it the naive path:
one ``get_metric_history`` call per (run, metric) series, serially, on a sample of the series,
extrapolated to all of them.

    .venv/bin/python benchmarks/report_collect.py [--store DIR] [--rebuild] [--sample N]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.report.collect import (  # noqa: E402
    MECHANISM_METRICS,
    collect,
    read_client,
    read_histories,
    series,
)
from orchestrator.report.collect import REPORT_METRICS as FIGURE_METRICS  # noqa: E402
from orchestrator.report.render import write_report  # noqa: E402
from orchestrator.report.synthetic import ALL_METRICS, log_run  # noqa: E402
from orchestrator.store.client import connect  # noqa: E402
from orchestrator.store.runs import ensure_experiment, find_runs  # noqa: E402
from orchestrator.sweep.expand import expand  # noqa: E402
from orchestrator.sweep.file import load_sweep  # noqa: E402

SWEEP = ROOT / "sweeps" / "table1.yaml"
REPORT_METRICS = FIGURE_METRICS + MECHANISM_METRICS  # what `adareg report` reads


def _log_share(args: tuple[str, str, str, list[int]]) -> int:
    uri, experiment_id, path, indices = args
    sweep = load_sweep(path)
    planned = expand(sweep)
    client = connect(uri)
    for i in indices:
        log_run(client, experiment_id, planned[i].config, sweep.name)
    return len(indices)


def build(uri: str, processes: int = 2) -> float:
    """Log every run of the Table 1 sweep; the store is initialised here, in one process, first."""
    sweep = load_sweep(SWEEP)
    n = len(expand(sweep))
    start = time.perf_counter()
    experiment_id = ensure_experiment(connect(uri), sweep.experiment)
    shares = [(uri, experiment_id, str(SWEEP), list(range(p, n, processes))) for p in range(processes)]
    with get_context("spawn").Pool(processes) as pool:
        done = sum(pool.map(_log_share, shares))
    assert done == n
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=os.path.join(tempfile.gettempdir(), "adareg-report-bench"),
                    help="folder of the sqlite store (kept for reuse)")
    ap.add_argument("--rebuild", action="store_true", help="build the store again")
    ap.add_argument("--sample", type=int, default=200, help="series timed on the naive path")
    args = ap.parse_args()

    store = Path(args.store)
    store.mkdir(parents=True, exist_ok=True)
    db = store / "mlflow.db"
    uri = f"sqlite:///{db}"
    if args.rebuild and db.exists():
        db.unlink()
    sweep = load_sweep(SWEEP)
    planned = expand(sweep)
    if not db.exists():
        seconds = build(uri)
        print(f"build: {len(planned)} runs x 450 epochs x {len(ALL_METRICS)} metrics through MlflowClient "
              f"in {seconds:.1f} s ({db})")
    else:
        print(f"build: reusing {db} (--rebuild to rebuild)")

    client = connect(uri)
    for label, metrics in (("report", REPORT_METRICS), ("--no-mechanism", FIGURE_METRICS)):
        start, cpu0 = time.perf_counter(), os.times()
        col = collect(client, uri, sweep, planned, metrics)
        collected = time.perf_counter() - start
        rep = write_report(col, store / "report")
        total = time.perf_counter() - start
        cpu1 = os.times()
        cpu = sum(getattr(cpu1, f) - getattr(cpu0, f) for f in ("user", "system", "children_user", "children_system"))
        print(f"fast ({label}):  collect {collected:.2f} s ({len(col.frame):,} rows, {len(metrics)} metrics), "
              f"collect + report {total:.2f} s ({len(rep.figures)} + {len(rep.mechanism)} mechanism figures as PNG + "
              f"PDF, {len(rep.summary)} summary rows; target < 10 s: {'met' if total < 10 else 'MISSED'}); CPU time "
              f"{cpu:.2f} s including the figure workers; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
              "CPUs")

    runs = list(find_runs(client, sweep.experiment, None).values())
    start = time.perf_counter()
    every = read_histories(client, uri, runs, metrics=None)
    every_s = time.perf_counter() - start
    print(f"fast:  every metric of every run: {len(every):,} rows in {every_s:.2f} s")

    pairs = series(runs, REPORT_METRICS)
    sample = random.Random(0).sample(pairs, min(args.sample, len(pairs)))
    start = time.perf_counter()
    read_client(client, sample, workers=1)
    per_series = (time.perf_counter() - start) / len(sample)
    naive = per_series * len(pairs)
    print(f"naive: one get_metric_history per series, serially: {1000 * per_series:.1f} ms per series; "
          f"{len(pairs)} series (the report's {len(REPORT_METRICS)} metrics) extrapolated from {len(sample)}: "
          f"{naive:.1f} s for the collect alone")
    every_naive = per_series * len(series(runs, None))
    print(f"naive: every metric ({len(series(runs, None))} series) extrapolated: {every_naive:.1f} s")
    print(f"ratio: naive / fast collect = {naive / collected:.0f}x (report's metrics), "
          f"{every_naive / every_s:.0f}x (every metric); naive collect / fast collect + report = {naive / total:.1f}x")


if __name__ == "__main__":
    main()
