"""The epoch loop: SGD with tapered weight decay and sparse gradients, checkpointed every epoch.

Read it top to bottom: ``train`` builds the data, the model and the optimizer, restores the last
checkpoint if there is one, then for every epoch of the plan sets the schedule's values, trains,
evaluates, writes the checkpoint atomically and only then tells the callbacks.

Determinism: model init, data order, crops and masks come from generators seeded by the run's seed
(and the epoch), never from global state, so there is no RNG state to carry across a restart: the
checkpoint holds the model, the optimizer (momentum), the masks and the metric history, and a
resumed run on the CPU repeats an uninterrupted one bit for bit.

Precision (``config.precision``): ``fp32`` everywhere by default; ``tf32`` lets CUDA matmuls and
convolutions use TensorFloat-32; ``bf16`` runs forward passes under bfloat16 autocast with float32
weights, gradients, momentum and loss.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from training.callbacks import Callback, eval_names
from training.checkpoint import CHECKPOINT_VERSION, CheckpointError, load_checkpoint, save_checkpoint
from training.config import RunConfig
from training.data import Batches, load_splits
from training.models import build_model
from training.regularizers import SparseSGD, draw_masks, mask_seed
from training.schedules import plan_for

__all__ = ["train", "TrainResult", "Diverged", "CheckpointError", "CheckpointMismatch", "CHECKPOINT_VERSION",
           "evaluate", "epoch_seed"]


class Diverged(RuntimeError):
    """A loss or error became non-finite: ``metric`` (e.g. ``test_loss``) is ``value`` at ``epoch``."""

    def __init__(self, epoch: int, value: float, metric: str = "train_loss"):
        super().__init__(f"diverged at epoch {epoch}: {metric.replace('_', ' ')} is {value}")
        self.epoch = epoch
        self.metric = metric
        self.value = value


CheckpointMismatch = CheckpointError
"""Former name of ``CheckpointError`` (kept for callers that still import it)."""


@dataclass
class TrainResult:
    config: RunConfig
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0
    model: torch.nn.Module | None = None


def epoch_seed(run_seed: int, epoch: int) -> int:
    """Seed of epoch ``epoch``'s data order and augmentation."""
    return (run_seed * 1_000_033 + epoch * 104_729 + 3) % (2**63 - 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def precision_mode(precision: str, device: torch.device) -> Iterator[None]:
    """On CUDA, the float32 matmul / convolution precision of ``precision`` for the block (restored after):
    ``fp32`` is IEEE float32 (PyTorch's default would let cuDNN convolutions use TF32), ``tf32`` and
    ``bf16`` allow TF32. Nothing changes on other devices. bfloat16 autocast is ``autocast``'s job."""
    if device.type != "cuda":
        yield
        return
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision = conv.fp32_precision = "ieee" if precision == "fp32" else "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast for ``bf16`` (weights, gradients and optimizer state stay float32); else nothing."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Batches, batch_size: int,
             precision: str = "fp32") -> tuple[float, float]:
    """Mean cross-entropy and error (fraction) over a whole split."""
    model.eval()
    device = batches.split.labels.device
    loss_sum = torch.zeros((), device=device)
    wrong = torch.zeros((), device=device, dtype=torch.long)
    for x, y in batches.ordered(batch_size):
        with autocast(precision, device):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        wrong += (logits.argmax(1) != y).sum()
    n = len(batches.split.labels)
    return loss_sum.item() / n, wrong.item() / n


def train(config: RunConfig, callbacks: Sequence[Callback] = (), *, device: str | torch.device = "cpu",
          checkpoint_path: str | Path | None = None, threads: int | None = None) -> TrainResult:
    """Train one run. With ``checkpoint_path`` it resumes from and writes to that file every epoch.

    A checkpoint that cannot be resumed from (empty, truncated, another version, another
    configuration) raises ``CheckpointError`` naming the file; nothing is trained then.
    """
    device = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    with precision_mode(config.precision, device):
        return _train(config, callbacks, device, checkpoint_path)


def _train(config: RunConfig, callbacks: Sequence[Callback], device: torch.device,
           checkpoint_path: str | Path | None) -> TrainResult:
    plan = plan_for(config)

    # With a validation split the evaluation split is the held-out part and the test split is never loaded.
    train_split, eval_split = load_splits(config, device)
    train_batches = Batches(train_split, config.dataset, config.batch_size, augment=config.augment)
    eval_batches = Batches(eval_split, config.dataset, config.eval_batch_size, augment=False)
    eval_loss_name, eval_error_name = eval_names(config)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(config.arch, config.num_classes)
    model = model.to(device=device, memory_format=torch.channels_last)
    run = torch.compile(model) if config.compile else model  # the same module and state dict, compiled calls
    params = [p for p in model.parameters()]
    opt = SparseSGD(params, momentum=config.momentum)
    total_weights = sum(p.numel() for p in params)

    history: list[dict[str, float]] = []
    state = load_checkpoint(checkpoint_path, identity=config.identity_dict()) if checkpoint_path else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history = list(state["history"])
        masks = state["masks"]
        opt.set_masks([m.to(device) for m in masks] if masks else None)
    start = len(history)

    for cb in callbacks:
        cb.on_start(config, plan, history)

    for step in plan[start:]:
        epoch = step.epoch
        t0 = time.perf_counter()
        opt.set_hyper(step.lr, step.weight_decay)
        previous = plan[epoch - 2].grad_sparsity if epoch > 1 else 0.0
        if step.grad_sparsity != previous:
            opt.set_masks(draw_masks(params, step.grad_sparsity, mask_seed(config.seed, epoch)))
        before = [p.detach().clone() for p in params]

        model.train()
        loss_sum = torch.zeros((), device=device)
        wrong = torch.zeros((), device=device, dtype=torch.long)
        generator = torch.Generator().manual_seed(epoch_seed(config.seed, epoch))
        for x, y in train_batches.epoch(generator):
            with autocast(config.precision, device):
                logits = run(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(y)
            wrong += (logits.detach().argmax(1) != y).sum()
        sync(device)
        train_seconds = time.perf_counter() - t0

        n_train = len(train_split.labels)
        train_loss = loss_sum.item() / n_train
        if not math.isfinite(train_loss):
            raise Diverged(epoch, train_loss, "train_loss")
        changed = int(sum((p.detach() != b).sum() for p, b in zip(params, before)))
        eval_loss, eval_error = evaluate(run, eval_batches, config.eval_batch_size, config.precision)
        for name, value in ((eval_loss_name, eval_loss), (eval_error_name, eval_error)):
            if not math.isfinite(value):
                raise Diverged(epoch, value, name)
        metrics = {  # in the order of training.callbacks.metric_names(config)
            "train_loss": train_loss,
            "train_error": wrong.item() / n_train,
            eval_loss_name: eval_loss,
            eval_error_name: eval_error,
            "lr": step.lr,
            "weight_decay": step.weight_decay,
            "grad_sparsity": step.grad_sparsity,
            "updated_fraction": changed / total_weights,
            "epoch_seconds": time.perf_counter() - t0,
            "images_per_second": n_train / train_seconds,
        }
        history.append({"epoch": float(epoch), **metrics})
        if checkpoint_path:
            save_checkpoint(checkpoint_path, {
                "version": CHECKPOINT_VERSION,
                "identity": config.identity_dict(),
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "masks": [m.cpu() for m in opt.masks] if opt.masks is not None else [],
                "history": history,
            })
        for cb in callbacks:
            cb.on_epoch_end(epoch, metrics)

    return TrainResult(config=config, history=history, resumed_from=start, model=model)
