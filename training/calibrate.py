"""Calibration: how fast packs of each size train here, as one fused model (``calibrate``) and as solo
models on CUDA streams (``calibrate_streams``); ``orchestrator.dispatch.autopack`` picks from both."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from training.fused import PackedResNet, full_precision
from training.loop import autocast, precision_mode, sync


def calibrate(arch: str, num_classes: int, batch_size: int, sizes: Sequence[int], *, device: str | torch.device,
              precision: str = "fp32", steps: int = 10, warmup: int = 3) -> list[dict[str, float]]:
    """Time ``steps`` training steps (forward, backward, SGD) of packs of each size in ``sizes`` on random
    images: ``[{"members", "images_per_second" (all members together), "peak_bytes" (CUDA memory the
    step needed; 0 elsewhere)}]``, in the order given. Stops at the first size that runs out of memory."""
    blocks = (int(arch.removeprefix("resnet")) - 2) // 6
    return _each_size(sizes, torch.device(device), precision, batch_size, steps, lambda n, dev: _time_pack(
        n, blocks, num_classes, batch_size, dev, precision, steps, warmup))


def _each_size(sizes: Sequence[int], device: torch.device, precision: str, images_per_step: int,
               steps: int, time_one) -> list[dict[str, float]]:
    """For each size n in ``precision``: ``time_one(n, device)`` (the seconds of ``steps`` timed steps of
    ``n x images_per_step`` images) as ``{"members", "images_per_second", "peak_bytes"}``, up to the first
    size that runs out of memory."""
    out: list[dict[str, float]] = []
    with precision_mode(precision, device):
        for n in sizes:
            try:
                if device.type == "cuda":
                    sync(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                seconds = time_one(n, device)
                peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else 0
                out.append({"members": n, "images_per_second": n * images_per_step * steps / seconds,
                            "peak_bytes": int(peak)})
            except torch.OutOfMemoryError:
                break
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return out


def _time_pack(n: int, blocks: int, num_classes: int, batch_size: int, device: torch.device, precision: str,
               steps: int, warmup: int) -> float:
    gen = torch.Generator().manual_seed(n)
    model = PackedResNet(n, blocks, num_classes)
    for p in model.parameters():
        p.data.normal_(0.0, 0.05, generator=gen)
    model = model.to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
    x = torch.randn(batch_size, 3 * n, 32, 32, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (n, batch_size), generator=gen).to(device)
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        with autocast(precision, device):
            logits = model(x)
        loss = F.cross_entropy(full_precision(logits).reshape(-1, num_classes), y.reshape(-1), reduction="none")
        opt.zero_grad(set_to_none=False)
        loss.view(n, -1).mean(1).sum().backward()
        opt.step()
    sync(device)
    return time.perf_counter() - t0


def calibrate_streams(arch: str, num_classes: int, batch_size: int, sizes: Sequence[int], *,
                      device: str | torch.device, precision: str = "fp32", steps: int = 10,
                      warmup: int = 3) -> list[dict[str, float]]:
    """As ``calibrate``, for ``training.streams``: ``n`` solo models of ``arch`` each on its own CUDA stream
    and thread (one after another elsewhere), ``steps`` training steps each, timed together."""
    return _each_size(sizes, torch.device(device), precision, batch_size, steps, lambda n, dev: _time_streams(
        n, arch, num_classes, batch_size, dev, precision, steps, warmup))


def _time_streams(n: int, arch: str, num_classes: int, batch_size: int, device: torch.device, precision: str,
                  steps: int, warmup: int) -> float:
    from training.models import build_model

    gen = torch.Generator().manual_seed(n)
    work = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(n)
        for _ in range(n):
            model = build_model(arch, num_classes).to(device, memory_format=torch.channels_last).train()
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
            x = torch.randn(batch_size, 3, 32, 32, generator=gen).to(device).contiguous(
                memory_format=torch.channels_last)
            y = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
            work.append((model, opt, x, y))

    def run(i: int, count: int) -> None:
        model, opt, x, y = work[i]
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for _ in range(count):
                with autocast(precision, device):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
                opt.zero_grad(set_to_none=False)
                loss.backward()
                opt.step()
            if stream is not None:
                stream.synchronize()

    def all_members(count: int) -> None:
        if device.type != "cuda":
            for i in range(n):
                run(i, count)
            return
        threads = [threading.Thread(target=run, args=(i, count)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    all_members(warmup)
    sync(device)
    t0 = time.perf_counter()
    all_members(steps)
    sync(device)
    return time.perf_counter() - t0
