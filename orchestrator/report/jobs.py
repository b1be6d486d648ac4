"""Drawing a report's figures: one picklable job per figure, run in forked workers, each saved as PNG and PDF
(atomically)."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from orchestrator.report import figures, mechanism
from training.schedules import EpochPlan


@dataclass(frozen=True)
class FigureJob:
    """Everything one figure needs (picklable, for a worker process)."""

    spec: figures.FigureSpec
    bands: pd.DataFrame
    plans: dict[str, Sequence[EpochPlan]]
    labels: dict[str, str]
    palette: dict
    metrics: Sequence[str]
    picks: pd.DataFrame
    curves: pd.DataFrame
    rank_by: str = "test_error"
    envelope: bool = False
    mechanism: bool = False
    """The mechanism figure of the spec (``mechanism.draw_mechanism``, file ``<stem>-mechanism``) instead of its
    curves."""

    def __call__(self, out_dir: Path) -> list[Path]:
        if self.mechanism:
            fig = mechanism.draw_mechanism(self.spec, self.bands, self.plans, self.labels, self.palette)
            return save(fig, out_dir, mechanism.mechanism_stem(self.spec))
        fig = figures.draw(self.spec, self.bands, self.plans, self.labels, self.palette, self.metrics, self.picks,
                   self.curves, self.rank_by, self.envelope)
        return save(fig, out_dir, self.spec.stem)


def render_all(jobs: Sequence[FigureJob], out_dir: Path, workers: int | None = None) -> list[list[Path]]:
    """Run the jobs, in ``workers`` forked processes where the platform forks (the PNG and PDF
    rendering is CPU-bound; a fork starts in milliseconds, a spawn would re-import everything)."""
    return start_rendering(jobs, out_dir, workers)()


def start_rendering(jobs: Sequence[FigureJob], out_dir: Path,
                    workers: int | None = None) -> Callable[[], list[list[Path]]]:
    """Start the jobs in ``workers`` forked processes (default: one per CPU, at most 4) and return at once;
    calling the result waits for them and gives each job's files. Without fork or with one worker, the jobs
    run when the result is called."""
    if workers is None:
        workers = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    workers = min(workers, len(jobs))
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return lambda: [job(out_dir) for job in jobs]
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    futures = [pool.submit(FigureJob.__call__, job, out_dir) for job in jobs]

    def done() -> list[list[Path]]:
        try:
            return [f.result() for f in futures]
        finally:
            pool.shutdown(cancel_futures=True)

    return done


def save(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    """PNG (DPI) and PDF beside each other, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in ("png", "pdf"):
        path = out_dir / f"{stem}.{fmt}"
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as fh:
            # zlib level 3 instead of 6: a fifth less time for the whole figure, a tenth larger PNG
            png = {"pil_kwargs": {"compress_level": 3}} if fmt == "png" else {}
            fig.savefig(fh, format=fmt, dpi=figures.DPI, **png)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        paths.append(path)
    return paths
