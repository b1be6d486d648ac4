"""Synthetic MLflow runs laid out exactly as the trainer logs them (tags, params, per-epoch
metrics), for the report's tests and benchmark: no training needed.

Curves are plausible, not real: the loss falls within each learning-rate step towards a level set
by the learning rate, restarts lift it again, weight decay trades training fit for a smaller
generalization gap, and every seed adds its own offset and noise.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np

from orchestrator.store.runs import MAX_METRICS_PER_BATCH as BATCH
from training.callbacks import DIAGNOSTICS, STAGES
from training.callbacks import METRICS as ALL_METRICS
from training.config import RunConfig
from training.schedules import plan_for


def curves(cfg: RunConfig, epochs: int | None = None) -> dict[str, np.ndarray]:
    """Every metric of ALL_METRICS for epochs 1..epochs (default: the whole plan) of ``cfg``."""
    plan = plan_for(cfg)[:epochs]
    digest = hashlib.sha256(f"{cfg.dataset}/{cfg.arch}/{cfg.scheme}/{cfg.seed}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    hard = {"digits": 0.3, "cifar10": 1.0, "cifar100": 2.2}[cfg.dataset] * (0.9 if cfg.arch == "resnet32" else 1.0)
    offset = rng.normal(0, 0.03)
    train = np.empty(len(plan))
    test = np.empty(len(plan))
    fit, overfit = 1.0, 0.0
    for i, e in enumerate(plan):
        lr_level = 0.25 + 0.75 * math.log10(e.lr / 1e-5) / 4  # the loss floor falls with the learning rate
        target = hard * lr_level * (1 + 25 * e.weight_decay) * (1 + 0.5 * e.grad_sparsity)
        fit += (target - fit) * 0.2
        if e.lr < 5e-3:  # small steps: the model starts memorizing, weight decay holds it back
            overfit += 0.004 * hard / (1 + 500 * e.weight_decay)
        else:
            overfit *= 0.8
        train[i] = max(fit * (1 + offset) + rng.normal(0, 0.015 * hard), 0.01)
        test[i] = fit * (1 + offset) + 0.12 * hard + overfit + rng.normal(0, 0.02 * hard)
    test = np.maximum(test, 0.02)
    return {**diagnostics(cfg, plan), **{
        "train_loss": train,
        "train_error": np.clip(0.28 * train / (1 + 0.1 * train), 0, 1),
        "test_loss": test,
        "test_error": np.clip(0.25 * test / (1 + 0.12 * test) + rng.normal(0, 0.004, len(plan)), 0, 1),
        "lr": np.array([e.lr for e in plan]),
        "weight_decay": np.array([e.weight_decay for e in plan]),
        "grad_sparsity": np.array([e.grad_sparsity for e in plan]),
        "updated_fraction": np.array([1 - e.grad_sparsity for e in plan]),
        "epoch_seconds": 30 + rng.normal(0, 1, len(plan)),
        "images_per_second": 1500 + rng.normal(0, 20, len(plan)),
    }}


def diagnostics(cfg: RunConfig, plan) -> dict[str, np.ndarray]:
    """``training.callbacks.DIAGNOSTICS`` of ``plan``: the decay timescale as the trainer computes it, and a
    squared weight norm per stage that relaxes towards the equilibrium of gradient growth and decay
    (~ sqrt(lr / wd)), slowly when the timescale is long."""
    from training.diagnostics import decay_epochs

    steps = math.ceil((cfg.train_subset or 1297) / cfg.batch_size)
    convs = [1] + [2 * ((int(cfg.arch.removeprefix("resnet")) - 2) // 6)] * (len(STAGES) - 1)  # per stage
    out = {name: np.empty(len(plan)) for name in DIAGNOSTICS}
    sq = [4.0 * (j + 1) for j in range(len(STAGES))]
    for i, e in enumerate(plan):
        tau = decay_epochs(e.lr, e.weight_decay, cfg.momentum, steps)
        for j, s in enumerate(STAGES):
            level = 0.02 * (j + 1) * math.sqrt(e.lr / max(e.weight_decay, 1e-6))
            sq[j] += (level - sq[j]) * min(1.0, 1.0 / tau)
            out[f"weight_norm_{s}"][i] = math.sqrt(sq[j])
            out[f"effective_lr_{s}"][i] = e.lr * convs[j] / sq[j]  # each convolution holds 1/convs of the norm
        out["weight_norm_fc"][i] = 1.5 + 0.01 * i
        out["decay_epochs"][i] = tau
    return out


def log_run(client, experiment_id: str, cfg: RunConfig, sweep: str, epochs: int | None = None,
            metrics: Sequence[str] = ALL_METRICS, finished: bool | None = None,
            start_ms: int = 1_700_000_000_000) -> str:
    """Create one run as the trainer would (tags, a param per config field, metrics with step = epoch)
    and return its id. ``epochs`` cuts the run short (it stays RUNNING unless ``finished``)."""
    from mlflow.entities import Metric, Param

    from orchestrator.identity import plan
    from orchestrator.store.runs import config_params
    from orchestrator.store.tags import TAG_GROUP_KEY, TAG_RUN_KEY, TAG_SWEEP

    planned = plan(cfg)
    tags = {TAG_RUN_KEY: planned.key, TAG_GROUP_KEY: planned.group, TAG_SWEEP: sweep}
    run = client.create_run(experiment_id, run_name=f"{cfg.dataset}-{cfg.arch}-{cfg.scheme}-s{cfg.seed}", tags=tags)
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in config_params(cfg).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i:i + 100])
    values = curves(cfg, epochs)
    rows = [Metric(k, float(values[k][e]), start_ms + 1000 * (e + 1), e + 1)
            for e in range(len(values["lr"])) for k in metrics]
    for i in range(0, len(rows), BATCH):
        client.log_batch(run_id, metrics=rows[i:i + BATCH])
    complete = len(values["lr"]) == planned.total_epochs
    if finished if finished is not None else complete:
        client.set_terminated(run_id, "FINISHED")
    return run_id
