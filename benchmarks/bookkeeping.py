"""Bookkeeping off the critical path: the wall time of the same trainings with the ends of epochs
(atomic checkpoint, then an MLflow ``log_metrics`` into a local sqlite store) written in line, as the
CPU does, and on the background writer (``training.bookkeeping``, on by default for CUDA only), in the
same process, alternating, with the ratio background / in line.

    .venv/bin/python benchmarks/bookkeeping.py                    # CPU, resnet8 digits, fast epochs
    .venv/bin/python benchmarks/bookkeeping.py --device cuda --arch resnet14 --images 5000 --epochs 6

Epochs are made short (few images) so that the bookkeeping is a visible share, as it is on a GPU;
the background writer can save at most that share. Prints one JSON line per measurement and a summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from training import Callback, RunConfig, train
from training.packed import train_packed


class MLflowLog(Callback):
    """Logs each epoch's metrics into a local MLflow store, as a run's logger does (one round trip an epoch)."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def on_epoch_end(self, epoch, metrics):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="resnet8")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--images", type=int, default=100, help="training images per epoch (short epochs)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--pack", type=int, default=4, help="members of the pack measured after the solo run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from mlflow.tracking import MlflowClient

    config = dict(arch=args.arch, dataset=args.dataset, train_subset=args.images, lr=[0.05], grad_sparsity=0.0,
                  epochs_per_step=(args.epochs,), weight_decay=1e-4)
    results: dict[tuple[str, bool], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
        experiment = client.create_experiment("bookkeeping")
        for repeat in range(args.repeats):
            for background in ((False, True) if repeat % 2 == 0 else (True, False)):
                for kind in ("solo", f"pack{args.pack}"):
                    n = 1 if kind == "solo" else args.pack
                    configs = [RunConfig(seed=s, **config) for s in range(n)]
                    callbacks = [[MLflowLog(client, client.create_run(experiment).info.run_id)] for _ in configs]
                    paths = [Path(tmp) / f"{kind}-{repeat}-{background}-{i}.pt" for i in range(n)]
                    t0 = time.perf_counter()
                    if kind == "solo":
                        train(configs[0], callbacks[0], device=args.device, checkpoint_path=paths[0],
                              background_writes=background)
                    else:
                        train_packed(configs, callbacks, device=args.device, checkpoint_paths=paths,
                                     background_writes=background)
                    seconds = time.perf_counter() - t0
                    results.setdefault((kind, background), []).append(seconds)
                    print(json.dumps({"kind": kind, "background": background, "repeat": repeat,
                                      "seconds": round(seconds, 3), "epochs": args.epochs}), flush=True)
    for kind in ("solo", f"pack{args.pack}"):
        inline, bg = (statistics.median(results[kind, b]) for b in (False, True))
        print(json.dumps({"summary": kind, "device": args.device, "arch": args.arch, "images": args.images,
                          "epochs": args.epochs, "inline_median_s": round(inline, 3),
                          "background_median_s": round(bg, 3), "background_over_inline": round(bg / inline, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
