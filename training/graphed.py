"""A training step that is one launch: forward, backward and the masked SGD update over static buffers,
captured once as a CUDA graph and replayed (``RunConfig.graph``; opt-in, off by default).

Small CIFAR ResNets on a big GPU are bound by launching kernels, not by arithmetic (a ResNet-14 step at
batch 50 is ~250 CUDA kernels, 1.3-4 ms of CPU time). A replayed graph launches them all at once. What
changes between steps lives in device tensors that the graph reads and that are updated in place:

- the learning rate and weight decay (``StaticStep.set_hyper``: a new LR step changes a tensor, not the graph);
- the masks of sparse gradients (``set_masks``; all ones when dense, so a redraw never recaptures);
- the epoch's data order and augmentation draws: drawn as the eager trainer draws them (the same
  CPU generators, so the same data), copied to static device buffers once per epoch
  (``StaticBatches.load``); the graph gathers, crops, flips and normalises its batch itself from a
  step counter on the device that it advances.

The update is ``training.regularizers.SparseSGD``'s (coupled weight decay ``g + wd * w``, masks, momentum
``b = m * b + g``, ``w -= lr * b``) written with tensor-valued lr and wd, so it equals the eager step up to
float rounding (a product and a sum rounded apart instead of fused), not bit for bit. A last partial batch
runs the same step function eagerly (another shape). Off CUDA the step function runs eagerly every step:
that is how the CPU tests check it against the eager trainer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

__all__ = ["StaticBatches", "StaticStep", "capturable"]


def capturable(device: torch.device) -> bool:
    """Whether steps on ``device`` are captured as CUDA graphs (else they run eagerly)."""
    return device.type == "cuda"


class StaticBatches:
    """An epoch's draws (``Batches.draw`` / ``PackedBatches.draw``) in static device buffers, and the batch
    of a step whose index is a device tensor. ``source`` is the ``Batches`` or ``PackedBatches``."""

    def __init__(self, source, n: int, batch_size: int, device: torch.device):
        self.source, self.batch_size, self.axis = source, batch_size, source.axis
        self.full_steps, self.rest = divmod(n, batch_size)
        self.buffers: list[torch.Tensor | None] | None = None
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.draws: tuple = ()

    def load(self, draws: tuple) -> None:
        """Copy an epoch's draws in (the first ``full_steps`` batches; the rest stays in ``self.draws``)."""
        self.draws = draws
        shaped = [d.narrow(self.axis, 0, self.full_steps * self.batch_size)
                  .unflatten(self.axis, (self.full_steps, self.batch_size)) if d is not None else None for d in draws]
        if self.buffers is None:
            self.buffers = [s.clone() if s is not None else None for s in shaped]
        else:
            for b, s in zip(self.buffers, shaped):
                if b is not None:
                    b.copy_(s)
        self.step.zero_()

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at the device step counter (device ops only, no host sync), then the counter + 1."""
        parts = [b.index_select(self.axis, self.step).squeeze(self.axis) if b is not None else None
                 for b in self.buffers]
        self.step += 1
        return self.source.make(*parts)

    def last(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The epoch's last, partial batch (None when the batch size divides the split)."""
        if not self.rest:
            return None
        start = self.full_steps * self.batch_size
        return self.source.make(*(d.narrow(self.axis, start, self.rest) if d is not None else None
                                  for d in self.draws))


class StaticStep:
    """Forward, backward and the masked SGD update of ``params`` over static buffers.

    ``loss(x, y)`` returns (the loss to differentiate, per-step statistics to add into the accumulators
    ``sums``, a list of device tensors). ``decay`` is None (solo: one weight decay, ``set_hyper``'s) or one
    device tensor per parameter (a pack: each member's weight decay, updated in place by its owner).
    ``momentum_buffers`` (one per parameter, from the optimizer's state, zeros for a fresh run: the first
    eager step ``b = g`` equals ``b = m * 0 + g``) are updated in place.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], momentum: float,
                 momentum_buffers: Sequence[torch.Tensor], loss: Callable, sums: Sequence[torch.Tensor],
                 batches: StaticBatches, device: torch.device, decay: Sequence[torch.Tensor] | None = None,
                 state: Sequence[torch.Tensor] = ()):
        self.params, self.momentum, self.bufs = list(params), momentum, list(momentum_buffers)
        self.loss, self.sums, self.batches, self.device = loss, list(sums), batches, device
        dtype = self.params[0].dtype
        self.neg_lr = torch.zeros((), dtype=dtype, device=device)
        self.wd = torch.zeros((), dtype=dtype, device=device)
        self.decay = list(decay) if decay is not None else None
        self.masks = [torch.ones_like(p) for p in self.params]
        self.state = list(state)  # everything else a step changes (BatchNorm buffers): saved around warm-up
        self.graph: torch.cuda.CUDAGraph | None = None
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def set_hyper(self, lr: float, weight_decay: float = 0.0) -> None:
        self.neg_lr.fill_(-lr)
        self.wd.fill_(weight_decay)

    def set_masks(self, masks: Sequence[torch.Tensor] | None) -> None:
        """New masks (ones where None); the momentum of frozen entries is cleared, as ``SparseSGD.set_masks``."""
        with torch.no_grad():
            for j, m in enumerate(self.masks):
                if masks is None:
                    m.fill_(1)
                else:
                    m.copy_(masks[j].view(m.shape))
                    if self.bufs:
                        self.bufs[j].mul_(m)

    def _update(self) -> None:
        grads = [p.grad for p in self.params]
        if self.decay is None:
            torch._foreach_add_(grads, torch._foreach_mul(self.params, self.wd))
        else:
            torch._foreach_addcmul_(grads, self.params, self.decay)
        torch._foreach_mul_(grads, self.masks)
        step = grads
        if self.momentum:
            torch._foreach_mul_(self.bufs, self.momentum)
            torch._foreach_add_(self.bufs, grads)
            step = self.bufs
        torch._foreach_add_(self.params, torch._foreach_mul(step, self.neg_lr))

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        torch._foreach_zero_([p.grad for p in self.params])
        loss, stats = self.loss(x, y)
        loss.backward()
        with torch.no_grad():
            self._update()
            torch._foreach_add_(self.sums, stats)

    def _body(self) -> None:
        self._step(*self.batches.batch())

    def step_once(self) -> None:
        """One step on the next full batch of the loaded draws: a replay of the graph on CUDA (captured on
        the first call), the step function itself elsewhere."""
        if not capturable(self.device):
            self._body()
            return
        if self.graph is None:
            self._capture()
        self.graph.replay()

    def epoch(self) -> None:
        """Train one epoch over the loaded draws: every full batch (``step_once``), then the partial batch
        eagerly."""
        for _ in range(self.batches.full_steps):
            self.step_once()
        last = self.batches.last()
        if last is not None:
            self._step(*last)

    def _capture(self) -> None:
        """Warm up on a side stream (cuDNN / cuBLAS choose and allocate), capture one step, then put back
        every tensor the warm-up changed, so training starts where it stood."""
        saved = [t.detach().clone() for t in (*self.params, *self.bufs, *self.sums, *self.state,
                                              self.batches.step)]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._body()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self._body()
        with torch.no_grad():
            for t, s in zip((*self.params, *self.bufs, *self.sums, *self.state, self.batches.step), saved):
                t.copy_(s)


def no_autocast_cache(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast for a captured step: its weight-cast cache must be off inside a CUDA graph."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=False)


@contextlib.contextmanager
def cudnn_benchmark(on: bool):
    """``torch.backends.cudnn.benchmark`` for the block (cuDNN times its algorithms once per shape)."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on or saved
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def momentum_buffers(opt: torch.optim.SGD, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The SGD momentum buffer of each of ``params``, created as zeros where a fresh run has none yet (the
    first eager step sets ``b = g``, which ``b = m * 0 + g`` equals); [] without momentum."""
    if not opt.param_groups[0]["momentum"]:
        return []
    out = []
    for p in params:
        state = opt.state[p]
        if state.get("momentum_buffer") is None:
            state["momentum_buffer"] = torch.zeros_like(p)
        out.append(state["momentum_buffer"])
    return out
