"""What weight decay does to the network, per epoch: weight norms, effective steps, the decay timescale.

With BatchNorm after a convolution the network's function does not depend on the scale of that
convolution's weights, so weight decay acts only through the norm ||w||: it sets the *effective step*
lr / ||w||^2, the angular step of the weight direction (van Laarhoven 2017; Zhang et al. 2018, "Three
mechanisms of weight decay regularization"). Every convolution of the CIFAR ResNets here is followed by
its own BatchNorm. The *decay timescale* says how many epochs decay needs to shrink the weights by a
factor e on its own: with coupled (L2, PyTorch SGD) decay each step shrinks a weight by lr * wd, and
momentum beta carries that on to lr * wd / (1 - beta) per step, so

    decay_epochs = (1 - beta) / (lr * wd * steps_per_epoch)        (coupled)
    decay_epochs = 1 / (wd * steps_per_epoch)                     (decoupled: w <- w - wd * w per step)

Table 1's scheme 01 at batch 50 on 50,000 images (1,000 steps, momentum 0.9): 10 epochs at lr 0.1 and
wd 1e-4, 6,250 at lr 1e-5 and wd 1.6e-3. Without decay the timescale is infinite; it is logged as
``NO_DECAY`` (the largest float, which is also what MLflow stores for +inf), so the metric is a finite
number every epoch. Under gradient sparsity frozen entries do not decay at all; the timescale is that
of the entries that update.

The metrics (names in ``training.callbacks.DIAGNOSTICS``), read after an epoch's last step:

- ``weight_norm_<stage>``: the L2 norm of all the stage's convolution weights as one vector,
  sqrt(sum_t ||w_t||^2); ``weight_norm_fc``: the classifier's weight (not its bias);
- ``effective_lr_<stage>``: the mean over the stage's convolution tensors t of lr / ||w_t||^2 (each
  convolution is scale-invariant on its own, so the per-tensor step is what moves it);
- ``decay_epochs``: as above.

Norms are sums of squares in float64, one reduction per tensor and one transfer to the host per epoch.
A pack (``training.packed``) reads every member's norms from the fused tensors at once
(``packed_diagnostics``); a member's numbers are its solo run's, up to float64 rounding of its weights.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import torch

from training.callbacks import DIAGNOSTICS, NO_DECAY, STAGES

_NAME = re.compile(r"(?:.*\.)?(?:(conv)|(fc)|stages\.(\d+)\.\d+\.conv\d+)\.weight")


def stage_of(name: str) -> str | None:
    """The part of the network a parameter of ``training.models.CifarResNet`` (or the fused model, which has
    the same names; or either inside a wrapper, ``model.conv.weight``) belongs to for the diagnostics:
    ``stem``, ``stage1``..``stage3`` for convolution weights, ``fc`` for the classifier's weight, None for
    anything else (BatchNorm, biases)."""
    m = _NAME.fullmatch(name)
    if m is None:
        return None
    return "stem" if m.group(1) else "fc" if m.group(2) else f"stage{int(m.group(3)) + 1}"


def decay_epochs(lr: float, weight_decay: float, momentum: float, steps_per_epoch: int,
                 decoupled: bool = False) -> float:
    """Epochs weight decay alone takes to shrink the weights by a factor e (``NO_DECAY`` without decay)."""
    if weight_decay <= 0:
        return NO_DECAY
    if decoupled:
        return 1.0 / (weight_decay * steps_per_epoch)
    return (1.0 - momentum) / (lr * weight_decay * steps_per_epoch)


def stage_metrics(stages: Sequence[str], squared_norms: Sequence[float], *, lr: float, weight_decay: float,
                  momentum: float, steps_per_epoch: int, decoupled: bool = False) -> dict[str, float]:
    """The diagnostics (in ``DIAGNOSTICS`` order) of the tracked tensors' ``stages`` and ``squared_norms``."""
    total = {s: 0.0 for s in (*STAGES, "fc")}
    steps: dict[str, list[float]] = {s: [] for s in STAGES}
    for stage, sq in zip(stages, squared_norms, strict=True):
        total[stage] += sq
        if stage != "fc":
            steps[stage].append(lr / sq)
    out = {f"weight_norm_{s}": total[s] ** 0.5 for s in (*STAGES, "fc")}
    out.update({f"effective_lr_{s}": sum(v) / len(v) if v else math.nan for s, v in steps.items()})
    out["decay_epochs"] = decay_epochs(lr, weight_decay, momentum, steps_per_epoch, decoupled)
    return {name: out[name] for name in DIAGNOSTICS}


@torch.no_grad()
def squared_norms(tensors: Sequence[torch.Tensor], members: int = 1) -> list[list[float]]:
    """``[member][tensor]``: each member's sum of squares (float64) of each tensor, for tensors whose first
    dimension is member-major over ``members`` (a pack's fused tensors; 1: a solo model's). One transfer."""
    rows = []
    for t in tensors:
        q = t.detach().unflatten(0, (members, -1)).double()
        rows.append(q.square().sum(dim=tuple(range(1, q.dim()))))
    return torch.stack(rows, dim=1).tolist() if rows else [[] for _ in range(members)]


def _tracked(names: Iterable[str]) -> list[tuple[int, str]]:
    return [(i, s) for i, name in enumerate(names) if (s := stage_of(name)) is not None]


def model_diagnostics(named_parameters: Iterable[tuple[str, torch.Tensor]], *, lr: float, weight_decay: float,
                      momentum: float, steps_per_epoch: int, decoupled: bool = False) -> dict[str, float]:
    """The diagnostics of a solo model (``model.named_parameters()``) trained at ``lr`` / ``weight_decay``."""
    named = list(named_parameters)
    tracked = _tracked(name for name, _ in named)
    (norms,) = squared_norms([named[i][1] for i, _ in tracked])
    return stage_metrics([s for _, s in tracked], norms, lr=lr, weight_decay=weight_decay, momentum=momentum,
                         steps_per_epoch=steps_per_epoch, decoupled=decoupled)


def packed_diagnostics(names: Sequence[str], params: Sequence[torch.Tensor], members: int, *, lr: float,
                       weight_decays: Sequence[float], momentum: float, steps_per_epoch: int,
                       decoupled: Sequence[bool] = ()) -> list[dict[str, float]]:
    """The diagnostics of the first ``len(weight_decays)`` members of a fused model of ``members`` (its
    parameters' ``names`` and member-major ``params``), member i trained at ``weight_decays[i]``, decoupled
    if ``decoupled[i]`` (default: all coupled)."""
    tracked = _tracked(names)
    norms = squared_norms([params[i] for i, _ in tracked], members)
    stages = [s for _, s in tracked]
    return [stage_metrics(stages, norms[i], lr=lr, weight_decay=wd, momentum=momentum,
                          steps_per_epoch=steps_per_epoch, decoupled=bool(decoupled) and decoupled[i])
            for i, wd in enumerate(weight_decays)]
