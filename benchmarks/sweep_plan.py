"""Benchmark of ``adareg sweep plan`` on the 200-run Table 1 grid against a store holding all 200
runs FINISHED (not a test). The goal: under 3 s for the whole command.

Builds a sqlite store with the 200 runs (tags, a param per config field, ``test_error`` for every
epoch) as the trainer logs them, then times the plan in-process (reconcile only, imports done) and
as a fresh ``adareg sweep plan ... --format json`` process, and checks that all 200 read as done.

    .venv/bin/python benchmarks/sweep_plan.py [--store DIR] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.report.synthetic import log_run  # noqa: E402
from orchestrator.store.client import connect  # noqa: E402
from orchestrator.store.runs import ensure_experiment  # noqa: E402
from orchestrator.sweep.expand import expand  # noqa: E402
from orchestrator.sweep.file import load_sweep  # noqa: E402
from orchestrator.sweep.reconcile import inspect_sweep  # noqa: E402

SWEEP = ROOT / "sweeps" / "table1.yaml"


def build_store(uri: str) -> None:
    sweep = load_sweep(SWEEP)
    client = connect(uri)
    experiment_id = ensure_experiment(client, sweep.experiment)
    t0 = time.perf_counter()
    for run in expand(sweep):
        log_run(client, experiment_id, run.config, sweep.name, metrics=("test_error",), finished=True)
    print(f"built a store of 200 FINISHED runs in {time.perf_counter() - t0:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=None, help="folder for mlflow.db (kept; reused if present)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    folder = args.store or Path(tempfile.mkdtemp(prefix="adareg-plan-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "mlflow.db"
    uri = f"sqlite:///{db.resolve()}"
    if not db.exists():
        build_store(uri)

    sweep = load_sweep(SWEEP)
    planned = expand(sweep)
    inproc = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        states = inspect_sweep(planned, sweep.experiment, uri, folder / "runs")
        inproc.append(time.perf_counter() - t0)
    assert [s.state for s in states] == ["done"] * 200, "the store does not hold 200 finished runs"

    cli = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        out = subprocess.run([str(Path(sys.executable).parent / "adareg"), "sweep", "plan", str(SWEEP), "--format",
                              "json", "--tracking-uri", uri, "--runs-dir", str(folder / "runs")],
                             capture_output=True, text=True, check=True, cwd=folder)
        cli.append(time.perf_counter() - t0)
        rows = json.loads(out.stdout)
        assert len(rows) == 200 and {r["state"] for r in rows} == {"done"}
        assert len({r["run_key"] for r in rows}) == 200

    probe = ("import sys; from orchestrator.cli import main; sys.argv = ['adareg'] + sys.argv[1:]\n"
             "try:\n    main()\nexcept SystemExit:\n    pass")
    imports = subprocess.run([sys.executable, "-X", "importtime", "-c", probe, "sweep", "plan", str(SWEEP),
                              "--format", "json", "--tracking-uri", uri, "--runs-dir", str(folder / "runs")],
                             capture_output=True, text=True, cwd=folder).stderr
    cumulative = {}
    for line in imports.splitlines():
        if line.startswith("import time:") and line.split("|")[1].strip().isdigit():
            cumulative.setdefault(line.split("|")[2].strip(), int(line.split("|")[1]) / 1e6)
    print(f"sweep plan, 200 runs, 200 done (store {db}):")
    print(f"  in-process reconcile (one bulk search_runs + 200 run folders): "
          f"median {statistics.median(inproc):.2f} s, min {min(inproc):.2f} s")
    print(f"  whole command (fresh process):                                "
          f"median {statistics.median(cli):.2f} s, min {min(cli):.2f} s  (goal < 3 s)")
    heavy = ("mlflow", "mlflow.store.tracking.sqlalchemy_store", "torch", "torchvision", "seaborn", "pandas")
    print("  imports inside the command: " + ", ".join(
        f"{name} {cumulative[name]:.2f} s" for name in heavy if name in cumulative))


if __name__ == "__main__":
    main()
