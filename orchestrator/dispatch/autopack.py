"""``--pack auto``: how many runs of one shape to train as one fused model per worker.

On the CPU: one run per process (packs measured 0.77-0.84x of separate processes on the 2-core CPU, see
``benchmarks/sweep_throughput.py``). On GPUs: a short calibration per shape (arch, classes, batch size,
precision) on the first GPU slot's device, in a subprocess so the orchestrator never holds a CUDA
context: ``training.calibrate.calibrate`` times a few training steps of packs of 1, 2, 5, 10, 25 and 50
members (up to the runs there are per slot) and records the memory each needed. The chosen size is the
smallest whose throughput is within 5 % of the best among those that fit, all jobs of one GPU together,
in 80 % of the GPU's free memory. The same sizes are timed as solo models on CUDA streams
(``training.calibrate.calibrate_streams``, ``training.streams``), in the run's precision, and the pack
trains on streams when the size chosen there is faster than the fused pack chosen (``choose_mode``; a
calibration cached without stream timings keeps fused packs). Measurements are kept in
``<runs dir>/packs/calibration.json`` per device and torch version, so a re-run or a resumed sweep
decides the same without measuring again.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

CANDIDATES = (1, 2, 5, 10, 25, 50)
FALLBACK = 10  # when the calibration cannot run (e.g. a Ray cluster whose GPUs this machine lacks)
TOLERANCE = 0.05  # prefer a smaller pack within 5 % of the best throughput (less left over, less at stake)
MEMORY_SHARE = 0.8  # of the free memory at calibration, for all jobs of one GPU
CALIBRATION_TIMEOUT_S = 300
CACHE = "calibration.json"


def calibration_shape(config) -> tuple[str, int, int, str]:
    """What the calibration depends on: arch, classes, batch size, precision."""
    return config.arch, config.num_classes, config.batch_size, config.precision


def choose(measured: Sequence[dict], free_bytes: int | None, jobs_per_gpu: int, cap: int) -> int:
    """The smallest pack within TOLERANCE of the best throughput among the sizes up to ``cap`` whose
    memory, ``jobs_per_gpu`` times, fits in MEMORY_SHARE of ``free_bytes`` (None: unknown, no limit)."""
    fits = [m for m in measured if m["members"] <= cap
            and (free_bytes is None or m["peak_bytes"] * jobs_per_gpu <= MEMORY_SHARE * free_bytes)]
    if not fits:
        return 1
    best = max(m["images_per_second"] for m in fits)
    return min(int(m["members"]) for m in fits if m["images_per_second"] >= (1 - TOLERANCE) * best)


def _rate(measured: Sequence[dict], members: int) -> float:
    return max((m["images_per_second"] for m in measured if m["members"] == members), default=0.0)


def choose_mode(entry: dict, jobs_per_gpu: int, cap: int) -> tuple[int, str]:
    """``(size, mode)`` from a calibration ``entry``: the fused pack ``choose`` picks from ``entry["results"]``,
    or the streams pack it picks from ``entry["streams"]`` (if any) when that one trains more images/s."""
    free = entry.get("free_bytes")
    fused = choose(entry["results"], free, jobs_per_gpu, cap)
    streams = entry.get("streams") or []
    if streams:
        size = choose(streams, free, jobs_per_gpu, cap)
        if size > 1 and _rate(streams, size) > _rate(entry["results"], fused):
            return size, "streams"
    return fused, "fused"


def measure(shape: tuple[str, int, int, str], sizes: Sequence[int], device: str, gpu: str | None,
            steps: int = 10, warmup: int = 3) -> dict:
    """Run the calibration in a fresh process on ``device`` (``gpu``: its CUDA_VISIBLE_DEVICES): ``{"device",
    "free_bytes" (None on the CPU), "torch", "results": training.calibrate.calibrate's, "streams":
    calibrate_streams'}``. RuntimeError if it fails."""
    arch, classes, batch, precision = shape
    args = json.dumps({"arch": arch, "num_classes": classes, "batch_size": batch, "precision": precision,
                       "sizes": list(sizes), "device": device, "steps": steps, "warmup": warmup})
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    try:
        done = subprocess.run([sys.executable, "-P", "-m", "orchestrator.dispatch.autopack", args], capture_output=True,
                              text=True, env=env, timeout=CALIBRATION_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"calibration took over {CALIBRATION_TIMEOUT_S}s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"calibration failed (exit {done.returncode}): {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def auto_sizes(configs_by_shape: dict[tuple, list], slots: Sequence, cache_dir: Path,
               measure_fn: Callable[..., dict] = measure) -> tuple[dict[tuple, int], list[str]]:
    """``({pack shape: size}, notes for the user)`` for ``--pack auto`` (``auto_plan``'s sizes)."""
    plan, notes = auto_plan(configs_by_shape, slots, cache_dir, measure_fn)
    return {shape: size for shape, (size, _) in plan.items()}, notes


def auto_plan(configs_by_shape: dict[tuple, list], slots: Sequence, cache_dir: Path,
              measure_fn: Callable[..., dict] = measure) -> tuple[dict[tuple, tuple[int, str]], list[str]]:
    """``({pack shape: (size, mode)}, notes for the user)`` for ``--pack auto``: ``configs_by_shape`` maps
    each pack shape (``training.config.shape_of``) to its runs' configs; ``slots`` are the sweep's slots;
    mode ``fused`` (``training.packed``) or ``streams`` (``training.streams``)."""
    gpu_slots = [s for s in slots if s.device == "cuda"]
    if not gpu_slots:
        return {shape: (1, "fused") for shape in configs_by_shape}, []
    jobs_per_gpu = max(sum(s.gpu == g for s in gpu_slots) for g in {s.gpu for s in gpu_slots})
    cache_path = Path(cache_dir) / CACHE
    cache = _read(cache_path)
    sizes: dict[tuple, tuple[int, str]] = {}
    notes: list[str] = []
    for shape, configs in configs_by_shape.items():
        cap = max(1, math.ceil(len(configs) / len(slots)))  # every slot gets work
        cal = calibration_shape(configs[0])
        key = "|".join(map(str, (f"gpu {gpu_slots[0].gpu}", f"torch {_torch_version()}", *cal)))
        wanted = [n for n in CANDIDATES if n <= cap]
        entry = cache.get(key)
        if entry is None or not set(wanted) <= set(entry.get("asked", ())):
            try:
                entry = {**measure_fn(cal, wanted, "cuda", gpu_slots[0].gpu), "asked": wanted}
            except RuntimeError as e:
                sizes[shape] = (min(FALLBACK, cap), "fused")
                notes.append(f"--pack auto: {cal[0]} x {cal[1]} classes: {e}; packs of {sizes[shape][0]}")
                continue
            cache[key] = entry
            _write(cache_path, cache)
        size, mode = sizes[shape] = choose_mode(entry, jobs_per_gpu, cap)
        rates = ", ".join(f"{m['members']}: {m['images_per_second']:.0f}" for m in entry["results"])
        if entry.get("streams"):
            rates += "; on streams: " + ", ".join(f"{m['members']}: {m['images_per_second']:.0f}"
                                                  for m in entry["streams"])
        on = " on streams" if mode == "streams" else ""
        notes.append(f"--pack auto: {cal[0]} x {cal[1]} classes, {cal[3]}: packs of {size}{on} "
                     f"(images/s by pack size on {entry.get('device', 'cuda')}: {rates})")
    return sizes, notes


def _torch_version() -> str:
    from importlib.metadata import version

    return version("torch")


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict) -> None:
    from training.atomic import atomic_write

    atomic_write(path, lambda f: f.write(json.dumps(data, indent=1).encode()))


def main(argv: Sequence[str]) -> int:
    """``python -P -m orchestrator.dispatch.autopack '<json>'``: calibrate, print one JSON line (see ``measure``)."""
    import torch

    from training.calibrate import calibrate, calibrate_streams

    args = json.loads(argv[0])
    device = torch.device(args["device"])
    out: dict = {"device": str(device), "free_bytes": None, "torch": torch.__version__}
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        out.update(device=torch.cuda.get_device_name(device), free_bytes=int(free))
    out["results"] = calibrate(args["arch"], args["num_classes"], args["batch_size"], args["sizes"], device=device,
                               precision=args["precision"], steps=args["steps"], warmup=args["warmup"])
    out["streams"] = calibrate_streams(args["arch"], args["num_classes"], args["batch_size"], args["sizes"],
                                       device=device, precision=args["precision"], steps=args["steps"],
                                       warmup=args["warmup"])
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
