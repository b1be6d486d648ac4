"""Benchmark: per-run dispatch overhead of ``adareg sweep run`` (not a test).

From the scheduler's spawn of a worker process to its first training step: Python start-up and
imports, spec, MLflow connection and run creation, data loading, model build, checkpoint restore.
The worker writes ``progress.json`` (epoch 0) in its ``on_start`` callback, right before the first
step, so the file's mtime marks the moment. Runs go one at a time on the CPU (digits, ResNet-8,
100 images, 1 epoch), through the real scheduler and local backend.

    .venv/bin/python benchmarks/dispatch_overhead.py [--runs N] [--threads T]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.dispatch.backends import LocalBackend  # noqa: E402
from orchestrator.dispatch.scheduler import Scheduler  # noqa: E402
from orchestrator.dispatch.slots import Slot  # noqa: E402
from orchestrator.dispatch.task import QuietView, Task  # noqa: E402
from orchestrator.run.ending import State  # noqa: E402
from orchestrator.run.spec import WorkerSpec  # noqa: E402
from orchestrator.store.client import connect  # noqa: E402
from orchestrator.store.runs import ensure_experiment  # noqa: E402
from orchestrator.sweep.expand import expand  # noqa: E402
from orchestrator.sweep.file import load_sweep  # noqa: E402


class Stopwatch(QuietView):
    """Spawn time of every task, and when its progress.json first appeared (from its mtime)."""

    def __init__(self):
        self.spawned: dict[str, float] = {}
        self.first_step: dict[str, float] = {}

    def started(self, task, slot):
        self.spawned[task.key] = time.time()

    def update(self, active):
        for task, _ in active:
            path = task.folder.progress_path
            if task.key not in self.first_step and path.exists():
                self.first_step[task.key] = path.stat().st_mtime_ns / 1e9

    def ended(self, task, slot):
        self.update([(task, slot)])  # a run shorter than one poll
        if task.state is not State.DONE:
            raise SystemExit(f"run {task.key} ended {task.end}: see {task.folder.log}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // 2))
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="adareg-dispatch-bench-"))
    sweep_file = folder / "bench.yaml"
    sweep_file.write_text(textwrap.dedent(f"""\
        name: dispatch-bench
        experiment: dispatch-bench
        datasets: [digits]
        archs: [resnet8]
        seeds: {list(range(args.runs))}
        schedule: {{lr: [0.1], epochs_per_step: [1]}}
        train: {{train_subset: 100}}
        schemes: {{a: {{weight_decay: 0.0001}}}}
        """))
    sweep = load_sweep(sweep_file)
    uri = f"sqlite:///{folder}/mlflow.db"
    ensure_experiment(connect(uri), sweep.experiment)
    tasks = []
    for run in expand(sweep):
        (folder / "runs" / run.key).mkdir(parents=True)
        tasks.append(Task(run.key, run.config, folder / "runs" / run.key))

    def write_spec(task, slot):
        path = task.folder.spec
        WorkerSpec(config=task.config.to_dict(), experiment=sweep.experiment, run_dir=str(task.run_dir),
                   tracking_uri=uri, sweep=sweep.name, device="cpu", threads=slot.threads).write(path)
        return path

    watch = Stopwatch()
    t0 = time.perf_counter()
    Scheduler(LocalBackend(), [Slot("cpu0", threads=args.threads)], write_spec, view=watch, poll_s=0.05).run(tasks)
    wall = time.perf_counter() - t0
    overhead = [watch.first_step[k] - watch.spawned[k] for k in watch.spawned]

    def bare(code: str) -> float:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        return time.perf_counter() - t

    python_start = bare("pass")
    worker_imports = bare("import orchestrator.run.worker, training.loop, mlflow.store.tracking.sqlalchemy_store")
    print(f"dispatch overhead, spawn -> first training step, {len(overhead)} runs one at a time "
          f"(digits, resnet8, {args.threads} threads):")
    print(f"  median {statistics.median(overhead):.2f} s, min {min(overhead):.2f} s, max {max(overhead):.2f} s "
          f"({wall:.1f} s wall for all {len(overhead)} runs)")
    print(f"  of which: bare python start {python_start:.2f} s, the worker's imports (torch, torchvision, "
          f"mlflow's sqlite store) {worker_imports:.2f} s")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
