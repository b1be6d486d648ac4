"""Device slots: where one worker runs at a time, a share of a GPU (its own CUDA_VISIBLE_DEVICES) or CPU
threads, for this machine's GPUs or a Ray cluster's."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from orchestrator.errors import BadValue, arg


@dataclass(frozen=True)
class Slot:
    """A place for one run at a time: a share of a GPU, or CPU threads."""

    name: str
    device: str = "cpu"  # the worker's torch device: cpu | cuda
    gpu: str | None = None  # CUDA_VISIBLE_DEVICES for the worker (None: the backend decides)
    threads: int = 1  # torch / OpenMP threads
    gpu_fraction: float = 0.0  # Ray: num_gpus of the task (1 / jobs per GPU)


def visible_gpus() -> list[str]:
    """CUDA_VISIBLE_DEVICES values of the GPUs this process sees (its own mask applied), in order."""
    import torch  # device_count asks NVML and does not initialise CUDA here

    count = torch.cuda.device_count()
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mask is not None:
        return [d.strip() for d in mask.split(",") if d.strip()][:count]
    return [str(i) for i in range(count)]


def parse_gpus(gpus: str | None, visible: Sequence[str]) -> list[str]:
    """``--gpus``: 'all' (or None), 'none', or indices '0,1' into the visible GPUs -> their ids."""
    if gpus is None or gpus.strip().lower() == "all":
        return list(visible)
    if gpus.strip().lower() == "none":
        return []
    chosen = []
    for part in gpus.split(","):
        part = part.strip()
        if not part.isdigit():
            raise BadValue(f"{arg('gpus')} {gpus!r}: expected all, none or GPU indices such as 0,1")
        if int(part) >= len(visible):
            seen = f"{len(visible)} GPU{'s' if len(visible) != 1 else ''}" + (
                f" (0-{len(visible) - 1})" if visible else "")
            raise BadValue(f"{arg('gpus')} {gpus!r}: GPU {part} is not visible; this machine has {seen}")
        if visible[int(part)] not in chosen:
            chosen.append(visible[int(part)])
    return chosen


def device_slots(gpus: Sequence[str], jobs_per_gpu: int = 1, max_parallel: int | None = None,
                 cores: int | None = None) -> list[Slot]:
    """K slots per GPU (spread over the GPUs first), capped by ``max_parallel``; without GPUs,
    ``max_parallel`` CPU slots (default: half the cores). Threads: the cores shared out."""
    cores = cores or os.cpu_count() or 1
    if jobs_per_gpu < 1:
        raise BadValue(f"{arg('jobs_per_gpu')} {jobs_per_gpu}: must be at least 1")
    if max_parallel is not None and max_parallel < 1:
        raise BadValue(f"{arg('max_parallel')} {max_parallel}: must be at least 1")
    if gpus:
        places = [(g, j) for j in range(jobs_per_gpu) for g in gpus][:max_parallel]
        threads = max(1, cores // len(places))
        return [Slot(f"gpu{g}.{j}", "cuda", g, threads, 1.0 / jobs_per_gpu) for g, j in places]
    n = max_parallel or max(1, cores // 2)
    threads = max(1, cores // n)
    return [Slot(f"cpu{i}", "cpu", None, threads) for i in range(n)]


def ray_slots(resources: dict[str, float], no_gpus: bool, jobs_per_gpu: int, max_parallel: int | None
              ) -> list[Slot]:
    """Slots on a Ray cluster: K per cluster GPU (Ray picks the GPU), else CPU slots as locally."""
    n_gpus = 0 if no_gpus else int(resources.get("GPU", 0))
    slots = device_slots([str(i) for i in range(n_gpus)], jobs_per_gpu, max_parallel, int(resources.get("CPU", 1)))
    return [Slot(f"ray-{s.name}", s.device, None, s.threads, s.gpu_fraction) for s in slots]


def check_ray_gpus(gpus: str | None) -> None:
    if gpus is not None and gpus.strip().lower() not in ("all", "none"):
        raise BadValue(f"{arg('gpus')} {gpus!r}: with {arg('backend')} ray use all or none (Ray places runs on GPUs)")

