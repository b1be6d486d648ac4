"""CIFAR ResNets of He et al. 2016 §4.2: ``resnet{6n+2}``.

A 3x3 conv with 16 channels (on 3 input channels, or 1 for grayscale images), three stages of ``n``
BasicBlocks with 16/32/64 channels (stride 2 at the start of stages 2 and 3), global average pooling and a
linear classifier. Shortcuts are option A (subsample + zero channel padding, no parameters), which gives the
paper's parameter counts (ResNet-20: 0.27M, ResNet-32: 0.46M). No data-dependent control flow, so
``torch.compile`` traces it in one graph; the factory never moves the model to a device.

Dropout before the classifier (``dropout`` rate, masks from ``dropout_generator``) acts in training mode
only and is off (no draws at all) at rate 0, the default; the trainer sets both every epoch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.config import resnet_depth
from training.regularizers import keep_mask

STAGE_CHANNELS = (16, 32, 64)


class ShortcutA(nn.Module):
    """Option A: ``x[:, :, ::stride, ::stride]`` then zero-pad the new channels (no parameters)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.pad))  # pad the channel dim at its end


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        changes_shape = stride != 1 or in_channels != out_channels
        self.shortcut = ShortcutA(in_channels, out_channels, stride) if changes_shape else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        c0 = STAGE_CHANNELS[0]
        self.conv = nn.Conv2d(in_channels, c0, 3, stride=1, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c0)
        stages, in_channels = [], c0
        for i, channels in enumerate(STAGE_CHANNELS):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if i > 0 and b == 0 else 1
                blocks.append(BasicBlock(in_channels, channels, stride))
                in_channels = channels
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(in_channels, num_classes)
        self.dropout = 0.0
        self.dropout_generator: torch.Generator | None = None
        self._init_weights()

    def _init_weights(self) -> None:
        # Kaiming normal with mode="fan_out" (std = sqrt(2 / (k*k*out_channels))), as in the
        # authors' Torch code (fb.resnet.torch) and torchvision; He et al. 2015 show fan_in and
        # fan_out both keep the signal stable. BN starts as identity; the linear layer keeps
        # PyTorch's default init.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.stages(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        if self.training and self.dropout:
            x = x * keep_mask(x.shape, self.dropout, self.dropout_generator, x.device, x.dtype)
        return self.fc(x)


def build_model(arch: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """The ``resnet{6n+2}`` of He et al. §4.2 on the CPU, its stem taking ``in_channels`` (3 for CIFAR, 1 for
    Fashion-MNIST; nothing else changes); ConfigError('arch') for other names."""
    depth = resnet_depth(arch)
    return CifarResNet((depth - 2) // 6, num_classes, in_channels)
