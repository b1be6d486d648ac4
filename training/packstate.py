"""What a pack trains (``training.packed``): each member's record and solo twin (``PackMember``), and the fused
model and optimizer of the members still training (``FusedPack``), with per-member weight decay, masks,
dropout and label smoothing, and each member's solo-format state sliced from one bulk copy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from training.bookkeeping import host_copy, optimizer_state
from training.callbacks import Callback
from training.config import RunConfig, resnet_depth
from training.core import RunRecord, seeded_model
from training.data import Batches, Split, load_splits
from training.fused import (
    PackedBatches,
    PackedResNet,
    full_precision,
    is_shared,
    member_view,
    memory_format_of,
    stack_states,
)
from training.graphed import StaticBatches, StaticStep, momentum_buffers, no_autocast_cache
from training.regularizers import SparseSGD, dropout_generator


class PackMember:
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


class FusedPack:
    """The fused model and optimizer of the members still training.

    ``slots`` are the fused model's members: the members, or a lone member twice. A grouped convolution
    over one group runs other kernels than over several, so a lone member (a pack split by a resume,
    or shrunk by divergence) trains beside an identical copy of itself and gets, bit for bit, the
    numbers it would get in any pack."""

    def __init__(self, members: list[PackMember], device: torch.device, dtype: torch.dtype):
        self.members, self.device, self.dtype = members, device, dtype
        self.slots = members if len(members) > 1 else members * 2
        n, first = len(self.slots), members[0].config
        self.n = n
        self.model = PackedResNet(n, (resnet_depth(first.arch) - 2) // 6, first.num_classes, first.image.channels)
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


def shrink(pack: FusedPack, keep: list[int], epoch: int) -> FusedPack:
    """A new pack of the members ``keep`` (their weights, BN statistics, momentum and masks carried over)."""
    pack.pull_momentum()
    survivors = [pack.members[i] for i in keep]
    host = pack.host_state()
    for i in keep:
        pack.sync_solo(i, 0.0, 0.0, host)  # weights and BN statistics into the solo twin, the source of the new pack
    return FusedPack(survivors, pack.device, pack.dtype)
