"""Atomic checkpoints (``training.atomic.atomic_write``), and the one reader that says what is wrong.

A checkpoint holds only tensors, numbers, strings and containers of them, so it loads with
``torch.load(..., weights_only=True)``. Its payload: ``version``, ``identity`` (the run's
``RunConfig.identity_dict()``), ``epoch``, ``model``, ``optimizer``, ``masks`` and ``history``.

``load_checkpoint`` returns None when there is no checkpoint and raises ``CheckpointError`` (naming the
file and what is wrong) for one that cannot be used; ``set_aside`` moves such a file out of the way
without deleting it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from training.atomic import atomic_write

CHECKPOINT_VERSION = 1
"""The checkpoint layout this adareg writes and reads."""


class CheckpointError(Exception):
    """A checkpoint that cannot be resumed from: ``path`` is the file, ``what`` a short reason."""

    def __init__(self, path: str | os.PathLike, what: str):
        super().__init__(f"cannot resume from checkpoint {path}: {what}")
        self.path = str(path)
        self.what = what


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically. It is serialised in memory first: ``torch.save`` into a file
    that hits a full disk says only ``[enforce fail at inline_container.cc] unexpected pos``, while a plain
    write raises the ``OSError`` (ENOSPC, EDQUOT, EROFS) with its errno and the path."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getbuffer()
    atomic_write(path, lambda f: f.write(data))


def load_checkpoint(path: str | os.PathLike, identity: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or None if there is none.

    Raises ``CheckpointError`` for an empty, truncated or foreign file, a checkpoint of another
    ``CHECKPOINT_VERSION`` and, when ``identity`` is given, one whose identity differs from it.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size == 0:
        raise CheckpointError(path, "empty file (0 bytes)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch raises RuntimeError, UnpicklingError, EOFError, ... here)
        raise CheckpointError(path, f"truncated or not a checkpoint: {_one_line(e)}") from None
    if not isinstance(payload, dict) or "version" not in payload:
        raise CheckpointError(path, "truncated or not a checkpoint: no version field")
    if payload["version"] != CHECKPOINT_VERSION:
        raise CheckpointError(path, f"checkpoint version {payload['version']}, this adareg writes "
                                    f"{CHECKPOINT_VERSION}")
    if identity is not None and payload.get("identity") != identity:
        raise CheckpointError(path, "belongs to another configuration")
    return payload


def set_aside(path: str | os.PathLike) -> Path:
    """Rename a bad checkpoint to ``<name>.broken`` (``.broken.1``, ... if taken) beside it; return the new path."""
    path = Path(path)
    target = path.with_name(path.name + ".broken")
    n = 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.broken.{n}")
    os.replace(path, target)
    return target


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
