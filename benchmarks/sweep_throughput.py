"""Aggregate training throughput of a sweep: one run at a time vs K processes vs packs of N runs.

Every mode trains the same fixed batch of runs (digits, ``--subset`` training images, ``--epochs``
epochs, evaluation on the 500 test images every epoch, as a sweep does) and is timed by the wall
clock from the first run's start to the last run's end:

- (a) one run at a time: ``training.train`` for each run, one after another, in this process;
- (b) K processes: K spawned workers (each with max(1, threads // K) torch threads on the CPU) share
  the runs; the clock starts once every worker has imported torch and loaded the data;
- (c) packs of N: ``training.packed.train_packed`` on consecutive groups of N runs;
- (d) on the CPU: K processes, each training whole packs of N (the first K of ``--processes``).

With ``--repeats R`` the modes run R times, interleaved, and each keeps its best (shortest) pass.
The aggregate is training images (runs x epochs x subset) per wall second, evaluation included; each
mode's ratio to (a) and to the best (b) is measured in the same invocation. The projection is the
wall-clock of the paper's Table 1 grid (200 runs x 450 epochs x 50,000 images = 4.5e9 training images,
half per architecture) at that mode's rate on this device; the digits subset evaluates relatively more
images per training image than CIFAR does, so the projection errs on the slow side.

``--operators`` also times the bare forward+backward of N models three ways: one after another, fused
with grouped convolutions (what ``train_packed`` uses), and ``torch.func`` (``stack_module_state`` +
``functional_call`` + ``vmap``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training import RunConfig, train  # noqa: E402
from training.data import load_splits  # noqa: E402
from training.packed import train_packed  # noqa: E402

TABLE1_TRAIN_IMAGES = 200 * 450 * 50_000
SCHEMES = [(1e-4, 0.0), (1e-3, 0.0), (8e-3, 0.0), (1e-4, 0.5), (1e-3, 0.3)]  # (weight decay, sparsity)


def has_precision() -> bool:
    return any(f.name == "precision" for f in dataclasses.fields(RunConfig))


def run_configs(args: argparse.Namespace, arch: str, precision: str) -> list[RunConfig]:
    """The fixed batch of runs: seeds 0.., weight decay and sparsity cycling through SCHEMES."""
    extra = {"precision": precision} if has_precision() else {}
    configs = []
    for i in range(args.runs):
        wd, sparsity = SCHEMES[i % len(SCHEMES)]
        configs.append(RunConfig(arch=arch, dataset="digits", seed=i, lr=[0.05], epochs_per_step=(args.epochs,),
                                 weight_decay=wd, grad_sparsity=sparsity, train_subset=args.subset, **extra))
    return configs


def images(configs: list[RunConfig]) -> int:
    return sum(c.epochs_per_step[0] * c.train_subset for c in configs)


# --- the three modes ------------------------------------------------------------------------------

def one_at_a_time(configs: list[RunConfig], device: str, threads: int) -> float:
    t0 = time.perf_counter()
    for config in configs:
        train(config, device=device, threads=threads)
    return time.perf_counter() - t0


def _worker(configs: list[dict], device: str, threads: int, pack: int, ready, go, done) -> None:
    torch.set_num_threads(threads)
    runs = [RunConfig.from_dict(c) for c in configs]
    if runs:
        load_splits(runs[0], "cpu")  # the dataset cache, as a long-lived worker would have it
        if device == "cuda":
            torch.zeros(1, device=device)  # the CUDA context
    ready.put(os.getpid())
    go.wait()
    if pack > 1:
        packs(runs, device, threads, pack)
    else:
        for config in runs:
            train(config, device=device, threads=threads)
    done.put(os.getpid())


def processes(configs: list[RunConfig], device: str, threads: int, k: int, pack: int = 1) -> float:
    ctx = mp.get_context("spawn")
    ready, done, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    if pack > 1:  # whole packs to each process
        groups = [configs[i:i + pack] for i in range(0, len(configs), pack)]
        shares = [[c.to_dict() for g in groups[i::k] for c in g] for i in range(k)]
    else:
        shares = [[c.to_dict() for c in configs[i::k]] for i in range(k)]
    per_process = max(1, threads // k) if device == "cpu" else threads
    procs = [ctx.Process(target=_worker, args=(share, device, per_process, pack, ready, go, done))
             for share in shares]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=600)
    t0 = time.perf_counter()
    go.set()
    for _ in procs:
        done.get(timeout=3600)
    elapsed = time.perf_counter() - t0
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"a worker exited with {p.exitcode}")
    return elapsed


def packs(configs: list[RunConfig], device: str, threads: int, n: int) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(configs), n):
        result = train_packed(configs[start:start + n], device=device, threads=threads)
        if result.diverged:
            raise RuntimeError(f"diverged: {result.diverged}")
    return time.perf_counter() - t0


def warm_up(args: argparse.Namespace, arch: str, precision: str) -> None:
    """Allocator, oneDNN / cuDNN and the dataset cache, before anything is timed."""
    configs = [c.replace(train_subset=50, epochs_per_step=(1,)) for c in run_configs(args, arch, precision)[:2]]
    one_at_a_time(configs[:1], args.device, args.threads)
    packs(configs, args.device, args.threads, 2)


# --- bare operators: sequential vs grouped vs torch.func ------------------------------------------

def operators(arch: str, n: int, device: str, repeats: int = 5, batch: int = 50) -> dict[str, float]:
    import copy

    import torch.nn.functional as F
    from torch.func import functional_call, grad_and_value, stack_module_state, vmap

    from training.fused import PackedResNet, stack_states
    from training.models import build_model

    dev = torch.device(device)
    solos = []
    for s in range(n):
        torch.manual_seed(s)
        solos.append(build_model(arch, 10).to(dev, memory_format=torch.channels_last))
    xs, ys = torch.randn(n, batch, 3, 32, 32, device=dev), torch.randint(0, 10, (n, batch), device=dev)
    fused = PackedResNet(n, (int(arch.removeprefix("resnet")) - 2) // 6, 10)
    fused.load_state_dict(stack_states([m.state_dict() for m in solos], fused))
    fused = fused.to(dev, memory_format=torch.channels_last)
    xf = xs.transpose(0, 1).reshape(batch, n * 3, 32, 32).contiguous(memory_format=torch.channels_last)
    xcl = [xs[i].contiguous(memory_format=torch.channels_last) for i in range(n)]
    params, buffers = stack_module_state(solos)
    base = copy.deepcopy(solos[0]).to("meta")
    step_vmap = vmap(grad_and_value(lambda p, b, x, y: F.cross_entropy(functional_call(base, (p, b), (x,)), y)))

    def sequential():
        for i, m in enumerate(solos):
            m.zero_grad()
            F.cross_entropy(m(xcl[i]), ys[i]).backward()

    def grouped():
        fused.zero_grad()
        logits = fused(xf)
        F.cross_entropy(logits.reshape(-1, 10), ys.reshape(-1), reduction="none").view(n, -1).mean(1).sum().backward()

    def func_vmap():
        step_vmap(params, buffers, xs, ys)

    measures = {"sequential": sequential, "grouped (train_packed)": grouped, "torch.func vmap": func_vmap}
    best = {name: 0.0 for name in measures}
    for f in measures.values():
        f()
    for _ in range(repeats):  # interleaved, best of repeats
        for name, f in measures.items():
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            f()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            best[name] = max(best[name], n * batch / (time.perf_counter() - t0))
    return best


# --- the benchmark --------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for arch in args.arch:
        for precision in args.precision:
            if precision != "fp32" and not has_precision():
                print(f"skip {arch} {precision}: RunConfig has no 'precision' field yet", file=sys.stderr)
                continue
            warm_up(args, arch, precision)
            configs = run_configs(args, arch, precision)
            n_images = images(configs)
            modes = [("(a) one run at a time", one_at_a_time, ())]
            modes += [(f"(b) {k} processes", processes, (k,)) for k in args.processes]
            modes += [(f"(c) packs of {n}", packs, (n,)) for n in args.packs]
            if args.device == "cpu" and args.processes:  # the CPU's best layout may be both
                k = args.processes[0]
                modes += [(f"(d) {k} processes x packs of {n}", processes, (k, n)) for n in args.packs
                          if n * k <= len(configs)]
            best: dict[str, float] = {}
            for repeat in range(args.repeats):  # interleaved, so that other load hits every mode alike
                for name, measure, extra in modes:
                    seconds = measure(configs, args.device, args.threads, *extra)
                    best[name] = min(best.get(name, seconds), seconds)
                    print(f"{arch} {precision} {name} (repeat {repeat + 1}): {n_images / seconds:.0f} img/s "
                          f"({seconds:.1f} s, load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
            for name, _, _ in modes:
                rows.append({"arch": arch, "precision": precision, "mode": name, "runs": len(configs),
                             "images": n_images, "seconds": best[name], "images_per_second": n_images / best[name]})
    return rows


def report(rows: list[dict], args: argparse.Namespace) -> str:
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({args.threads} threads)"
    archs = sorted({r["arch"] for r in rows})
    lines = [f"{device}, torch {torch.__version__}; {args.runs} runs x {args.epochs} epochs x {args.subset} digits "
             f"images (+500 evaluated per epoch), batch 50",
             "| arch | precision | mode | img/s | vs (a) | vs best (b) | Table 1 grid, hours |",
             "|---|---|---|---:|---:|---:|---:|"]
    for arch in archs:
        for precision in args.precision:
            group = [r for r in rows if r["arch"] == arch and r["precision"] == precision]
            if not group:
                continue
            a = group[0]["images_per_second"]
            b = max((r["images_per_second"] for r in group if r["mode"].startswith("(b)")), default=None)
            for r in group:
                rate = r["images_per_second"]
                # half the grid per architecture; with one architecture measured, it stands for both
                share = TABLE1_TRAIN_IMAGES / 2 if len(archs) > 1 else TABLE1_TRAIN_IMAGES
                hours = share / rate / 3600
                vs_b = f"{rate / b:.2f}" if b else "-"
                lines.append(f"| {arch} | {precision} | {r['mode']} | {rate:.0f} | {rate / a:.2f} | {vs_b} | "
                             f"{hours:,.0f}{'' if len(archs) > 1 else '*'} |")
    if len(archs) == 1:
        lines.append(f"* the whole grid at {archs[0]}'s rate (only {archs[0]} measured)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the CPU defaults (also the default on the CPU): "
                   "resnet14, fp32, 10 runs x 1 epoch x 300 images, 2 processes, packs of 5 and 10")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--arch", help="comma-separated (cpu: resnet14; cuda: resnet14,resnet32)")
    p.add_argument("--precision", help="comma-separated fp32,bf16 (cpu: fp32; cuda: fp32,bf16)")
    p.add_argument("--runs", type=int, help="runs in the fixed batch (cpu: 10; cuda: 50)")
    p.add_argument("--epochs", type=int, help="epochs per run (cpu: 1; cuda: 2)")
    p.add_argument("--subset", type=int, help="digits training images per run, at most 1297 (cpu: 300; cuda: 1297)")
    p.add_argument("--processes", help="K values for (b), comma-separated (cpu: 2; cuda: 2,4,8)")
    p.add_argument("--packs", help="N values for (c), comma-separated (cpu: 5,10; cuda: 5,10,25,50)")
    p.add_argument("--repeats", type=int, default=1, help="timed passes per mode, interleaved; the best counts")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads for (a) and (c)")
    p.add_argument("--operators", action="store_true",
                   help="also time the bare step: sequential vs grouped vs torch.func vmap")
    p.add_argument("--out", type=Path, help="write the rows as JSON")
    args = p.parse_args(argv)
    gpu = args.device == "cuda" and not args.quick
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    defaults = {"arch": "resnet14,resnet32" if gpu else "resnet14", "precision": "fp32,bf16" if gpu else "fp32",
                "runs": 50 if gpu else 10, "epochs": 2 if gpu else 1, "subset": 1297 if gpu else 300,
                "processes": "2,4,8" if gpu else "2", "packs": "5,10,25,50" if gpu else "5,10"}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.arch = args.arch.split(",")
    args.precision = args.precision.split(",")
    try:
        args.processes = [int(k) for k in args.processes.split(",") if k]
        args.packs = [int(n) for n in args.packs.split(",") if n]
    except ValueError:
        p.error("--processes / --packs: expected comma-separated integers such as 2,4")
    if not 50 <= args.subset <= 1297 or min(args.runs, args.epochs, args.threads, args.repeats) < 1:
        p.error("--subset must be in 50..1297, --runs, --epochs, --threads and --repeats >= 1")
    if any(k < 1 for k in args.processes + args.packs):
        p.error("--processes / --packs: values must be >= 1")
    if any(p_ not in ("fp32", "tf32", "bf16") for p_ in args.precision):
        p.error(f"--precision {','.join(args.precision)}: expected fp32, tf32 or bf16")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.operators:
        for arch in args.arch:
            for n in args.packs:
                best = operators(arch, n, args.device)
                seq = best["sequential"]
                print(f"bare step, {arch}, N={n}, best img/s: " +
                      ", ".join(f"{k} {v:.0f} ({v / seq:.2f}x)" for k, v in best.items()))
    rows = run(args)
    print(report(rows, args))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
