"""Explicit regularizers applied around the SGD step.

- Weight decay is coupled L2, exactly as torch.optim.SGD applies it (``d_p = grad + wd * p``), but
  added here so that it can be masked: the optimizer itself runs with ``weight_decay=0``.
- Sparse gradients: per parameter tensor a fixed random mask keeps a ``1 - s`` share of the entries.
  Masked entries get no update at all (gradient, weight decay and momentum), so they stay frozen.
  The masks are drawn from the run's seed and re-drawn only when ``s`` changes; ``s = 0`` is dense.
- Decoupled weight decay (``weight_decay_mode`` decoupled): ``w <- w - wd * w`` every step, before the SGD
  update and independent of the learning rate (masked entries stay frozen).
- Dropout before the classifier: masks from a generator seeded by the run's seed and the epoch
  (``dropout_generator``), so a resumed run draws what an uninterrupted one draws.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def mask_seed(run_seed: int, epoch: int) -> int:
    """Seed of the masks drawn at ``epoch`` (the first epoch of a new sparsity level)."""
    return (run_seed * 1_000_003 + epoch * 7_919 + 17) % (2**63 - 1)


def draw_masks(params: Sequence[torch.Tensor], sparsity: float, seed: int) -> list[torch.Tensor] | None:
    """One mask per parameter keeping exactly round((1 - s) x numel) entries (at least one); None if dense."""
    if sparsity <= 0:
        return None
    g = torch.Generator().manual_seed(seed)
    masks = []
    for p in params:
        n = p.numel()
        keep = max(1, int(round((1.0 - sparsity) * n)))
        flat = torch.zeros(n, dtype=p.dtype)
        flat[torch.randperm(n, generator=g)[:keep]] = 1
        masks.append(flat.view_as(p).to(p.device))
    return masks


def dropout_seed(run_seed: int, epoch: int) -> int:
    """Seed of the dropout masks of epoch ``epoch``."""
    return (run_seed * 1_000_037 + epoch * 15_485_863 + 29) % (2**63 - 1)


def dropout_generator(run_seed: int, epoch: int, device: torch.device | str) -> torch.Generator:
    """The generator of epoch ``epoch``'s dropout masks, on ``device``."""
    return torch.Generator(device=device).manual_seed(dropout_seed(run_seed, epoch))


def keep_mask(shape: Sequence[int], rate: float, generator: torch.Generator, device: torch.device,
              dtype: torch.dtype) -> torch.Tensor:
    """Inverted dropout: 1 / (1 - rate) where kept, 0 where dropped (float32 draws on ``device``)."""
    draws = torch.rand(tuple(shape), generator=generator, device=device)
    return (draws >= rate).to(dtype) * (1.0 / (1.0 - rate))


class SparseSGD:
    """torch.optim.SGD (momentum, no built-in decay) plus coupled weight decay and gradient masks."""

    def __init__(self, params: Sequence[torch.nn.Parameter], momentum: float):
        self.params = list(params)
        self.optimizer = torch.optim.SGD(self.params, lr=0.1, momentum=momentum, weight_decay=0.0, foreach=True)
        self.weight_decay = 0.0
        self.decoupled = False
        self.masks: list[torch.Tensor] | None = None

    def set_hyper(self, lr: float, weight_decay: float, decoupled: bool = False) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.weight_decay = weight_decay
        self.decoupled = decoupled

    def set_masks(self, masks: list[torch.Tensor] | None) -> None:
        """Install masks; momentum of frozen entries is cleared so they never move."""
        self.masks = masks
        if masks is None:
            return
        with torch.no_grad():
            for p, m in zip(self.params, masks):
                buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    buf.mul_(m)

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad for p in self.params]
        if self.weight_decay and not self.decoupled:
            torch._foreach_add_(grads, self.params, alpha=self.weight_decay)
        if self.masks is not None:
            torch._foreach_mul_(grads, self.masks)
        if self.weight_decay and self.decoupled:
            shrink = self.params if self.masks is None else torch._foreach_mul(self.params, self.masks)
            torch._foreach_add_(self.params, shrink, alpha=-self.weight_decay)
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=False)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "weight_decay": self.weight_decay}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.weight_decay = state["weight_decay"]
