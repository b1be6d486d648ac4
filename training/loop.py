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
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from training.bookkeeping import epoch_writer, host_state
from training.callbacks import Callback
from training.checkpoint import CHECKPOINT_VERSION, CheckpointError
from training.config import RunConfig
from training.core import Diverged, EpochWriter, RunRecord, divergence, epoch_seed, seeded_model
from training.data import Batches, load_splits
from training.diagnostics import model_diagnostics
from training.graphed import StaticBatches, StaticStep, cudnn_benchmark, momentum_buffers, no_autocast_cache
from training.regularizers import SparseSGD, dropout_generator

__all__ = ["train", "TrainResult", "Diverged", "CheckpointError", "CheckpointMismatch", "CHECKPOINT_VERSION",
           "evaluate", "epoch_seed"]


CheckpointMismatch = CheckpointError
"""Former name of ``CheckpointError`` (kept for callers that still import it)."""


@dataclass
class TrainResult:
    config: RunConfig
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0
    model: torch.nn.Module | None = None


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device``'s current stream (this thread's: see ``training.streams``)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


@contextlib.contextmanager
def precision_mode(precision: str, device: torch.device) -> Iterator[None]:
    """On CUDA, the float32 matmul / convolution precision of ``precision`` for the block (restored after):
    ``fp32`` is IEEE float32 (PyTorch's default would let cuDNN convolutions use TF32), ``tf32`` and
    ``bf16`` allow TF32. Nothing changes on other devices. bfloat16 autocast is ``autocast``'s job. The
    ``fp32_precision`` settings appeared in torch 2.9 (the GPU machine has 2.11); older torch gets the
    ``allow_tf32`` flags they replace."""
    if device.type != "cuda":
        yield
        return
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if not hasattr(matmul, "fp32_precision"):  # before torch 2.9: the allow_tf32 flags
        saved = matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"
        try:
            yield
        finally:
            matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        return
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
          checkpoint_path: str | Path | None = None, threads: int | None = None,
          background_writes: bool | None = None) -> TrainResult:
    """Train one run. With ``checkpoint_path`` it resumes from and writes to that file every epoch.

    ``background_writes``: checkpoints and callbacks on a background thread (``training.bookkeeping``);
    None (the default) is on for CUDA, off elsewhere.

    A checkpoint that cannot be resumed from (empty, truncated, another version, another
    configuration) raises ``CheckpointError`` naming the file; nothing is trained then.
    """
    device = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    with precision_mode(config.precision, device), cudnn_benchmark(config.graph and device.type == "cuda"):
        return _train(config, callbacks, device, checkpoint_path, background_writes)


def _train(config: RunConfig, callbacks: Sequence[Callback], device: torch.device,
           checkpoint_path: str | Path | None, background_writes: bool | None = None) -> TrainResult:
    record = RunRecord(config, callbacks, checkpoint_path)
    plan = record.plan

    # With a validation split the evaluation split is the held-out part and the test split is never loaded.
    train_split, eval_split = load_splits(config, device)
    train_batches = Batches(train_split, config.dataset, config.batch_size, augment=config.augment)
    eval_batches = Batches(eval_split, config.dataset, config.eval_batch_size, augment=False)

    model = seeded_model(config).to(device=device, memory_format=torch.channels_last)
    run = torch.compile(model) if config.compile else model  # the same module and state dict, compiled calls
    params = [p for p in model.parameters()]
    opt = SparseSGD(params, momentum=config.momentum)
    total_weights = sum(p.numel() for p in params)

    if record.restore(model, opt) and record.masks is not None:
        opt.set_masks([m.to(device) for m in record.masks])
    start = record.start
    static = _static_step(config, run, opt, train_batches, device) if config.graph else None
    if static is not None and record.masks is not None:
        static.set_masks([m.to(device) for m in record.masks])
    record.on_start()

    writer: EpochWriter = epoch_writer(device, background_writes)
    try:
        for step in plan[start:]:
            epoch = step.epoch
            t0 = time.perf_counter()
            opt.set_hyper(step.lr, step.weight_decay, config.weight_decay_mode == "decoupled")
            train_batches.batch_size = step.batch_size
            model.dropout = step.dropout
            model.dropout_generator = dropout_generator(config.seed, epoch, device) if step.dropout else None
            if record.new_masks(epoch, params):
                masks = [m.to(device) for m in record.masks] if record.masks is not None else None
                opt.set_masks(masks) if static is None else static.set_masks(masks)
            before = [p.detach().clone() for p in params]

            model.train()
            generator = torch.Generator().manual_seed(epoch_seed(config.seed, epoch))
            if static is None:
                loss_sum = torch.zeros((), device=device)
                wrong = torch.zeros((), device=device, dtype=torch.long)
                for x, y in train_batches.epoch(generator):
                    with autocast(config.precision, device):
                        logits = run(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=step.label_smoothing)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    loss_sum += loss.detach() * len(y)
                    wrong += (logits.detach().argmax(1) != y).sum()
            else:
                static.set_hyper(step.lr, step.weight_decay)
                loss_sum, wrong = static.sums
                for s in static.sums:
                    s.zero_()
                static.batches.load(train_batches.draw(generator))
                static.epoch()
            sync(device)
            train_seconds = time.perf_counter() - t0
            writer.check()  # the previous epoch's writes (done while this one trained); raises what they raised

            n_train = len(train_split.labels)
            train_loss = loss_sum.item() / n_train
            if (diverged := divergence(epoch, [("train_loss", train_loss)])) is not None:
                raise diverged
            changed = int(sum((p.detach() != b).sum() for p, b in zip(params, before)))
            diagnostics = model_diagnostics(model.named_parameters(), lr=step.lr, weight_decay=step.weight_decay,
                                            momentum=config.momentum, steps_per_epoch=len(train_batches),
                                            decoupled=config.weight_decay_mode == "decoupled")
            eval_loss, eval_error = evaluate(run, eval_batches, config.eval_batch_size, config.precision)
            diverged = divergence(epoch, [(record.eval_loss_name, eval_loss), (record.eval_error_name, eval_error)])
            if diverged is not None:
                raise diverged
            metrics = record.metrics(epoch, train_loss=train_loss, train_error=wrong.item() / n_train,
                                     eval_loss=eval_loss, eval_error=eval_error,
                                     updated_fraction=changed / total_weights,
                                     epoch_seconds=time.perf_counter() - t0,
                                     images_per_second=n_train / train_seconds, diagnostics=diagnostics)
            state = host_state(model, opt) if record.checkpoint_path else None  # one bulk copy, kept as it is
            record.end_epoch(writer, epoch, metrics, (lambda state=state: state) if state is not None else None)
        writer.check()
    finally:
        writer.close()

    return TrainResult(config=config, history=record.history, resumed_from=start, model=model)


def _static_step(config: RunConfig, run: torch.nn.Module, opt: SparseSGD, batches: Batches,
                 device: torch.device) -> StaticStep:
    """``config.graph``: the solo step over static buffers (``training.graphed``), from ``opt``'s state."""
    def loss(x: torch.Tensor, y: torch.Tensor):
        with no_autocast_cache(config.precision, device):
            logits = run(x)
        loss = F.cross_entropy(logits.float(), y)
        return loss, [loss.detach() * len(y), (logits.detach().argmax(1) != y).sum()]

    sums = [torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long)]
    buffers = [b for name, b in run.named_buffers()]
    static = StaticStep(opt.params, config.momentum, momentum_buffers(opt.optimizer, opt.params), loss, sums,
                        StaticBatches(batches, len(batches.split), config.batch_size, device), device, state=buffers)
    return static
