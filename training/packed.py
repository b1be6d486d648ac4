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

from training.bookkeeping import epoch_writer, host_copy, optimizer_state
from training.callbacks import Callback
from training.checkpoint import load_checkpoint
from training.config import SHAPE_FIELDS, ConfigError, RunConfig
from training.core import EpochWriter, RunRecord, divergence, epoch_seed, seeded_model
from training.data import Batches, Split, load_splits
from training.diagnostics import packed_diagnostics
from training.fused import (
    PackedBatches,
    PackedResNet,
    full_precision,
    is_shared,
    member_losses,
    member_view,
    memory_format_of,
    stack_states,
)
from training.graphed import StaticBatches, StaticStep, cudnn_benchmark, momentum_buffers, no_autocast_cache
from training.loop import TrainResult, autocast, precision_mode, sync
from training.regularizers import SparseSGD, dropout_generator


def check_shape(configs: Sequence[RunConfig]) -> None:
    """ConfigError (a ValueError) naming the first field in which a config differs from the first one."""
    if not configs:
        raise ConfigError("configs", "a pack needs at least one run")
    for i, c in enumerate(configs[1:], start=1):
        for name in SHAPE_FIELDS:
            if getattr(c, name) != getattr(configs[0], name):
                raise ConfigError(name, f"member {i} has {getattr(c, name)!r}, member 0 has "
                                        f"{getattr(configs[0], name)!r}; a pack's runs must share it")


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


class _Member:
    """What the pack keeps per member (its ``RunRecord``: plan, history, masks, checkpoint, callbacks), and
    its solo twin (model + SparseSGD) to restore from and to hand back as the result."""

    def __init__(self, index: int, config: RunConfig, callbacks: Sequence[Callback], device: torch.device,
                 checkpoint_path: str | Path | None, shared_images: torch.Tensor | None):
        self.index, self.config = index, config
        self.record = RunRecord(config, callbacks, checkpoint_path)
        train_split, test_split = load_splits(config, "cpu")
        if shared_images is not None and not config.train_subset:  # the same images: keep one copy on the device
            train_split.images = shared_images
        train_split = Split(train_split.images.to(device), train_split.labels.to(device))
        self.train_batches = Batches(train_split, config.dataset, config.batch_size, augment=config.augment)
        # every member has the same test split: only the first keeps it (on the device)
        self.test_split = Split(test_split.images.to(device), test_split.labels.to(device)) if index == 0 else None
        self.solo = seeded_model(config)
        self.solo_opt = SparseSGD(list(self.solo.parameters()), momentum=config.momentum)
        self.momentum: list[torch.Tensor | None] | None = None  # from a checkpoint, until stacked
        self.metrics: dict[str, float] = {}

    @property
    def masks(self) -> list[torch.Tensor] | None:
        return self.record.masks

    def restore(self) -> None:
        if not self.record.restore(self.solo, self.solo_opt):
            return
        opt_state = self.solo_opt.optimizer.state
        self.momentum = [opt_state.get(p, {}).get("momentum_buffer") for p in self.solo_opt.params]


class _Pack:
    """The fused model and optimizer of the members still training.

    ``slots`` are the fused model's members: the members, or a lone member twice. A grouped convolution
    over one group runs other kernels than over several, so a lone member (a pack split by a resume,
    or shrunk by divergence) trains beside an identical copy of itself and gets, bit for bit, the
    numbers it would get in any pack."""

    def __init__(self, members: list[_Member], device: torch.device, dtype: torch.dtype):
        self.members, self.device, self.dtype = members, device, dtype
        self.slots = members if len(members) > 1 else members * 2
        n, first = len(self.slots), members[0].config
        self.n = n
        self.model = PackedResNet(n, (int(first.arch.removeprefix("resnet")) - 2) // 6, first.num_classes)
        self.solo_shapes = {k: v.shape for k, v in members[0].solo.state_dict().items()}
        self.model.load_state_dict(stack_states([m.solo.state_dict() for m in self.slots], self.model))
        self.model = self.model.to(device=device, dtype=dtype, memory_format=torch.channels_last)
        self.run = torch.compile(self.model) if first.compile else self.model  # compiled calls, same module
        self.names = [name for name, _ in self.model.named_parameters()]
        self.params = [p for _, p in self.model.named_parameters()]
        self.shapes = [self.solo_shapes[name] for name in self.names]
        solo_names = [name for name, _ in members[0].solo.named_parameters()]
        assert self.names == solo_names, "the fused model's parameters must follow the solo model's order"
        self.opt = torch.optim.SGD(self.params, lr=0.1, momentum=first.momentum, weight_decay=0.0, foreach=True)
        if all(m.momentum is not None for m in members):
            for j, p in enumerate(self.params):
                bufs = [m.momentum[j] for m in self.slots]
                if all(b is not None for b in bufs):
                    stacked = torch.stack([b.reshape(-1) for b in bufs]).view(p.shape).to(device, p.dtype)
                    self.opt.state[p]["momentum_buffer"] = stacked.contiguous(memory_format=memory_format_of(p))
        for m in members:
            m.momentum = None
        self.decay = [torch.zeros_like(p) for p in self.params]
        self.any_decay = False
        self.decoupled = [torch.zeros_like(p) for p in self.params]  # per member: decoupled decay (or 0)
        self.any_decoupled = False
        self.smoothing = [0.0] * self.n
        self.fused_masks: list[torch.Tensor] | None = None
        self.static: StaticStep | None = None
        self._build_masks()
        self.batches = PackedBatches([m.train_batches for m in self.slots])
        if first.graph:
            self.static = self._static_step(first)
            self.static.set_masks(self.fused_masks)

    def _static_step(self, config: RunConfig) -> StaticStep:
        """``config.graph``: the pack's step over static buffers (``training.graphed``)."""
        k, precision = self.n, config.precision

        def loss(x: torch.Tensor, y: torch.Tensor):
            with no_autocast_cache(precision, self.device):
                logits = full_precision(self.run(x.to(self.dtype)))
            per_member = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                         reduction="none").view(k, -1).mean(1)
            return per_member.sum(), [per_member.detach() * y.shape[1], (logits.detach().argmax(2) != y).sum(1)]

        sums = [torch.zeros(k, device=self.device), torch.zeros(k, device=self.device, dtype=torch.long)]
        n = len(self.slots[0].train_batches.split)
        return StaticStep(self.params, config.momentum, momentum_buffers(self.opt, self.params), loss, sums,
                          StaticBatches(self.batches, n, config.batch_size, self.device), self.device,
                          decay=self.decay, state=[b for _, b in self.model.named_buffers()])

    def member_params(self, i: int) -> list[torch.Tensor]:
        return [member_view(p, self.n, i, s) for p, s in zip(self.params, self.shapes)]

    def slots_of(self, i: int) -> list[int]:
        """The fused model's members that are member i (two for a lone member)."""
        return [j for j, m in enumerate(self.slots) if m is self.members[i]]

    def set_hyper(self, lr: float, weight_decays: Sequence[float]) -> None:
        """The learning rate, and each member's weight decay (one per member; coupled or decoupled as the
        member's ``weight_decay_mode``)."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        by_member = dict(zip(map(id, self.members), weight_decays))
        decoupled = [m.config.weight_decay_mode == "decoupled" for m in self.slots]
        for target, mine in ((self.decay, False), (self.decoupled, True)):
            values = [by_member[id(m)] if d == mine else 0.0 for m, d in zip(self.slots, decoupled)]
            per_member = torch.tensor(values, dtype=self.dtype, device=self.device)
            for d, p in zip(target, self.params):
                d.copy_(per_member.repeat_interleave(p.numel() // self.n).view(p.shape))
            if mine:
                self.any_decoupled = any(values)
            else:
                self.any_decay = any(values)
        if self.static is not None:
            self.static.set_hyper(lr)

    def set_masks(self, i: int) -> None:
        """Install member i's new masks (``record.masks``); its momentum of frozen entries is cleared (as
        ``SparseSGD.set_masks``)."""
        masks = self.members[i].masks
        if masks is not None:
            with torch.no_grad():
                for p, s, m in zip(self.params, self.shapes, masks):
                    buf = self.opt.state.get(p, {}).get("momentum_buffer")
                    if buf is not None:
                        for j in self.slots_of(i):
                            member_view(buf, self.n, j, s).mul_(m.to(buf.device, buf.dtype).view(s))
        self._build_masks()

    def _build_masks(self) -> None:
        if all(m.masks is None for m in self.members):
            self.fused_masks = None
            return
        self.fused_masks = []
        for j, (p, s) in enumerate(zip(self.params, self.shapes)):
            parts = [m.masks[j].to(self.device, p.dtype).reshape(-1) if m.masks is not None
                     else torch.ones(s.numel(), dtype=p.dtype, device=self.device) for m in self.slots]
            self.fused_masks.append(torch.stack(parts).view(p.shape).contiguous(memory_format=memory_format_of(p)))
        if self.static is not None:
            self.static.set_masks(self.fused_masks)

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad for p in self.params]
        if self.any_decay:
            torch._foreach_addcmul_(grads, self.params, self.decay)
        if self.fused_masks is not None:
            torch._foreach_mul_(grads, self.fused_masks)
        if self.any_decoupled:
            masks = self.fused_masks
            shrink = self.decoupled if masks is None else torch._foreach_mul(self.decoupled, masks)
            torch._foreach_addcmul_(self.params, self.params, shrink, value=-1)
        self.opt.step()

    def host_state(self) -> tuple[dict[str, torch.Tensor], list[torch.Tensor | None]]:
        """The fused model's state dict and momentum buffers on the host, in one bulk copy
        (``training.bookkeeping.host_copy``): what every member's checkpoint of this epoch is sliced from."""
        fused = self.model.state_dict()
        buffers = [self.opt.state.get(p, {}).get("momentum_buffer") for p in self.params]
        copied = host_copy([*fused.values(), *buffers])
        return dict(zip(fused.keys(), copied[:len(fused)])), copied[len(fused):]

    def member_state(self, i: int, host, lr: float, weight_decay: float):
        """Member i's solo model and ``SparseSGD`` state dicts, sliced from ``host`` (``host_state``) into
        tensors of their own (float32, as a solo run's)."""
        fused, buffers = host
        model_state = {k: (fused[k].clone() if is_shared(k) else member_view(fused[k], self.n, i, s).clone().float())
                       for k, s in self.solo_shapes.items()}
        solo_params = self.members[i].solo_opt.params
        momentum = [None if b is None else member_view(b, self.n, i, s).to(solo_p.dtype, copy=True)
                    for b, solo_p, s in zip(buffers, solo_params, self.shapes)]
        opt = self.members[i].solo_opt
        opt.set_hyper(lr, weight_decay, self.members[i].config.weight_decay_mode == "decoupled")
        return model_state, optimizer_state(opt, momentum)

    def sync_solo(self, i: int, lr: float, weight_decay: float, host=None) -> None:
        """Copy member i's weights, BN statistics and momentum into its solo twin (for the result, and the
        source of a smaller pack); ``host`` (``host_state``) is taken now when not given."""
        m = self.members[i]
        model_state, opt_state = self.member_state(i, host if host is not None else self.host_state(),
                                                   lr, weight_decay)
        m.solo.load_state_dict(model_state)
        state = m.solo_opt.optimizer.state
        state.clear()
        for j, solo_p in enumerate(m.solo_opt.params):
            buf = opt_state["optimizer"]["state"].get(j, {}).get("momentum_buffer")
            if buf is not None:
                state[solo_p]["momentum_buffer"] = buf

    def set_epoch(self, epoch: int) -> None:
        """Epoch ``epoch``'s batch size (shared), and each member's dropout rate and masks' generator."""
        steps = [m.record.plan[epoch - 1] for m in self.slots]
        for m in self.slots:
            m.train_batches.batch_size = steps[0].batch_size
        self.model.dropout = [s.dropout for s in steps]
        self.model.dropout_generators = [dropout_generator(m.config.seed, epoch, self.device) if s.dropout else None
                                         for m, s in zip(self.slots, steps)]
        self.smoothing = [s.label_smoothing for s in steps]

    def pull_momentum(self) -> None:
        """Keep every member's momentum (solo layout) so that a smaller pack can be stacked from them."""
        for i, m in enumerate(self.members):
            m.momentum = []
            for p, s in zip(self.params, self.shapes):
                buf = self.opt.state.get(p, {}).get("momentum_buffer")
                m.momentum.append(None if buf is None else member_view(buf, self.n, i, s).clone())


@torch.no_grad()
def _evaluate(pack: _Pack, test: Batches, batch_size: int, precision: str) -> tuple[list[float], list[float]]:
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
    configs = list(configs)
    check_shape(configs)
    n = len(configs)
    callbacks = [list(c) for c in callbacks] if callbacks is not None else [[] for _ in configs]
    paths = list(checkpoint_paths) if checkpoint_paths is not None else [None] * n
    for name, value in (("callbacks", callbacks), ("checkpoint_paths", paths)):
        if len(value) != n:
            raise ValueError(f"{name}: {len(value)} entries for {n} configs")
    device = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    precision = configs[0].precision
    with precision_mode(precision, device), cudnn_benchmark(configs[0].graph and device.type == "cuda"):
        return _train_packed(configs, callbacks, paths, device, precision, dtype, background_writes)


def _train_packed(configs: list[RunConfig], callbacks: list[list[Callback]], paths: list, device: torch.device,
                  precision: str, dtype: torch.dtype, background_writes: bool | None = None) -> PackResult:
    members: list[_Member] = []
    for i, (c, cbs, p) in enumerate(zip(configs, callbacks, paths)):
        shared = members[0].train_batches.split.images if members and not c.train_subset else None
        members.append(_Member(i, c, cbs, device, p, shared))
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
    pack = _Pack(members, device, dtype)
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
                pack = _shrink(pack, keep, epoch)
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


def _shrink(pack: _Pack, keep: list[int], epoch: int) -> _Pack:
    """A new pack of the members ``keep`` (their weights, BN statistics, momentum and masks carried over)."""
    pack.pull_momentum()
    survivors = [pack.members[i] for i in keep]
    host = pack.host_state()
    for i in keep:
        pack.sync_solo(i, 0.0, 0.0, host)  # weights and BN statistics into the solo twin, the source of the new pack
    return _Pack(survivors, pack.device, pack.dtype)
