"""Tiny CIFAR-10/100 archives in torchvision's own format, written by tests (no download)."""

import pickle
import tarfile

import numpy as np
import torch

CIFAR_LAYOUT = {  # folder, archive, train files, test files, label key
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz",
                [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", ["train"], ["test"]),
}


def write_cifar(root, name, per_file=4, archive=False, seed=0):
    """A tiny CIFAR in torchvision's format (Python-2-style pickles: str keys). Returns the
    expected ((train images, labels), (test images, labels)) as [N,3,32,32] uint8 / int64."""
    folder, tar_name, train_files, test_files = CIFAR_LAYOUT[name]
    rng = np.random.default_rng(seed)
    classes = 10 if name == "cifar10" else 100
    build = root / ".build" if archive else root
    (build / folder).mkdir(parents=True)
    expected = []
    for files in (train_files, test_files):
        xs, ys = [], []
        for f in files:
            x = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
            y = rng.integers(0, classes, per_file).tolist()
            entry = {"data": x, "labels": y} if name == "cifar10" else {
                "data": x, "fine_labels": y, "coarse_labels": [v // 5 for v in y]}
            (build / folder / f).write_bytes(pickle.dumps(entry, protocol=2))
            xs.append(x)
            ys += y
        expected.append((torch.from_numpy(np.concatenate(xs)).view(-1, 3, 32, 32), torch.tensor(ys)))
    meta_name, key = ("batches.meta", "label_names") if name == "cifar10" else ("meta", "fine_label_names")
    names = {key: [f"c{i}" for i in range(classes)]}
    (build / folder / meta_name).write_bytes(pickle.dumps(names, protocol=2))
    if archive:
        with tarfile.open(root / tar_name, "w:gz") as tar:
            tar.add(build / folder, arcname=folder)
        for p in sorted((build / folder).iterdir()):
            p.unlink()
        (build / folder).rmdir()
        build.rmdir()
    return expected


UNOFFICIAL = {"allow_unofficial_data": True}
"""RunConfig fields that let a run load these archives (their md5 is not the official one)."""


class _CreatesFile:
    """Unpickling an instance of this creates ``path``: a stand-in for code a tampered pickle would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def evil_pickle(marker):
    """Pickle bytes whose unpickling creates the file ``marker``."""
    return pickle.dumps(_CreatesFile(marker), protocol=2)
