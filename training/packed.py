"""Packed training: N runs of one shape trained as ONE fused model, each member exactly as if alone.

Runs that share arch, dataset, learning-rate grid, epochs, batch size, momentum, augmentation, subset
size and label-noise level differ only in seed, weight-decay taper and sparsity taper. ``train_packed``
trains them together as one fused model (``training.fused``: grouped convolutions, per-member BatchNorm
channels, a block-diagonal classifier); the loss is the sum of the members' mean losses, so each member's
gradient is its own, and one SGD (momentum) steps the fused parameters with per-member weight decay and masks.

Why not ``torch.func`` (``stack_module_state`` + ``functional_call`` + ``vmap``): measured with
``benchmarks/sweep_throughput.py --operators`` on the 2-core CPU, a vmapped forward+backward of
5-10 ResNet-14s ran at 0.37-0.64x of training them one after another (several ops fall back to a
slow per-member loop), the grouped-convolution model at 0.83-1.05x.

Each member keeps what a solo ``training.train`` run has: init built by ``build_model`` from its own
seed (then stacked), its own data order, crops, subset and noisy labels, its own weight-decay and
sparsity schedule and masks, momentum buffers, BatchNorm statistics and metrics. Every epoch each
member gets its own checkpoint in exactly the solo format (solo key names, ``SparseSGD`` state), so a
member can resume solo or in another pack. A member whose train or test loss is non-finite is reported
diverged (its callbacks' optional ``on_diverged(epoch, message)``, and ``PackResult.diverged``) and
dropped; the others train on.

Timing metrics (``epoch_seconds``, ``images_per_second``) are the pack's: every member reports the
pack's wall time and its own images, so the members' ``images_per_second`` add up to the pack's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from training.bookkeeping import epoch_writer
from training.callbacks import Callback
from training.checkpoint import load_checkpoint
from training.config import SHAPE_FIELDS, ConfigError, RunConfig
from training.core import EpochWriter, divergence, epoch_seed
from training.data import Batches
from training.diagnostics import packed_diagnostics
from training.fused import (
    full_precision,
    member_losses,
)
from training.graphed import cudnn_benchmark
from training.loop import TrainResult, autocast, precision_mode, sync
from training.packstate import FusedPack, PackMember, shrink


def check_shape(configs: Sequence[RunConfig]) -> None:
    """ConfigError (a ValueError) naming the first field in which a config differs from the first one."""
    if not configs:
        raise ConfigError("configs", "a pack needs at least one run")
    for i, c in enumerate(configs[1:], start=1):
        for name in SHAPE_FIELDS:
            if getattr(c, name) != getattr(configs[0], name):
                raise ConfigError(name, f"member {i} has {getattr(c, name)!r}, member 0 has "
                                        f"{getattr(configs[0], name)!r}; a pack's runs must share it")


def pack_arguments(configs: Sequence[RunConfig], callbacks: Sequence[Sequence[Callback]] | None,
                   checkpoint_paths: Sequence[str | Path | None] | None) -> tuple[list, list[list], list]:
    """A pack's configs (one shape: ``check_shape``), every member's callbacks and checkpoint path (none
    given: none), as lists of one entry per member; ValueError when a list has another length."""
    configs = list(configs)
    check_shape(configs)
    n = len(configs)
    callbacks = [list(c) for c in callbacks] if callbacks is not None else [[] for _ in configs]
    paths = list(checkpoint_paths) if checkpoint_paths is not None else [None] * n
    for name, value in (("callbacks", callbacks), ("checkpoint_paths", paths)):
        if len(value) != n:
            raise ValueError(f"{name}: {len(value)} entries for {n} configs")
    return configs, callbacks, paths


def checkpoint_epoch(path: str | Path | None) -> int:
    """The epoch a checkpoint holds (0 if there is none)."""
    state = load_checkpoint(path) if path else None
    return int(state["epoch"]) if state is not None else 0


def group_by_epoch(checkpoint_paths: Sequence[str | Path | None]) -> dict[int, list[int]]:
    """``{epoch: [member indices]}``: the runs whose checkpoints are at one epoch (0 = fresh) can share a pack."""
    groups: dict[int, list[int]] = {}
    for i, path in enumerate(checkpoint_paths):
        groups.setdefault(checkpoint_epoch(path), []).append(i)
    return dict(sorted(groups.items()))


# --- the packed trainer -------------------------------------------------------------------------------

@dataclass
class PackResult:
    """One ``TrainResult`` per member (in the order given; ``model`` is the member's solo model), and
    ``diverged`` = {member index: message} for the members dropped on a non-finite loss."""

    members: list[TrainResult]
    diverged: dict[int, str] = field(default_factory=dict)


@torch.no_grad()
def _evaluate(pack: FusedPack, test: Batches, batch_size: int, precision: str) -> tuple[list[float], list[float]]:
    """Every member's mean cross-entropy and error over the (shared) test split."""
    pack.model.eval()
    n = pack.n
    loss_sum = torch.zeros(n, device=pack.device)
    wrong = torch.zeros(n, device=pack.device, dtype=torch.long)
    for x, y in test.ordered(batch_size):
        with autocast(precision, pack.device):
            logits = pack.run(x.to(pack.dtype).repeat(1, n, 1, 1).contiguous(memory_format=torch.channels_last))
        logits = full_precision(logits)
        flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.repeat(n), reduction="none")
        loss_sum += flat.view(n, -1).sum(1)
        wrong += (logits.argmax(2) != y).sum(1)
    total = len(test.split.labels)
    return (loss_sum / total).tolist(), (wrong.double() / total).tolist()


def train_packed(configs: Sequence[RunConfig], callbacks: Sequence[Sequence[Callback]] | None = None, *,
                 device: str | torch.device = "cpu", checkpoint_paths: Sequence[str | Path | None] | None = None,
                 threads: int | None = None, dtype: torch.dtype = torch.float32,
                 background_writes: bool | None = None) -> PackResult:
    """Train ``configs`` (one shape, see ``SHAPE_FIELDS``) as one fused model.

    ``callbacks[i]`` are member i's callbacks; they hear exactly what a solo run's callbacks hear
    (``on_start``, ``on_epoch_end``), plus ``on_diverged(epoch, message)`` (a no-op unless overridden).
    ``checkpoint_paths[i]`` is member i's solo-format checkpoint (resumed from if present, written every
    epoch before the callbacks hear of it). All members must resume from the same epoch (``group_by_epoch``
    groups runs by it). Exceptions from callbacks propagate, as in a solo run (every member's checkpoint
    of that epoch is already written).
    ``dtype`` is the fused model's (float64 only to check exactness against a float64 reference: with
    BatchNorm, float32 rounding alone makes two correct implementations drift apart within a few
    steps); checkpoints and result models are float32 like a solo run's.
    """
    configs, callbacks, paths = pack_arguments(configs, callbacks, checkpoint_paths)
    device = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    precision = configs[0].precision
    with precision_mode(precision, device), cudnn_benchmark(configs[0].graph and device.type == "cuda"):
        return _train_packed(configs, callbacks, paths, device, precision, dtype, background_writes)


def _train_packed(configs: list[RunConfig], callbacks: list[list[Callback]], paths: list, device: torch.device,
                  precision: str, dtype: torch.dtype, background_writes: bool | None = None) -> PackResult:
    members: list[PackMember] = []
    for i, (c, cbs, p) in enumerate(zip(configs, callbacks, paths)):
        shared = members[0].train_batches.split.images if members and not c.train_subset else None
        members.append(PackMember(i, c, cbs, device, p, shared))
    for m in members:
        m.restore()
    starts = {m.record.start for m in members}
    if len(starts) > 1:
        detail = ", ".join(f"member {m.index} at {m.record.start}" for m in members)
        raise ValueError(f"checkpoint_paths: members resume from different epochs ({detail}); "
                         "pack runs of one epoch (training.packed.group_by_epoch)")
    start = starts.pop()
    plan = members[0].record.plan
    test_batches = Batches(members[0].test_split, configs[0].dataset, configs[0].eval_batch_size, augment=False)
    # N x the channels: on the CPU evaluate in training-sized batches (faster there than larger ones, and bounded
    # memory); on a GPU at the run's eval_batch_size (a pack of 48 at batch 50 would be 200 launch-bound passes)
    eval_batch_size = configs[0].eval_batch_size if device.type == "cuda" else configs[0].batch_size
    for m in members:
        m.record.on_start()

    diverged: dict[int, str] = {}
    pack = FusedPack(members, device, dtype)
    writer: EpochWriter = epoch_writer(device, background_writes)
    try:
        for step in plan[start:]:
            epoch = step.epoch
            t0 = time.perf_counter()
            steps = [m.record.plan[epoch - 1] for m in pack.members]
            pack.set_hyper(step.lr, [s.weight_decay for s in steps])
            pack.set_epoch(epoch)
            for i, m in enumerate(pack.members):
                if m.record.new_masks(epoch, pack.member_params(i)):
                    pack.set_masks(i)
            before = [p.detach().clone() for p in pack.params]

            pack.model.train()
            k = pack.n
            generators = [torch.Generator().manual_seed(epoch_seed(m.config.seed, epoch)) for m in pack.slots]
            if pack.static is None:
                loss_sum = torch.zeros(k, device=device)
                wrong = torch.zeros(k, device=device, dtype=torch.long)
                for x, y in pack.batches.epoch(generators):
                    x = x.to(dtype)
                    with autocast(precision, device):
                        logits = pack.run(x)
                    logits = full_precision(logits)
                    per_member = member_losses(logits, y, pack.smoothing)
                    pack.opt.zero_grad(set_to_none=False)
                    per_member.sum().backward()
                    pack.step()
                    loss_sum += per_member.detach() * y.shape[1]
                    wrong += (logits.detach().argmax(2) != y).sum(1)
            else:
                loss_sum, wrong = pack.static.sums
                for t in pack.static.sums:
                    t.zero_()
                pack.static.batches.load(pack.batches.draw(generators))
                pack.static.epoch()
            sync(device)
            train_seconds = time.perf_counter() - t0
            writer.check()  # the previous epoch's writes (done while this one trained); raises what they raised

            changed = torch.zeros(k, dtype=torch.long, device=device)
            for p, b in zip(pack.params, before):
                changed += (p.detach() != b).reshape(k, -1).sum(1)
            diagnostics = packed_diagnostics(pack.names, pack.params, k, lr=step.lr,
                                             weight_decays=[s.weight_decay for s in steps],
                                             momentum=configs[0].momentum,
                                             steps_per_epoch=len(pack.members[0].train_batches),
                                             decoupled=[m.config.weight_decay_mode == "decoupled"
                                                        for m in pack.members])
            test_loss, test_error = _evaluate(pack, test_batches, eval_batch_size, precision)
            train_losses, train_wrong, changed = loss_sum.tolist(), wrong.tolist(), changed.tolist()
            epoch_seconds = time.perf_counter() - t0

            host = pack.host_state() if any(m.record.checkpoint_path for m in pack.members) else None
            keep: list[int] = []
            total_weights = sum(s.numel() for s in pack.shapes)
            for i, m in enumerate(pack.members):
                record = m.record
                n_train = len(m.train_batches.split.labels)
                train_loss = train_losses[i] / n_train
                bad = divergence(epoch, [("train_loss", train_loss), (record.eval_loss_name, test_loss[i])])
                if bad is not None:
                    diverged[m.index] = str(bad)
                    continue
                keep.append(i)
                m.metrics = record.metrics(epoch, train_loss=train_loss, train_error=train_wrong[i] / n_train,
                                           eval_loss=test_loss[i], eval_error=test_error[i],
                                           updated_fraction=changed[i] / total_weights, epoch_seconds=epoch_seconds,
                                           images_per_second=n_train / train_seconds,
                                           diagnostics=diagnostics[i])
                state = None
                if record.checkpoint_path:
                    member_state = pack.member_state(i, host, steps[i].lr, steps[i].weight_decay)
                    state = lambda member_state=member_state: member_state  # noqa: E731 - kept as it is now
                record.save(writer, epoch, m.metrics, state)
            if len(keep) < len(pack.members):
                for i, m in enumerate(pack.members):
                    if i not in keep:
                        m.record.diverged(writer, epoch, diverged[m.index])
                if not keep:
                    pack = None
                    break
                pack = shrink(pack, keep, epoch)
            for m in pack.members:
                m.record.tell(writer, epoch, m.metrics)
        writer.check()
    finally:
        writer.close()

    if pack is not None:
        last, host = plan[-1], pack.host_state()
        for i, m in enumerate(pack.members):
            pack.sync_solo(i, last.lr, m.record.plan[-1].weight_decay, host)
    results = []
    for m in members:
        alive = pack is not None and m in pack.members
        results.append(TrainResult(config=m.config, history=m.record.history, resumed_from=start,
                                   model=m.solo if alive else None))
    return PackResult(members=results, diverged=diverged)


