"""The fused operators and data of a pack (``training.packed``): N CIFAR ResNets of one shape as ONE model.

In the spirit of HFTA (Wang et al., MLSys 2021, "Horizontally Fused Training Array"):

- every member's batch is stacked along the channel axis, ``[B, N*3, 32, 32]`` (``PackedBatches``);
- a convolution is one grouped convolution over the members (``groups=N``), weights ``[N*Cout, Cin, k, k]``;
- BatchNorm is one ``BatchNorm2d(N*C)``: per-channel statistics are per-member statistics;
- option-A shortcuts subsample and zero-pad each member's channels;
- the classifier is block-diagonal (one batched matmul), logits ``[N, B, classes]``.

Fused tensors are member-major: ``member_view`` is member i's part in the solo model's shape, and
``stack_states`` turns solo state dicts into the fused model's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.data import PAD, Batches
from training.models import STAGE_CHANNELS
from training.regularizers import keep_mask


class PackedConv(nn.Module):
    """N bias-free 3x3 convolutions of one shape as one grouped convolution; weight ``[N*Cout, Cin, 3, 3]``."""

    def __init__(self, members: int, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.members, self.stride = members, stride
        self.weight = nn.Parameter(torch.empty(members * out_channels, in_channels, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, None, self.stride, 1, 1, self.members)


class PackedShortcutA(nn.Module):
    """Option A per member: subsample, then zero-pad each member's channels at their end."""

    def __init__(self, members: int, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.members, self.in_channels, self.stride = members, in_channels, stride
        self.pad = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        b, _, h, w = x.shape
        x = F.pad(x.reshape(b, self.members, self.in_channels, h, w), (0, 0, 0, 0, 0, self.pad))
        return x.reshape(b, -1, h, w).contiguous(memory_format=torch.channels_last)


class PackedBlock(nn.Module):
    def __init__(self, members: int, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = PackedConv(members, in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(members * out_channels)
        self.conv2 = PackedConv(members, out_channels, out_channels, 1)
        self.bn2 = nn.BatchNorm2d(members * out_channels)
        changes_shape = stride != 1 or in_channels != out_channels
        self.shortcut = PackedShortcutA(members, in_channels, out_channels, stride) if changes_shape else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PackedLinear(nn.Module):
    """N linear layers as one batched matmul (a block-diagonal classifier): ``[B, N*in]`` -> ``[N, B, out]``."""

    def __init__(self, members: int, in_features: int, out_features: int):
        super().__init__()
        self.members, self.in_features = members, in_features
        self.weight = nn.Parameter(torch.empty(members, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(members, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.shape[0], self.members, self.in_features).transpose(0, 1)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))


class PackedResNet(nn.Module):
    """``members`` CIFAR ResNets (``training.models.CifarResNet``) fused; same module names as the solo model.

    Input ``[B, N*C, H, W]`` (member i's images in channels Ci..Ci+C-1), output logits ``[N, B, classes]``.
    Parameters are uninitialised: load them with ``load_members``.
    """

    def __init__(self, members: int, blocks_per_stage: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.members = members
        c0 = STAGE_CHANNELS[0]
        self.conv = PackedConv(members, in_channels, c0, 1)
        self.bn = nn.BatchNorm2d(members * c0)
        stages, in_channels = [], c0
        for i, channels in enumerate(STAGE_CHANNELS):
            blocks = []
            for b in range(blocks_per_stage):
                blocks.append(PackedBlock(members, in_channels, channels, 2 if i > 0 and b == 0 else 1))
                in_channels = channels
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = PackedLinear(members, in_channels, num_classes)
        self.dropout: list[float] = [0.0] * members  # per member, as CifarResNet.dropout
        self.dropout_generators: list[torch.Generator | None] = [None] * members

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.stages(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        if self.training and any(self.dropout):
            b, width = x.shape[0], x.shape[1] // self.members
            masks = [keep_mask((b, width), rate, g, x.device, x.dtype) if rate
                     else torch.ones(b, width, device=x.device, dtype=x.dtype)
                     for rate, g in zip(self.dropout, self.dropout_generators)]
            x = x * torch.stack(masks, 1).view(b, -1)
        return self.fc(x)


SHARED_KEYS = ("num_batches_tracked",)


def is_shared(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in SHARED_KEYS


def stack_states(states: Sequence[dict[str, torch.Tensor]], fused: nn.Module) -> dict[str, torch.Tensor]:
    """Solo state dicts (solo key names and shapes) -> the fused model's state dict (member-major)."""
    out = {}
    for key, target in fused.state_dict().items():
        if is_shared(key):
            values = {int(s[key]) for s in states}
            if len(values) != 1:
                raise ValueError(f"{key}: members differ ({sorted(values)})")
            out[key] = states[0][key].clone()
        else:
            out[key] = torch.stack([s[key].reshape(-1) for s in states]).view(target.shape)
    return out


def member_view(tensor: torch.Tensor, members: int, i: int, solo_shape: torch.Size) -> torch.Tensor:
    """Member ``i``'s part of a fused (member-major) tensor, shaped as in the solo model (a view)."""
    return tensor.view(members, *solo_shape)[i]


# --- data -------------------------------------------------------------------------------------------

class PackedBatches:
    """Every member's ``Batches``, fused: ``epoch(generators)`` yields ``x [B, N*C, H, W]`` (channels_last)
    and ``y [N, B]``, member i's part equal to what ``batches[i].epoch(generators[i])`` yields.

    Draws from each member's generator exactly what ``Batches.epoch`` draws (permutation, then crop
    offsets and flips), then crops, flips and normalises all members' images in one go: a handful of
    kernels per step instead of a handful per member. Members' distinct images (a ``train_subset``)
    are concatenated once and the members' splits become views of that one tensor.
    """

    def __init__(self, batches: Sequence[Batches]):
        self.batches, first = list(batches), batches[0]
        self.n = len(first.split)
        self.shared = all(b.split.images is first.split.images for b in batches)
        if self.shared:
            self.images = first.split.images
        else:
            self.images = torch.cat([b.split.images for b in batches])
            for i, b in enumerate(batches):
                b.split.images = self.images[i * self.n:(i + 1) * self.n]
        self.labels = torch.cat([b.split.labels for b in batches])

    axis = 1
    """The position axis of ``draw``'s tensors (members first)."""

    def epoch(self, generators: Sequence[torch.Generator]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        draws = self.draw(generators)
        for start in range(0, self.n, self.batches[0].batch_size):
            stop = start + self.batches[0].batch_size
            yield self.make(*(d[:, start:stop] if d is not None else None for d in draws))

    def draw(self, generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, ...]:
        """Every member's draws (as ``Batches.draw``), stacked on the device: (image index [N, n], label index
        [N, n], offsets [N, n, 2], flips [N, n]), the last two None without augmentation."""
        first, k, n = self.batches[0], len(self.batches), self.n
        device = self.images.device
        perms, offsets, flips = [], [], []
        for b, g in zip(self.batches, generators):
            perms.append(torch.randperm(n, generator=g))
            if b.augment:
                offsets.append(torch.randint(0, 2 * PAD + 1, (n, 2), generator=g))
                flips.append(torch.rand(n, generator=g) < 0.5 if b.flip else torch.zeros(n, dtype=torch.bool))
        perm = torch.stack(perms)
        label_index = (perm + torch.arange(k).view(k, 1) * n).to(device)
        image_index = perm.to(device) if self.shared else label_index
        offsets_all = flips_all = None
        if first.augment:
            offsets_all, flips_all = torch.stack(offsets).to(device), torch.stack(flips).to(device)
        return image_index, label_index, offsets_all, flips_all

    def make(self, image_index: torch.Tensor, label_index: torch.Tensor, offsets: torch.Tensor | None,
             flips: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused batch of each member's images ``image_index[i]`` (device ops only)."""
        first, k, b = self.batches[0], len(self.batches), image_index.shape[1]
        x = self.images[image_index.reshape(-1)]
        if first.augment:
            x = first._crop_flip(x, offsets.reshape(-1, 2), flips.reshape(-1))
        x = first._normalise(x)
        x = x.view(k, b, *x.shape[1:]).transpose(0, 1).reshape(b, -1, *x.shape[2:])
        return x.contiguous(memory_format=torch.channels_last), self.labels[label_index]


def member_losses(logits: torch.Tensor, y: torch.Tensor, smoothing: Sequence[float]) -> torch.Tensor:
    """Each member's mean training loss ``[N]`` of logits ``[N, B, classes]``: cross-entropy with member i's
    label smoothing ``smoothing[i]`` (as ``F.cross_entropy(..., label_smoothing=...)`` computes it)."""
    k = logits.shape[0]
    if not any(smoothing):
        flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
        return flat.view(k, -1).mean(1)
    logp = F.log_softmax(logits, -1)
    nll = -logp.gather(2, y.unsqueeze(2)).squeeze(2)
    uniform = -logp.mean(2)
    eps = torch.tensor(list(smoothing), dtype=logits.dtype, device=logits.device).view(k, 1)
    return ((1 - eps) * nll + eps * uniform).mean(1)


def memory_format_of(p: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if p.dim() == 4 else torch.contiguous_format


def full_precision(logits: torch.Tensor) -> torch.Tensor:
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
