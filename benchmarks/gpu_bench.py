"""The GPU check's measurements (``benchmarks/gpu_check.sh`` runs this): imports only torch and training/.

    python3 benchmarks/gpu_bench.py --device cuda --budget 240 --out OUT/gpu_check.jsonl

Appends one JSON line per measurement to ``--out`` as it goes (a timeout still leaves what was measured),
in this order:

1. ``env``: Python, torch, CUDA, cuDNN, the device.
2. ``check``: correctness on the device, on the offline digits data: a solo run trains and resumes to the
   same state (``bitwise`` says whether to the bit); a pack of 2 matches two solo runs within the packed
   trainer's tolerance (train loss within 1e-3 relative after an epoch, as tests/training/test_packed.py);
   a graphed run (``train.graph``) matches the eager one within float tolerance (1e-3 after an epoch);
   ``streams2-vs-solo``: two runs (graphed on CUDA) trained by ``training.streams`` (a CUDA stream and thread
   each, checkpoints on the background writer) equal their solo runs (to the bit on the CPU, 1e-4 on CUDA).
   ``fashion-modes`` (where the four Fashion-MNIST files are found: ``$ADAREG_DATA``, Debian's folder): the
   same short training on the real data eager fp32, graphed, bf16 and packed (2 members), each member's
   test error within seed noise of the eager run's (the bound: twice the gap between two eager seeds, at
   least 1 pp on CUDA; the CPU dry run's runs are too short to mean anything, at least 10 pp).
3. ``rate``: steady-state training images/s on synthetic CIFAR-sized data (uint8 32x32 images on the device,
   crop + flip as the trainer does) for each arch x precision x mode, modes ``solo-eager``,
   ``solo-graphed``, ``pack4/16/48-graphed`` (N models fused, ``training.packed``), ``streams8/16-graphed``
   (N graphed solo models replayed on N CUDA streams); each line holds the projected wall-clock of the
   Table 1 grid at that rate with its arithmetic. Rows that do not fit the time budget are written as
   ``skipped`` (so every mode is named), except the first block (resnet14 fp32, the baseline): measured in full.
4. ``cost``: per-epoch evaluation (10,000 test images, batch 1,000) and checkpoint write (solo payload).

``--device cpu`` is the dry run: the same lines with tiny sizes (batch 2, one timed step).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from training.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from training.config import RunConfig  # noqa: E402
from training.core import seeded_model  # noqa: E402
from training.data import Batches, Split  # noqa: E402
from training.fused import PackedBatches, PackedResNet  # noqa: E402
from training.graphed import StaticBatches, StaticStep, momentum_buffers, no_autocast_cache  # noqa: E402
from training.loop import autocast, evaluate, precision_mode, sync, train  # noqa: E402
from training.packed import train_packed  # noqa: E402
from training.regularizers import SparseSGD  # noqa: E402
from training.streams import train_streams  # noqa: E402

ARCHS = ("resnet14", "resnet32")
PRECISIONS = ("fp32", "tf32", "bf16")
MODES = ("solo-eager", "solo-graphed", "pack4-graphed", "pack16-graphed", "pack48-graphed", "streams8-graphed",
         "streams16-graphed")
GRID_RUNS, GRID_EPOCHS, TRAIN_IMAGES, TEST_IMAGES = 200, 450, 50_000, 10_000
GRID_TRAIN = GRID_RUNS * GRID_EPOCHS * TRAIN_IMAGES  # 4.5e9 training images
GRID_EVAL = GRID_RUNS * GRID_EPOCHS * TEST_IMAGES  # 9e8 evaluated images


class Lines:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, kind: str, **fields) -> dict:
        line = {"kind": kind, **fields}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
        print(json.dumps(line), flush=True)
        return line


def environment(device: torch.device) -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "device": str(device), "cuda_available": torch.cuda.is_available()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(name=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1))
    else:
        out.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return out


# --- correctness ------------------------------------------------------------------------------------

CHECK = dict(arch="resnet8", dataset="digits", train_subset=100, lr=[0.1, 0.02], epochs_per_step=(1,),
             weight_decay=[1e-4, 1e-3], grad_sparsity=[0.0, 0.5], validation=0.1)  # evaluates 130 held-out images


def _max_rel(a: dict, b: dict) -> float:
    worst = 0.0
    for k, v in a.items():
        if v.is_floating_point():
            d = (v.double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-12)
            worst = max(worst, d.item())
    return worst


class _StopAt:
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_start(self, *args) -> None:
        pass

    def on_epoch_end(self, epoch, metrics) -> None:
        if epoch == self.epoch:
            raise _Stopped()


class _Stopped(Exception):
    pass


def checks(emit: Lines, device: torch.device) -> None:
    config = RunConfig(seed=1, **CHECK)
    with tempfile.TemporaryDirectory() as tmp:
        for graph in (False, True):
            c = config.replace(graph=graph)
            t0 = time.perf_counter()
            whole = train(c, device=device)
            path = Path(tmp) / f"c{int(graph)}.pt"
            try:
                train(c, [_StopAt(1)], device=device, checkpoint_path=path)
            except _Stopped:
                pass
            resumed = train(c, device=device, checkpoint_path=path)
            a, b = resumed.model.state_dict(), whole.model.state_dict()
            bitwise = all(torch.equal(a[k], b[k]) for k in a)
            worst = _max_rel(a, b)
            emit("check", name="solo-resume" + ("-graphed" if graph else ""), passed=bitwise or worst <= 1e-6,
                 bitwise=bitwise, max_rel=worst, resumed_from=resumed.resumed_from,
                 seconds=round(time.perf_counter() - t0, 2))
            if not graph:
                eager = whole
        graphed = whole
        first = eager.history[0]["train_loss"]
        rel = abs(graphed.history[0]["train_loss"] - first) / first
        emit("check", name="graphed-vs-eager", passed=rel <= 1e-3, train_loss_rel=rel,
             eager=eager.history[0]["train_loss"], graphed=graphed.history[0]["train_loss"], tolerance=1e-3)
    configs = [config, config.replace(seed=2, weight_decay=[5e-4, 2e-3])]
    t0 = time.perf_counter()
    pack = train_packed(configs, device=device)
    second = train(configs[1], device=device)
    solo = [eager.history, second.history]
    rels = [abs(m.history[0]["train_loss"] - s[0]["train_loss"]) / s[0]["train_loss"]
            for m, s in zip(pack.members, solo)]
    emit("check", name="pack2-vs-solo", passed=max(rels) <= 1e-3, train_loss_rel=rels, tolerance=1e-3,
         seconds=round(time.perf_counter() - t0, 2))
    # two solo runs on CUDA streams and threads in one process (training.streams; graphed on CUDA), checkpoints
    # written on the background writer (its default on CUDA): each member is its solo run (to the bit on the CPU)
    t0 = time.perf_counter()
    cuda = device.type == "cuda"
    stream_configs = [c.replace(graph=cuda) for c in configs]
    alone = [graphed, train(stream_configs[1], device=device)] if cuda else [eager, second]
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"s{i}.pt" for i in range(2)]
        streams = train_streams(stream_configs, device=device, checkpoint_paths=paths, background_writes=True)
        on_disk = [load_checkpoint(p)["epoch"] for p in paths]
    states = [(m.model.state_dict(), s.model.state_dict()) for m, s in zip(streams.members, alone)]
    bitwise = all(torch.equal(a[k], b[k]) for a, b in states for k in a)
    worst = max(_max_rel(a, b) for a, b in states)
    complete = on_disk == [len(r.history) for r in alone]
    emit("check", name="streams2-vs-solo", passed=(bitwise or worst <= 1e-4) and complete,
         bitwise=bitwise, max_rel=worst, tolerance=1e-4, checkpoint_epochs=on_disk,
         seconds=round(time.perf_counter() - t0, 2))


FASHION_CUDA = dict(arch="resnet14", train_subset=0, batch_size=128, lr=[0.1, 0.01], epochs_per_step=(1,))
"""On CUDA: two epochs of all 60,000 images (938 steps), then the 10,000 test images."""
FASHION_DRY = dict(arch="resnet8", train_subset=500, batch_size=50, lr=[0.1], epochs_per_step=(1,), validation=0.02)
"""The CPU dry run: 10 steps, then 1,200 held-out training images (plumbing only; the error reported is theirs)."""


def fashion_check(emit: Lines, device: torch.device) -> None:
    """``fashion-modes``: eager fp32 (seeds 1 and 2: the seed noise), graphed, bf16 and a pack of 2 on the real
    Fashion-MNIST files; skipped (and said) where the files are not found."""
    from training import fashion
    from training.config import DataError

    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory(prefix="adareg-fashion-") as data_dir:
        base = RunConfig(seed=1, dataset="fashion-mnist", weight_decay=5e-4, grad_sparsity=0.0, data_dir=data_dir,
                         **(FASHION_CUDA if cuda else FASHION_DRY))
        try:
            fashion.prepare(data_dir)
        except DataError as e:
            emit("check", name="fashion-modes", passed=None, skipped=str(e))
            return
        t0 = time.perf_counter()
        runs = {"eager": base, "eager-seed2": base.replace(seed=2), "graphed": base.replace(graph=True),
                "bf16": base.replace(precision="bf16")}
        metric = "val_error" if base.validation else "test_error"
        errors = {name: train(config, device=device).history[-1][metric] for name, config in runs.items()}
        pack = train_packed([base, base.replace(seed=2)], device=device)
        errors["pack-seed1"], errors["pack-seed2"] = (m.history[-1][metric] for m in pack.members)
    noise = abs(errors["eager"] - errors["eager-seed2"])
    bound = max(2 * noise, 0.01 if cuda else 0.10)
    reference = {"graphed": "eager", "bf16": "eager", "pack-seed1": "eager", "pack-seed2": "eager-seed2"}
    gaps = {name: round(abs(errors[name] - errors[ref]), 4) for name, ref in reference.items()}
    emit("check", name="fashion-modes", passed=all(g <= bound for g in gaps.values()), metric=metric, error=errors,
         gap_to_eager=gaps, seed_noise=round(noise, 4), bound=round(bound, 4), arch=base.arch,
         epochs=len(base.lr[0]), batch_size=base.batch_size, seconds=round(time.perf_counter() - t0, 2))


# --- throughput ---------------------------------------------------------------------------------------

def _synthetic(n: int, device: torch.device, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return Split(images.to(device), torch.randint(0, 10, (n,), generator=g).to(device))


def _solo(arch: str, precision: str, batch: int, n: int, device: torch.device, graphed: bool, seed: int = 0):
    """A step function for one model trained as the trainer trains it (SparseSGD, crop + flip on the device)."""
    config = RunConfig(arch=arch, dataset="cifar10", seed=seed, precision=precision, batch_size=batch)
    model = seeded_model(config).to(device=device, memory_format=torch.channels_last).train()
    opt = SparseSGD(list(model.parameters()), momentum=0.9)
    opt.set_hyper(0.01, 1e-4)
    batches = Batches(_synthetic(n, device, seed), "cifar10", batch, augment=True)
    generator = torch.Generator().manual_seed(seed)
    if not graphed:
        def step_eager():
            for x, y in batches.epoch(generator):
                with autocast(precision, device):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                yield
        it = [step_eager()]

        def step():
            try:
                next(it[0])
            except StopIteration:
                it[0] = step_eager()
                next(it[0])
        return step, model

    def loss(x, y):
        with no_autocast_cache(precision, device):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        return loss, [loss.detach()]

    static = StaticStep(opt.params, 0.9, momentum_buffers(opt.optimizer, opt.params), loss,
                        [torch.zeros((), device=device)], StaticBatches(batches, n, batch, device), device,
                        state=list(model.buffers()))
    static.set_hyper(0.01, 1e-4)
    static.batches.load(batches.draw(generator))
    counter = [0]

    def step():  # a new epoch's draws after every full epoch (the device step counter is never read back)
        if counter[0] == static.batches.full_steps:
            static.batches.load(batches.draw(generator))
            counter[0] = 0
        static.step_once()
        counter[0] += 1
    return step, model


def _pack(arch: str, precision: str, members: int, batch: int, n: int, device: torch.device):
    blocks = (int(arch.removeprefix("resnet")) - 2) // 6
    model = PackedResNet(members, blocks, 10)
    g = torch.Generator().manual_seed(members)
    for p in model.parameters():
        p.data.normal_(0.0, 0.05, generator=g)
    model = model.to(device, memory_format=torch.channels_last).train()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, foreach=True)
    split = _synthetic(n, device, 0)
    packed = PackedBatches([Batches(Split(split.images, split.labels.clone()), "cifar10", batch, augment=True)
                            for _ in range(members)])

    def loss(x, y):
        with no_autocast_cache(precision, device):
            logits = model(x)
        per = F.cross_entropy(logits.float().reshape(-1, 10), y.reshape(-1), reduction="none")
        per = per.view(members, -1).mean(1)
        return per.sum(), [per.detach()]

    decay = [torch.full_like(p, 1e-4) for p in params]
    static = StaticStep(params, 0.9, momentum_buffers(opt, params), loss, [torch.zeros(members, device=device)],
                        StaticBatches(packed, n, batch, device), device, decay=decay, state=list(model.buffers()))
    static.set_hyper(0.01)
    gens = [torch.Generator().manual_seed(i) for i in range(members)]
    static.batches.load(packed.draw(gens))
    counter = [0]

    def step():
        if counter[0] == static.batches.full_steps:
            static.batches.load(packed.draw(gens))
            counter[0] = 0
        static.step_once()
        counter[0] += 1
    return step, model


def _streams(arch: str, precision: str, count: int, batch: int, n: int, device: torch.device):
    steps = [_solo(arch, precision, batch, n, device, graphed=True, seed=i)[0] for i in range(count)]
    streams = [torch.cuda.Stream(device) for _ in steps] if device.type == "cuda" else None

    def step():
        if streams is None:
            for s in steps:
                s()
            return
        current = torch.cuda.current_stream(device)
        for s, stream in zip(steps, streams):
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                s()
        for stream in streams:
            current.wait_stream(stream)
    return step


def _rate(step, images_per_step: int, device: torch.device, warmup: int, min_seconds: float,
          max_steps: int) -> tuple[float, int, float]:
    for _ in range(warmup):
        step()
    sync(device)
    steps, t0 = 0, time.perf_counter()
    while steps < max_steps:
        step()
        steps += 1
        if steps % 5 == 0 or device.type != "cuda":
            sync(device)
            if time.perf_counter() - t0 >= min_seconds:
                break
    sync(device)
    seconds = time.perf_counter() - t0
    return images_per_step * steps / seconds, steps, seconds


def projection(images_per_second: float, eval_images_per_second: float | None) -> tuple[float, str]:
    train_h = GRID_TRAIN / images_per_second / 3600
    text = f"{GRID_RUNS} runs x {GRID_EPOCHS} epochs x {TRAIN_IMAGES} images = {GRID_TRAIN:.2e} / " \
           f"{images_per_second:,.0f} img/s = {train_h:.2f} h"
    total = train_h
    if eval_images_per_second:
        eval_h = GRID_EVAL / eval_images_per_second / 3600
        total += eval_h
        text += f"; + evaluation {GRID_EVAL:.1e} test images / {eval_images_per_second:,.0f} img/s = {eval_h:.2f} h"
    return total, text + f"; = {total:.2f} h"


def matrix(emit: Lines, device: torch.device, deadline: float, dry: bool) -> None:
    batch = 2 if dry else 50
    n = 3 * batch if dry else 5000
    warmup, min_seconds, max_steps = (1, 0.0, 1) if dry else (3, 1.0, 400)
    eval_rate: dict[tuple[str, str], float] = {}
    baseline: dict[tuple[str, str], float] = {}
    for arch in ARCHS:
        for precision in PRECISIONS:
            with precision_mode(precision, device):
                eval_rate[arch, precision] = costs(emit, arch, precision, device, dry)
                first_block = (arch, precision) == (ARCHS[0], PRECISIONS[0])  # the baseline: measured in full
                for mode in MODES:
                    if time.monotonic() > deadline and not first_block:
                        emit("rate", arch=arch, precision=precision, mode=mode, skipped="time budget spent")
                        continue
                    t0 = time.perf_counter()
                    try:
                        if mode.startswith("solo"):
                            step, per = _solo(arch, precision, batch, n, device, mode == "solo-graphed")[0], batch
                        elif mode.startswith("pack"):
                            k = int(mode[4:].split("-")[0])
                            step, per = _pack(arch, precision, k, batch, n, device)[0], k * batch
                        else:
                            k = int(mode[7:].split("-")[0])
                            step, per = _streams(arch, precision, k, batch, n, device), k * batch
                        ips, steps, seconds = _rate(step, per, device, warmup, min_seconds, max_steps)
                    except torch.OutOfMemoryError:
                        emit("rate", arch=arch, precision=precision, mode=mode, skipped="out of memory")
                        continue
                    finally:
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    if mode == "solo-eager" and precision == "fp32":
                        baseline[arch] = ips
                    hours, text = projection(ips, eval_rate[arch, precision])
                    emit("rate", arch=arch, precision=precision, mode=mode, images_per_second=round(ips, 1),
                         steps=steps, seconds=round(seconds, 3),
                         setup_seconds=round(time.perf_counter() - t0 - seconds, 2),
                         vs_solo_eager_fp32=round(ips / baseline[arch], 3) if arch in baseline else None,
                         grid_hours=round(hours, 2), arithmetic=text, batch=batch)


def costs(emit: Lines, arch: str, precision: str, device: torch.device, dry: bool) -> float:
    """Per-epoch evaluation (images/s at batch 1,000) and checkpoint write of one run; returns the eval rate."""
    config = RunConfig(arch=arch, dataset="cifar10", precision=precision)
    model = seeded_model(config).to(device=device, memory_format=torch.channels_last)
    n = 20 if dry else TEST_IMAGES
    test = Batches(_synthetic(n, device, 1), "cifar10", 1000, augment=False)
    evaluate(model, test, 1000, precision)
    sync(device)
    t0 = time.perf_counter()
    evaluate(model, test, 1000, precision)
    sync(device)
    eval_seconds = time.perf_counter() - t0
    opt = SparseSGD(list(model.parameters()), momentum=0.9)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.pt"
        t0 = time.perf_counter()
        save_checkpoint(path, {"version": 1, "model": model.state_dict(), "optimizer": opt.state_dict(), "masks": [],
                               "history": [{"epoch": float(e), "train_loss": 1.0} for e in range(450)]})
        ckpt_seconds = time.perf_counter() - t0
        size = path.stat().st_size
        load_checkpoint(path)
    rate = n / eval_seconds
    emit("cost", arch=arch, precision=precision, eval_images=n, eval_seconds=round(eval_seconds, 4),
         eval_images_per_second=round(rate, 1), grid_eval_hours=round(GRID_EVAL / rate / 3600, 2),
         checkpoint_seconds=round(ckpt_seconds, 4), checkpoint_bytes=size,
         grid_checkpoint_hours=round(GRID_RUNS * GRID_EPOCHS * ckpt_seconds / 3600, 2))
    return rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds for everything (the matrix stops there)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget
    device = torch.device(args.device)
    emit = Lines(args.out)
    emit("env", **environment(device))
    if device.type == "cuda" and not torch.cuda.is_available():
        emit("error", message="torch sees no CUDA device")
        return 1
    if device.type == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    checks(emit, device)
    fashion_check(emit, device)
    matrix(emit, device, deadline, dry=device.type == "cpu")
    emit("done", seconds_left=round(deadline - time.monotonic(), 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
