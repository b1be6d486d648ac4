"""Fashion-MNIST (Xiao et al. 2017, the fixed release) from its four IDX files, read by torchvision's own
``FashionMNIST`` reader.

Where the files are looked for, in order: the run's ``data_dir``, ``$ADAREG_DATA``, and Debian's package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``). In each folder a file may be plain or
gzipped, directly in it or in torchvision's layout (``FashionMNIST/raw/``). Every file is checked by the md5 of
its *decompressed* bytes (Debian recompresses the ``.gz`` files, so their own md5s are not upstream's), then put
in torchvision's layout under ``data_dir`` (atomically) unless it already is there. Where no folder has them,
torchvision downloads them (``ADAREG_NO_DOWNLOAD=1`` turns that off). Every failure is one ``DataError`` line
naming the file or the folders looked in, and how to get the data.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import shutil
import socket
import tempfile

import torch
from torchvision import datasets

from training.cifar import DOWNLOAD_TIMEOUT_S, NO_DOWNLOAD_ENV, Arrays, _move_into_place, _one_line
from training.config import DataError

DATA_ENV = "ADAREG_DATA"
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
LAYOUT = os.path.join("FashionMNIST", "raw")  # torchvision's folder under its root
HOW_TO_GET = (f"install Debian's package (apt-get install dataset-fashion-mnist), put the four files in a folder "
              f"named by ${DATA_ENV} or the run's data_dir, or let torchvision download them (unset {NO_DOWNLOAD_ENV})")

FILES = {  # md5 of each decompressed file of the fixed release (the same bytes as upstream's)
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}

MEAN, STD = 0.2860, 0.3530
"""Pixel mean and std (0..1 scale) of the 60,000 training images."""


def search_dirs(data_dir: str) -> list[str]:
    """The folders looked in, in order, without repeats."""
    out = []
    for d in (data_dir, os.environ.get(DATA_ENV) or None, DEBIAN_DIR):
        if d and os.path.abspath(d) not in map(os.path.abspath, out):
            out.append(d)
    return out


def _find(folder: str, name: str) -> str | None:
    for sub in (LAYOUT, "", "fashion-mnist"):
        for suffix in ("", ".gz"):
            path = os.path.join(folder, sub, name + suffix)
            if os.path.isfile(path):
                return path
    return None


def _read_checked(path: str, name: str, allow_unofficial: bool) -> bytes:
    """The decompressed bytes of ``path``; DataError unless they are the release's ``name``."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"fashion-mnist: cannot read {path} ({_one_line(e)}); {HOW_TO_GET}") from None
    got = hashlib.md5(data, usedforsecurity=False).hexdigest()
    if got != FILES[name] and not allow_unofficial:
        raise DataError(f"fashion-mnist: {path} is not the release's {name} (md5 of its content {got}, expected "
                        f"{FILES[name]}); replace it ({HOW_TO_GET}), or set train.allow_unofficial_data: true")
    return data


def _put_in_layout(data_dir: str, contents: dict[str, bytes]) -> None:
    """Write ``contents`` as ``data_dir/FashionMNIST/raw``: into a temp folder, then renamed into place whole, so
    that a reader never sees part of it (parallel runs of a fresh sweep all do this; the first folder in place
    wins)."""
    target = os.path.join(data_dir, LAYOUT)
    tmp = None
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".fashion-", dir=os.path.dirname(target))
        for name, data in contents.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        _move_into_place(tmp, target)
    except OSError as e:
        raise DataError(f"fashion-mnist: cannot write {target} ({_one_line(e)})") from None
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def prepare(data_dir: str, allow_unofficial: bool = False) -> str:
    """A root under which torchvision's ``FashionMNIST`` finds the four checked files (``data_dir``, or a
    folder already in its layout); looks, checks, copies or downloads as the module docstring says."""
    looked = search_dirs(data_dir)
    for folder in looked:
        found = {name: _find(folder, name) for name in FILES}
        if not any(found.values()):
            continue
        missing = [name for name, path in found.items() if path is None]
        if missing:
            raise DataError(f"fashion-mnist: {folder} has only some of the files ({', '.join(missing)} missing); "
                            f"{HOW_TO_GET}")
        contents = {name: _read_checked(path, name, allow_unofficial) for name, path in found.items()}
        in_layout = all(path == os.path.join(folder, LAYOUT, name) for name, path in found.items())
        if in_layout:
            return folder
        _put_in_layout(data_dir, contents)
        return data_dir
    _download(data_dir, looked)
    return prepare(data_dir, allow_unofficial)


def _download(data_dir: str, looked: list[str]) -> None:
    """torchvision's download into a temp folder under ``data_dir``, its files then put in place."""
    where = ", ".join(looked)
    if os.environ.get(NO_DOWNLOAD_ENV) == "1":
        raise DataError(f"fashion-mnist: not found in {where} and downloads are off ({NO_DOWNLOAD_ENV}=1); "
                        f"{HOW_TO_GET}")
    old_timeout = socket.getdefaulttimeout()
    tmp = None
    try:
        os.makedirs(data_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".download-", dir=data_dir)
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        datasets.FashionMNIST(tmp, train=True, download=True)
        contents = {name: _read_checked(os.path.join(tmp, LAYOUT, name), name, False) for name in FILES}
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 (any failure becomes the one-line message below)
        raise DataError(f"fashion-mnist: not found in {where} and could not be downloaded ({_one_line(e)}); "
                        f"{HOW_TO_GET}") from None
    finally:
        socket.setdefaulttimeout(old_timeout)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    _put_in_layout(data_dir, contents)


def fashion_arrays(data_dir: str, train: bool, allow_unofficial: bool = False) -> Arrays:
    """One split of Fashion-MNIST: uint8 images ``[N, 1, 28, 28]`` and int64 labels ``[N]`` (CPU)."""
    root = _prepared(os.path.abspath(data_dir), allow_unofficial, tuple(search_dirs(data_dir)))
    return _read(root, train)


@functools.lru_cache(maxsize=4)
def _prepared(data_dir: str, allow_unofficial: bool, looked: tuple[str, ...]) -> str:
    """``prepare`` once per process and place (``looked``, the folders it searches, is in the key): a run loads
    its train and test split, and every member of a pack both, from one check of the files."""
    return os.path.abspath(prepare(data_dir, allow_unofficial))


@functools.lru_cache(maxsize=2)
def _read(root: str, train: bool) -> Arrays:
    try:
        ds = datasets.FashionMNIST(root, train=train, download=False)
    except (RuntimeError, OSError, ValueError, IndexError) as e:
        raise DataError(f"fashion-mnist: cannot read {os.path.join(root, LAYOUT)} ({_one_line(e)}); "
                        f"{HOW_TO_GET}") from None
    images, labels = ds.data, ds.targets
    if images.dtype != torch.uint8 or images.dim() != 3 or images.shape[0] != labels.shape[0]:
        raise DataError(f"fashion-mnist: {os.path.join(root, LAYOUT)} holds images of shape {tuple(images.shape)}, "
                        f"{labels.shape[0]} labels; {HOW_TO_GET}")
    return images.unsqueeze(1).contiguous(), labels.long()
