"""Atomic checkpoints (``training.atomic.atomic_write``).

A checkpoint holds only tensors, numbers, strings and containers of them, so it loads with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from training.atomic import atomic_write


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or None if there is none."""
    path = Path(path)
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
