"""CIFAR-10 / CIFAR-100 from torchvision's release files: the archive found (or downloaded) in the data
folder, extracted atomically, every file md5-checked against the official release before it is unpickled
(unless the run opts in with ``allow_unofficial_data``); one-line ``DataError``s naming the file."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import socket
import tarfile
import tempfile

import numpy as np
import torch
from torchvision import datasets
from torchvision.datasets.utils import download_and_extract_archive

from training.config import DataError

Arrays = tuple[torch.Tensor, torch.Tensor]  # uint8 images [N, 3, 32, 32], int64 labels [N] (CPU)
DOWNLOAD_TIMEOUT_S = 3.0  # per socket operation; a failing attempt makes at most 3 (redirect, https, http)
NO_DOWNLOAD_ENV = "ADAREG_NO_DOWNLOAD"


def _files_only(cls: type[datasets.CIFAR10]) -> type[datasets.CIFAR10]:
    """``cls`` whose own integrity check only asks that the batch files of the requested split exist.

    adareg checks the md5 of every file itself (``_verify_files``) before torchvision unpickles it, and
    only where ``allow_unofficial_data`` is off; torchvision's check would refuse the opt-in.
    """
    def _check_integrity(self) -> bool:
        return all(os.path.isfile(os.path.join(self.root, self.base_folder, name))
                   for name, _ in (self.train_list if self.train else self.test_list))

    return type(cls.__name__, (cls,), {"_check_integrity": _check_integrity,
                                       "meta": {**cls.meta, "md5": None}})


CIFAR_RELEASES = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}  # torchvision's, md5 lists included
CIFAR_CLASSES = {name: _files_only(cls) for name, cls in CIFAR_RELEASES.items()}
CIFAR_TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
OPT_IN = "set train.allow_unofficial_data: true to load it anyway"


def _official_md5(name: str) -> tuple[str, dict[str, str]]:
    """The published md5 of ``name``'s archive and of each file in its folder (torchvision's lists)."""
    cls = CIFAR_RELEASES[name]
    files = dict(cls.train_list + cls.test_list)
    files[cls.meta["filename"]] = cls.meta["md5"]
    return cls.tgz_md5, files


OFFICIAL_MD5 = {name: _official_md5(name) for name in CIFAR_CLASSES}
"""dataset -> (md5 of the official archive, {file in its folder: md5})."""


def file_md5(path: str) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_archive(name: str, archive: str) -> None:
    """DataError unless ``archive`` is the official one (checked before anything is extracted)."""
    try:
        got = file_md5(archive)
    except OSError as e:
        raise DataError(f"{archive}: cannot read ({_one_line(e)})") from None
    want = OFFICIAL_MD5[name][0]
    if got != want:
        raise DataError(f"{archive} is not the official {CIFAR_TITLES[name]} archive (md5 {got}, expected {want}); "
                        f"{OPT_IN}")


def _verify_files(name: str, folder: str, files: list[str]) -> None:
    """DataError unless each of ``files`` in ``folder`` that exists has its official md5 (checked before
    torchvision unpickles them; a missing file is reported by the loader)."""
    official = OFFICIAL_MD5[name][1]
    for f in files:
        path = os.path.join(folder, f)
        if not os.path.isfile(path):
            continue
        got = file_md5(path)
        if got != official[f]:
            raise DataError(f"{path} is not the official {CIFAR_TITLES[name]} file {f} (md5 {got}, expected "
                            f"{official[f]}); {OPT_IN}")


def cifar_arrays(name: str, data_dir: str, train: bool, allow_unofficial: bool = False) -> Arrays:
    """One split of CIFAR-10/100 from ``data_dir`` (extracting or downloading it first if needed).

    Unless ``allow_unofficial``, the archive's md5 is checked before extraction and every batch file's
    md5 before it is unpickled; only the files of the requested split (and the label names) are read.
    """
    cls = CIFAR_CLASSES[name]
    folder = os.path.join(data_dir, cls.base_folder)
    archive = os.path.join(data_dir, cls.filename)
    if not os.path.isdir(folder):
        if os.path.isfile(archive):
            if not allow_unofficial:
                _verify_archive(name, archive)
            _extract(archive, cls.base_folder, data_dir)
        else:
            _download(name, cls, data_dir)
    if not allow_unofficial:
        _verify_files(name, folder, [f for f, _ in (cls.train_list if train else cls.test_list)]
                      + [cls.meta["filename"]])
    try:
        ds = cls(root=data_dir, train=train, download=False)
    except (RuntimeError, OSError, KeyError, ValueError, EOFError, TypeError, IndexError, AttributeError,
            pickle.UnpicklingError) as e:
        raise DataError(f"{name}: cannot read {folder} ({_one_line(e)}); remove it and place "
                        f"{cls.filename} ({cls.url}) in {data_dir}") from None
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(ds.targets, dtype=torch.long)


def _move_into_place(src: str, dst: str) -> None:
    """``os.replace``, except that a folder another worker has just put in place wins (parallel runs
    of a fresh sweep all fetch the same dataset)."""
    try:
        os.replace(src, dst)
    except OSError:
        if not os.path.isdir(dst):
            raise


def _extract(archive: str, base_folder: str, data_dir: str) -> None:
    """Unpack ``archive`` into ``data_dir/base_folder`` via a temp dir, so a failure leaves nothing."""
    tmp = tempfile.mkdtemp(prefix=".extract-", dir=data_dir)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            # the "data" filter refuses absolute paths and links out of tmp (Python >= 3.10.12 / 3.11.4)
            tar.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        if not os.path.isdir(os.path.join(tmp, base_folder)):
            raise DataError(f"{archive}: does not contain the folder {base_folder}")
        _move_into_place(os.path.join(tmp, base_folder), os.path.join(data_dir, base_folder))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{archive}: cannot extract ({_one_line(e)})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download(name: str, cls: type[datasets.CIFAR10], data_dir: str) -> None:
    """Download and extract through torchvision into a temp dir, then move archive and folder in."""
    if os.environ.get(NO_DOWNLOAD_ENV) == "1":
        reason = f"downloads are off: {NO_DOWNLOAD_ENV}=1"
    else:
        try:
            os.makedirs(data_dir, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=".download-", dir=data_dir)
        except OSError as e:
            reason = _one_line(e)
        else:
            old_timeout = socket.getdefaulttimeout()
            socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
            try:
                download_and_extract_archive(cls.url, tmp, filename=cls.filename, md5=cls.tgz_md5)
                _move_into_place(os.path.join(tmp, cls.base_folder), os.path.join(data_dir, cls.base_folder))
                _move_into_place(os.path.join(tmp, cls.filename), os.path.join(data_dir, cls.filename))
                return
            except Exception as e:  # noqa: BLE001 (any failure becomes the one-line message below)
                reason = _one_line(e)
            finally:
                socket.setdefaulttimeout(old_timeout)
                shutil.rmtree(tmp, ignore_errors=True)
    raise DataError(f"{name}: not found in {data_dir} and could not be downloaded ({reason}); "
                    f"place {cls.filename} ({cls.url}) in {data_dir}")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
