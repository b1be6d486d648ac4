"""Collect a sweep's runs and their metric histories from MLflow into one long pandas frame.

Histories are read in bulk: one SQL query per chunk of runs on a database store (sqlite,
PostgreSQL, MySQL), MLflow's ``get-history-bulk-interval`` endpoint on an http(s) server, and a
thread pool over ``get_metric_history`` anywhere else. All three give the same frame; where a
(run, metric, step) was logged twice, the row with the latest timestamp wins.

Deleted runs and runs tagged ``adareg.superseded`` (old histories kept for inspection) are never
part of a report: the run search skips them, and so does every history reader.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

from orchestrator.errors import UserError
from orchestrator.identity import Planned
from orchestrator.store.runs import find_runs
from orchestrator.store.tags import TAG_GIT_COMMIT, TAG_SUPERSEDED, TAG_VERSION
from training.callbacks import DIAGNOSTICS
from training.config import RunConfig
from training.schedules import EpochPlan, phase_bounds, plan_for

REPORT_METRICS = ("test_loss", "test_error")  # what the figures and tables show (train_loss on request)
MECHANISM_METRICS = tuple(m for m in DIAGNOSTICS if m != "weight_norm_fc")
"""What the mechanism figures show beside them (``training.diagnostics``; the classifier's norm is not drawn)."""
HISTORY_COLUMNS = ["run_id", "metric", "step", "timestamp", "value"]
FRAME_COLUMNS = ["run_key", "group_key", "dataset", "arch", "scheme", "seed", "epoch", "phase", "metric", "value"]
DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
SQL_CHUNK = 500  # run ids per query (well under sqlite's bound-variable limit)
REST_CHUNK = 100  # run ids per get-history-bulk-interval request (the server's limit)
REST_MAX_RESULTS = 2500  # points per run and request (the server's limit); more are sampled
METHODS = ("auto", "sql", "rest", "client")


@dataclass
class Collection:
    """The runs of an expanded sweep and their histories."""

    sweep: str
    experiment: str
    uri: str
    schemes: tuple[str, ...]
    """Every scheme of the sweep file, in file order (fixes each scheme's colour)."""
    configs: dict[str, RunConfig]
    """Expanded run key -> config (the selection, found in MLflow or not)."""
    runs: pd.DataFrame
    """One row per expected run: run_key, group_key, dataset, arch, scheme, seed, epochs (planned),
    run_id and status (None when not in MLflow), last_epoch (0 when nothing was logged)."""
    frame: pd.DataFrame
    """The long frame: FRAME_COLUMNS, one row per run, metric and epoch."""
    plans: dict[str, tuple[EpochPlan, ...]]
    """Group key -> the per-epoch plan of its runs (they differ only in the seed)."""

    @property
    def missing(self) -> pd.DataFrame:
        return self.runs[self.runs["run_id"].isna()]

    @property
    def incomplete(self) -> pd.DataFrame:
        found = self.runs[self.runs["run_id"].notna()]
        return found[found["last_epoch"] < found["epochs"]]

    def scheme_config(self, dataset: str, arch: str, scheme: str) -> RunConfig:
        """A config of the group of ``dataset/arch/scheme`` (its runs differ only in the seed)."""
        return next(c for c in self.configs.values() if (c.dataset, c.arch, c.scheme) == (dataset, arch, scheme))

    def scheme_plan(self, dataset: str, arch: str, scheme: str) -> tuple[EpochPlan, ...]:
        """The per-epoch plan of the group of ``dataset/arch/scheme``."""
        r = self.runs
        group = r.loc[(r["dataset"] == dataset) & (r["arch"] == arch) & (r["scheme"] == scheme), "group_key"]
        return self.plans[group.iloc[0]]

    def phase_bounds(self) -> pd.DataFrame:
        """group_key, phase, first, last: the planned epochs of each phase of each group."""
        rows = [(g, phase, first, last) for g, plan in self.plans.items()
                for phase, (first, last) in phase_bounds(plan).items()]
        return pd.DataFrame(rows, columns=["group_key", "phase", "first", "last"])

    def warnings(self) -> list[str]:
        """One line per group with missing seeds, one per run that has not finished."""
        lines = []
        missing = self.missing
        for (dataset, arch, scheme), g in missing.groupby(["dataset", "arch", "scheme"], sort=False):
            total = int((self.runs["group_key"] == g["group_key"].iloc[0]).sum())
            seeds = ", ".join(str(s) for s in sorted(g["seed"]))
            lines.append(f"{dataset}/{arch}/{scheme}: {len(g)} of {total} seeds not in MLflow (seed {seeds})")
        for r in self.incomplete.itertuples():
            done = f"drawn up to epoch {r.last_epoch}" if r.last_epoch else "no epoch logged yet"
            lines.append(f"{r.dataset}/{r.arch}/{r.scheme} seed {r.seed}: {done} of {r.epochs} ({r.status})")
        return lines


def collect(client, uri: str, sweep, planned: Sequence[Planned], metrics: Sequence[str] | None = REPORT_METRICS,
            method: str = "auto", sweep_file: str = "FILE", found: dict | None = None) -> Collection:
    """Find the planned runs (the expanded ``sweep``) in MLflow and read their histories.

    ``metrics=None`` reads every metric. Raises UserError when none of the runs is in MLflow
    (its hint names ``sweep_file``) or none has logged an epoch. ``found``: ``find_runs``'s answer for the
    sweep's experiment, when the caller has read it already.
    """
    by_key = {p.key: p.config for p in planned}
    groups = {p.key: p.group for p in planned}
    if found is None:
        found = find_runs(client, sweep.experiment, list(by_key)) if by_key else {}
    found = {k: run for k, run in found.items() if k in by_key}
    if not found:
        raise UserError(f"no runs of sweep '{sweep.name}' in experiment '{sweep.experiment}' at {uri}: "
                        f"run 'adareg sweep run {sweep_file}' first")
    plans: dict[str, tuple[EpochPlan, ...]] = {}
    for k, g in groups.items():
        if g not in plans:
            plans[g] = plan_for(by_key[k])
    runs = pd.DataFrame([{
        "run_key": k, "group_key": groups[k], "dataset": cfg.dataset, "arch": cfg.arch, "scheme": cfg.scheme,
        "seed": cfg.seed, "epochs": len(plans[groups[k]]),
        "run_id": found[k].info.run_id if k in found else None,
        "status": found[k].info.status if k in found else None,
        "adareg_version": found[k].data.tags.get(TAG_VERSION) if k in found else None,
        "git_commit": found[k].data.tags.get(TAG_GIT_COMMIT) if k in found else None,
    } for k, cfg in by_key.items()])
    history = read_histories(client, uri, [found[k] for k in by_key if k in found], metrics, method)
    frame = long_frame(history, runs, {k: plans[groups[k]] for k in found})
    if frame.empty:
        runs_ = f"{len(found)} run{'s' if len(found) != 1 else ''}"
        raise UserError(f"the {runs_} of sweep '{sweep.name}' in experiment '{sweep.experiment}' at {uri} "
                        f"have logged no epoch yet: nothing to report")
    last = frame.groupby("run_key", observed=True)["epoch"].max()
    runs["last_epoch"] = runs["run_key"].map(last).fillna(0).astype(int)
    return Collection(sweep.name, sweep.experiment, uri, tuple(sweep.schemes), by_key, runs, frame, plans)


def reportable(run) -> bool:  # find_runs already leaves these out; histories read by run id check again
    """Whether an MLflow run belongs in a report: active (not deleted) and not superseded."""
    return run.info.lifecycle_stage == "active" and not run.data.tags.get(TAG_SUPERSEDED)


def long_frame(history: pd.DataFrame, runs: pd.DataFrame, plans: dict[str, Sequence[EpochPlan]]) -> pd.DataFrame:
    """Join deduplicated histories (HISTORY_COLUMNS) with the runs and each epoch's phase.

    Steps outside a run's plan (before epoch 1 or after its last) cannot be placed in a phase
    and are dropped.
    """
    found = runs[runs["run_id"].notna()].reset_index(drop=True)
    idx = pd.Index(found["run_id"]).get_indexer(history["run_id"])
    keys = found["run_key"].tolist()
    lengths = np.array([len(plans[k]) for k in keys], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    phases = np.fromiter((e.phase for k in keys for e in plans[k]), dtype=np.int64, count=int(lengths.sum()))
    step = history["step"].to_numpy(dtype=np.int64)
    ok = (idx >= 0) & (step >= 1) & (step <= np.where(idx >= 0, lengths[idx], 0))
    idx, step = idx[ok], step[ok]

    def cat(col: str) -> pd.Categorical:
        return pd.Categorical(found[col].to_numpy()[idx])

    frame = pd.DataFrame({
        "run_key": pd.Categorical.from_codes(idx, categories=found["run_key"]),
        "group_key": cat("group_key"),
        "dataset": cat("dataset"),
        "arch": cat("arch"),
        "scheme": cat("scheme"),
        "seed": found["seed"].to_numpy(dtype=np.int64)[idx],
        "epoch": step,
        "phase": phases[offsets[idx] + step - 1],
        "metric": pd.Categorical(history["metric"].to_numpy()[ok]),
        "value": history["value"].to_numpy(dtype=np.float64)[ok],
    })
    return frame.sort_values(["run_key", "metric", "epoch"], kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# reading histories


def read_histories(client, uri: str, runs: Sequence, metrics: Sequence[str] | None = REPORT_METRICS,
                   method: str = "auto", workers: int = 8) -> pd.DataFrame:
    """HISTORY_COLUMNS of ``runs`` (MLflow Run objects), one row per (run, metric, step).

    ``method``: ``sql`` (a database store), ``rest`` (an http(s) server), ``client`` (a thread pool
    of ``workers`` over ``get_metric_history``), or ``auto`` (the first that fits ``uri``). Runs that
    are not ``reportable`` (deleted, superseded) are left out; the SQL query checks that in the store
    too.
    """
    if method not in METHODS:
        raise UserError(f"unknown history method {method!r} (expected one of {', '.join(METHODS)})")
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if method == "auto":
        method = "sql" if scheme in DB_SCHEMES else "rest" if scheme in ("http", "https") else "client"
    runs = [r for r in runs if reportable(r)]
    if not runs:
        return dedupe(pd.DataFrame(columns=HISTORY_COLUMNS))
    if method == "sql":
        raw = read_sql(uri, [r.info.run_id for r in runs], metrics)
    elif method == "rest":
        raw = read_rest(client, uri, runs, metrics)
    else:
        raw = read_client(client, series(runs, metrics), workers)
    return dedupe(raw)


def series(runs: Sequence, metrics: Sequence[str] | None) -> list[tuple[str, str]]:
    """(run_id, metric) of every logged series of ``runs`` (all metrics when None)."""
    wanted = None if metrics is None else set(metrics)
    return [(r.info.run_id, k) for r in runs for k in sorted(r.data.metrics) if wanted is None or k in wanted]


def dedupe(raw: pd.DataFrame) -> pd.DataFrame:
    """Typed HISTORY_COLUMNS (run_id and metric as categories), sorted by run, metric and step, keeping the
    latest timestamp per (run, metric, step) (the highest value among equal timestamps).

    Sorted on integer codes (categories in string order): a million rows in a fraction of a second, where
    sorting the strings themselves took seconds."""
    run, metric = sorted_categorical(raw["run_id"]), sorted_categorical(raw["metric"])
    step = pd.to_numeric(raw["step"]).to_numpy(dtype=np.int64)
    timestamp = pd.to_numeric(raw["timestamp"]).to_numpy(dtype=np.int64)
    value = np.asarray(raw["value"], dtype=np.float64)  # float() also reads the JSON strings 'NaN', 'Infinity'
    order = np.lexsort((value, timestamp, step, metric.codes, run.codes))  # the last key sorts first
    r, m, s = run.codes[order], metric.codes[order], step[order]
    last = np.ones(len(order), dtype=bool)
    last[:-1] = (r[1:] != r[:-1]) | (m[1:] != m[:-1]) | (s[1:] != s[:-1])
    keep = order[last]
    return pd.DataFrame({"run_id": run[keep], "metric": metric[keep], "step": step[keep],
                         "timestamp": timestamp[keep], "value": value[keep]})


def sorted_categorical(values) -> pd.Categorical:
    """``values`` (strings) as a Categorical whose categories are sorted, so that its codes sort as the strings."""
    if isinstance(getattr(values, "dtype", None), pd.CategoricalDtype):
        cat = pd.Categorical(values)
        return cat.reorder_categories(sorted(cat.categories, key=str))
    codes, uniques = pd.factorize(np.asarray(values, dtype=object), sort=True)
    return pd.Categorical.from_codes(codes, [str(u) for u in uniques])


def read_sql(uri: str, run_ids: Sequence[str], metrics: Sequence[str] | None) -> pd.DataFrame:
    """The ``metrics`` table of a database store, one query per SQL_CHUNK runs; deleted and superseded
    runs are skipped (asked of the store first, in one small query per chunk, so that the large one reads
    the metrics table alone)."""
    import sqlalchemy as sa

    active = sa.text(
        "SELECT r.run_uuid FROM runs r WHERE r.run_uuid IN :ids AND r.lifecycle_stage = 'active' AND NOT EXISTS ("
        "SELECT 1 FROM tags t WHERE t.run_uuid = r.run_uuid AND t.key = :superseded AND t.value <> '')"
    ).bindparams(sa.bindparam("ids", expanding=True))
    query = "SELECT m.run_uuid, m.key, m.step, m.timestamp, m.value, m.is_nan FROM metrics m WHERE m.run_uuid IN :ids"
    params: dict = {}
    bind = [sa.bindparam("ids", expanding=True)]
    if metrics is not None:
        query += " AND m.key IN :keys"
        params["keys"] = list(metrics)
        bind.append(sa.bindparam("keys", expanding=True))
    stmt = sa.text(query).bindparams(*bind)
    engine = sa.create_engine(uri)
    rows: list = []
    try:
        with engine.connect() as conn:
            for chunk in chunks(list(run_ids), SQL_CHUNK):  # plain DBAPI tuples: 3x faster than Rows
                ids = [r for r, in conn.execute(active, {"ids": chunk, "superseded": TAG_SUPERSEDED}).cursor.fetchall()]
                if ids:
                    rows.extend(conn.execute(stmt, {"ids": ids, **params}).cursor.fetchall())
    finally:
        engine.dispose()
    if not rows:
        return pd.DataFrame(columns=HISTORY_COLUMNS)
    run_id, metric, step, timestamp, value, is_nan = zip(*rows)
    values = np.array(value, dtype=np.float64)
    values[np.array(is_nan, dtype=bool)] = np.nan
    return pd.DataFrame({"run_id": sorted_categorical(run_id), "metric": sorted_categorical(metric),
                         "step": np.array(step, dtype=np.int64), "timestamp": np.array(timestamp, dtype=np.int64),
                         "value": values})


def read_rest(client, uri: str, runs: Sequence, metrics: Sequence[str] | None) -> pd.DataFrame:
    """MLflow's ``/api/2.0/mlflow/metrics/get-history-bulk-interval``: REST_CHUNK runs per request.

    The endpoint samples a series longer than REST_MAX_RESULTS points; such series are read again
    in full through ``get_metric_history``.
    """
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    creds = get_default_host_creds(uri)
    endpoint = "/api/2.0/mlflow/metrics/get-history-bulk-interval"
    keys = sorted({k for _, k in series(runs, metrics)})
    ids = [r.info.run_id for r in runs]

    def fetch(job: tuple[list[str], str]) -> list[dict]:
        chunk, key = job
        resp = http_request(creds, endpoint, "GET",
                            params={"run_ids": chunk, "metric_key": key, "max_results": REST_MAX_RESULTS})
        return verify_rest_response(resp, endpoint).json().get("metrics", [])

    jobs = [(chunk, key) for key in keys for chunk in chunks(ids, REST_CHUNK)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        found = [m for batch in pool.map(fetch, jobs) for m in batch]
    df = pd.DataFrame.from_records(found, columns=["run_id", "key", "step", "timestamp", "value"])
    df = df.rename(columns={"key": "metric"}).fillna({"step": 0, "timestamp": 0, "value": 0.0})  # proto defaults
    counts = df.groupby(["run_id", "metric"]).size()
    sampled = [pair for pair, n in counts.items() if n >= REST_MAX_RESULTS]
    if sampled:
        df = df[~df.set_index(["run_id", "metric"]).index.isin(sampled)]
        df = pd.concat([df, read_client(client, sampled, workers=4)], ignore_index=True)
    return df[HISTORY_COLUMNS]


def read_client(client, pairs: Iterable[tuple[str, str]], workers: int = 8) -> pd.DataFrame:
    """One ``get_metric_history`` per (run_id, metric) series, ``workers`` at a time (1: serially)."""
    def fetch(pair: tuple[str, str]) -> list[tuple]:
        run_id, key = pair
        return [(run_id, key, m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key)]

    pairs = list(pairs)
    if workers <= 1:
        batches = [fetch(p) for p in pairs]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            batches = list(pool.map(fetch, pairs))
    return pd.DataFrame.from_records([row for b in batches for row in b], columns=HISTORY_COLUMNS)


def chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]

