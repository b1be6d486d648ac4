"""Training throughput of one model three ways: the bare model, the textbook pipeline, the adareg trainer.

    .venv/bin/python benchmarks/trainer_throughput.py [--arch resnet14] [--threads 2] [--images 5000]
        [--repeats 5] [--device cpu|cuda] [--workers 0,2] [--out results.json]

All three train the same model (``training.models.build_model``, channels_last, SGD momentum 0.9,
weight decay 1e-4, lr 0.01, batch 50) on the same synthetic CIFAR-10 (N random 32x32x3 uint8
images, 10 classes), written to a temp dir in torchvision's format:

(a) bare      pre-made normalised channels_last float batches already on the device: forward,
              backward, SGD step, no data movement. The ceiling.
(b) textbook  torchvision.datasets.CIFAR10 with Compose([RandomCrop(32, padding=4),
              RandomHorizontalFlip(), ToTensor(), Normalize(...)]) through a DataLoader (shuffle;
              num_workers 0 and 2, workers persistent so that their start-up is not timed), the
              model in PyTorch's default NCHW memory format, as the tutorials write it.
(b')          the same pipeline feeding a channels_last model: the data path alone.
(c) trainer   ``training.train`` itself on that CIFAR-10 folder: its own ``images_per_second``
              metric (training time of the epoch, evaluation excluded).

One sample is one pass over the N images. After a warm-up pass of each, samples are taken
interleaved (c, a, b, c, a, b, ...) so that a machine shared with other jobs slows all of them
alike. The table shows the median and the best sample of each (on a busy machine the best is the
closer estimate of the unloaded speed) and the ratios c/a, c/b and c/b' of both, b and b' being
the faster variant of each. With ``--device cuda``, (a) is also timed as eager fp32 NCHW, eager fp32
channels_last, channels_last + bf16 autocast, and torch.compile of the latter.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402

from training import Callback, RunConfig, train  # noqa: E402
from training.data import STATS  # noqa: E402
from training.models import build_model  # noqa: E402

LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 1e-4
NUM_CLASSES = 10
TEST_IMAGES = 500  # the trainer evaluates every epoch (untimed); keep that short
MEAN, STD = STATS["cifar10"]
CIFAR_FOLDER = "cifar-10-batches-py"

Batch = tuple[torch.Tensor, torch.Tensor]
Step = Callable[[torch.Tensor, torch.Tensor], None]


# --- data -----------------------------------------------------------------------------------------

def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random uint8 images [n, 3, 32, 32] and int64 labels in 0..9."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, NUM_CLASSES, n)


def write_cifar10(root: Path, train_set: tuple[np.ndarray, np.ndarray],
                  test_set: tuple[np.ndarray, np.ndarray]) -> None:
    """The arrays as torchvision's ``cifar-10-batches-py``: five training files and a test file, in order."""
    folder = root / CIFAR_FOLDER
    folder.mkdir(parents=True)

    def dump(name: str, x: np.ndarray, y: np.ndarray) -> None:
        entry = {"data": x.reshape(len(x), -1), "labels": y.tolist()}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))

    x, y = train_set
    for i, idx in enumerate(np.array_split(np.arange(len(y)), 5), start=1):
        dump(f"data_batch_{i}", x[idx], y[idx])
    dump("test_batch", *test_set)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(NUM_CLASSES)]},
                                                       protocol=2))


class SyntheticCIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR10, unchanged but for the md5 checks of the real files."""

    meta = {**datasets.CIFAR10.meta, "md5": None}

    def _check_integrity(self) -> bool:
        return True


TEXTBOOK_TRANSFORM = transforms.Compose([
    transforms.RandomCrop(32, padding=4),
    transforms.RandomHorizontalFlip(),
    transforms.ToTensor(),
    transforms.Normalize(MEAN, STD),
])


def premade_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, device: torch.device,
                    channels_last: bool) -> list[Batch]:
    """Normalised float batches on ``device``, made once (the bare model's input)."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = []
    for start in range(0, len(labels), batch_size):
        x = (torch.from_numpy(images[start:start + batch_size]).float() / 255 - mean) / std
        y = torch.from_numpy(labels[start:start + batch_size]).long()
        out.append((x.to(device).contiguous(memory_format=fmt), y.to(device)))
    return out


# --- model and timing -----------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sgd_step(arch: str, device: torch.device, channels_last: bool = True, bf16: bool = False,
             compile_model: bool = False) -> Step:
    """A fresh model and optimizer; returns one SGD step on a batch (forward, backward, update)."""
    torch.manual_seed(0)
    model = build_model(arch, NUM_CLASSES).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, foreach=True)
    forward = torch.compile(model) if compile_model else model
    model.train()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(forward(x), y)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()

    return step


def timed_pass(batches: Callable[[], Iterable[Batch]], step: Step, n_images: int, device: torch.device) -> float:
    """Images per second of one pass: ``step`` on every batch, data loading included."""
    sync(device)
    t0 = time.perf_counter()
    for x, y in batches():
        step(x, y)
    sync(device)
    return n_images / (time.perf_counter() - t0)


def bare_measure(arch: str, batches: list[Batch], device: torch.device, **variant) -> Callable[[], float]:
    step = sgd_step(arch, device, **variant)
    n = sum(len(y) for _, y in batches)
    return lambda: timed_pass(lambda: batches, step, n, device)


def textbook_measure(arch: str, data_dir: Path, batch_size: int, workers: int,
                     device: torch.device, channels_last: bool) -> Callable[[], float]:
    dataset = SyntheticCIFAR10(str(data_dir), train=True, transform=TEXTBOOK_TRANSFORM, download=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0, pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(0))
    step = sgd_step(arch, device, channels_last=channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def batches() -> Iterable[Batch]:
        for x, y in loader:
            yield x.to(device, non_blocking=True, memory_format=fmt), y.to(device, non_blocking=True)

    return lambda: timed_pass(batches, step, len(dataset), device)


class Interleave(Callback):
    """After every trainer epoch but the first (its warm-up): record the trainer's own images per
    second, then take one sample of every other measure."""

    def __init__(self, measures: dict[str, Callable[[], float]], samples: dict[str, list[float]]):
        self.measures, self.samples = measures, samples

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if epoch == 1:
            return
        self.samples["trainer"].append(metrics["images_per_second"])
        for name, measure in self.measures.items():
            self.samples[name].append(measure())
        latest = "  ".join(f"{name} {v[-1]:.0f}" for name, v in self.samples.items())
        print(f"repeat {epoch - 1}: {latest} img/s (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)


# --- the benchmark --------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    train_set = synthetic(args.images, seed=0)
    test_set = synthetic(TEST_IMAGES, seed=1)
    result: dict = {
        "arch": args.arch, "device": args.device, "threads": args.threads, "batch_size": args.batch_size,
        "images": args.images, "repeats": args.repeats, "workers": args.workers,
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "loadavg_start": list(os.getloadavg()),
    }
    with tempfile.TemporaryDirectory(prefix="adareg-bench-") as tmp:
        data_dir = Path(tmp)
        write_cifar10(data_dir, train_set, test_set)
        measures = {"bare": bare_measure(args.arch, premade_batches(*train_set, args.batch_size, device, True),
                                         device)}
        for w in args.workers:  # as the tutorials write it (NCHW), and with the trainer's channels_last
            measures[f"textbook_w{w}"] = textbook_measure(args.arch, data_dir, args.batch_size, w, device, False)
            measures[f"textbook_cl_w{w}"] = textbook_measure(args.arch, data_dir, args.batch_size, w, device, True)
        for measure in measures.values():  # warm-up pass (worker start-up included), not recorded
            measure()
        samples: dict[str, list[float]] = {"trainer": [], **{name: [] for name in measures}}
        config = RunConfig(arch=args.arch, dataset="cifar10", data_dir=str(data_dir), lr=[LR],
                           epochs_per_step=(args.repeats + 1,), weight_decay=WEIGHT_DECAY, grad_sparsity=0.0,
                           momentum=MOMENTUM, batch_size=args.batch_size, augment=True,
                           allow_unofficial_data=True)  # synthetic files, not the official CIFAR-10
        train(config, [Interleave(measures, samples)], device=device, threads=args.threads)
        del measures  # stops the DataLoader workers

    result["samples"] = samples
    result.update(summary(samples))
    result["ratios"] = {stat: ratios(result[stat]) for stat in STATS}
    if device.type == "cuda":
        result["gpu_variants"] = gpu_variants(args, train_set, device)
    result["loadavg_end"] = list(os.getloadavg())
    return result


def gpu_variants(args: argparse.Namespace, train_set: tuple[np.ndarray, np.ndarray],
                 device: torch.device) -> dict:
    """(a) as eager fp32 NCHW / channels_last, channels_last + bf16 autocast, and torch.compile of it."""
    nchw = premade_batches(*train_set, args.batch_size, device, channels_last=False)
    cl = premade_batches(*train_set, args.batch_size, device, channels_last=True)
    measures = {
        "eager_fp32_nchw": bare_measure(args.arch, nchw, device, channels_last=False),
        "eager_fp32_channels_last": bare_measure(args.arch, cl, device),
        "eager_bf16_channels_last": bare_measure(args.arch, cl, device, bf16=True),
        "compiled_bf16_channels_last": bare_measure(args.arch, cl, device, bf16=True, compile_model=True),
    }
    for measure in measures.values():  # warm-up (and compilation), not recorded
        measure()
    samples: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(args.repeats):
        for name, measure in measures.items():
            samples[name].append(measure())
    return {"samples": samples, **summary(samples)}


STATS = {"median": statistics.median, "best": max}


def summary(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Median and best (highest) images per second of every measure."""
    return {stat: {name: f(v) for name, v in samples.items()} for stat, f in STATS.items()}


def ratios(values: dict[str, float]) -> dict:
    """c/a; c/b with b the faster textbook pipeline as tutorials write it (NCHW model); c/b_cl with
    b_cl the faster textbook pipeline given the trainer's channels_last model (the data path alone)."""
    fastest = lambda prefix: max((n for n in values if n.startswith(prefix)), key=values.__getitem__)  # noqa: E731
    b, b_cl = fastest("textbook_w"), fastest("textbook_cl_w")
    return {"c/a": values["trainer"] / values["bare"], "c/b": values["trainer"] / values[b], "b": b,
            "c/b_cl": values["trainer"] / values[b_cl], "b_cl": b_cl}


LABELS = {"bare": "(a) bare model, pre-made tensors", "trainer": "(c) adareg trainer (training.train)"}


def label(name: str) -> str:
    if name.startswith("textbook_cl_w"):
        return f"(b') textbook + channels_last, {name.removeprefix('textbook_cl_w')} workers"
    if name.startswith("textbook_w"):
        return f"(b) textbook PIL + DataLoader, {name.removeprefix('textbook_w')} workers"
    return LABELS.get(name, name)


def report(result: dict) -> str:
    lines = [f"{result['arch']}, batch {result['batch_size']}, {result['threads']} threads, "
             f"{result['device_name']}, {result['images']} images x {result['repeats']} repeats "
             f"(torch {result['torch']})",
             f"{'img/s':44} {'median':>8} {'best':>8} {'worst':>8}"]
    order = ["bare", *sorted(k for k in result["median"] if k.startswith("textbook")), "trainer"]
    for name in order:
        lines.append(f"{label(name):44} {result['median'][name]:8.0f} {result['best'][name]:8.0f} "
                     f"{min(result['samples'][name]):8.0f}")
    for stat, r in result["ratios"].items():
        verdict = ""
        if result["device"] == "cpu":  # the acceptance criterion
            verdict = "  PASS" if r["c/a"] >= 0.90 and r["c/b"] >= 1.3 else "  FAIL (needs c/a >= 0.90, c/b >= 1.30)"
        lines.append(f"{stat + ':':7} c/a = {r['c/a']:.2f}  c/b = {r['c/b']:.2f} (b = {r['b']}){verdict}"
                     f"  [c/b' = {r['c/b_cl']:.2f} against {r['b_cl']}]")
    if "gpu_variants" in result:
        gpu = result["gpu_variants"]
        lines.append(f"{'bare model on the GPU, img/s':44} {'median':>8} {'best':>8}")
        for name in gpu["median"]:
            lines.append(f"  {name:42} {gpu['median'][name]:8.0f} {gpu['best'][name]:8.0f}")
    start, end = result["loadavg_start"], result["loadavg_end"]
    lines.append(f"load average: {start[0]:.2f} at start, {end[0]:.2f} at end")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet14")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (fixed for all measures)")
    p.add_argument("--images", type=int, default=5000, help="synthetic training images (one pass = one sample)")
    p.add_argument("--repeats", type=int, default=5, help="timed samples per measure")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--workers", default="0,2", help="DataLoader num_workers values for (b), comma-separated")
    p.add_argument("--out", type=Path, default=None, help="write the samples, medians, bests and ratios as JSON")
    args = p.parse_args(argv)
    try:
        args.workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        p.error(f"--workers {args.workers!r}: expected comma-separated integers such as 0,2")
    if min(args.workers) < 0 or args.images < args.batch_size or args.repeats < 1 or args.threads < 1:
        p.error("--workers must be >= 0, --images >= --batch-size, --repeats and --threads >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(report(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
