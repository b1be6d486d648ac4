"""Fashion-MNIST: the real files (Debian's ``dataset-fashion-mnist``) through the loader users get, and the
errors for missing and corrupt files."""

from __future__ import annotations

import gzip
import os
import shutil

import pytest
import torch

from training import RunConfig, fashion, train
from training.config import DataError
from training.data import Batches, load_splits
from training.packed import train_packed


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """No folder holds the files: Debian's folder moved to an empty one, no $ADAREG_DATA."""
    empty = tmp_path / "debian"
    empty.mkdir()
    monkeypatch.setattr(fashion, "DEBIAN_DIR", str(empty))
    monkeypatch.delenv(fashion.DATA_ENV, raising=False)
    return tmp_path


def files_in(tree) -> list[str]:
    return sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))


def test_the_release_loads_checked_and_is_copied_once_into_torchvisions_layout(fashion_files, tmp_path, monkeypatch):
    monkeypatch.delenv(fashion.DATA_ENV, raising=False)
    config = RunConfig(arch="resnet8", dataset="fashion-mnist", data_dir=str(tmp_path / "data"))
    train_split, test_split = load_splits(config, "cpu")
    assert train_split.images.shape == (60_000, 1, 28, 28) and test_split.images.shape == (10_000, 1, 28, 28)
    assert train_split.images.dtype == torch.uint8 and train_split.labels.dtype == torch.int64
    assert torch.bincount(train_split.labels).tolist() == [6_000] * 10  # 10 balanced classes
    assert torch.bincount(test_split.labels).tolist() == [1_000] * 10
    pixels = train_split.images.double() / 255
    assert pixels.mean().item() == pytest.approx(fashion.MEAN, abs=5e-5)  # the published 0.2860 / 0.3530
    assert pixels.std(unbiased=False).item() == pytest.approx(fashion.STD, abs=5e-5)
    assert files_in(tmp_path / "data") == ["FashionMNIST", "FashionMNIST/raw"] + [
        f"FashionMNIST/raw/{name}" for name in sorted(fashion.FILES)]
    # the second look finds the copy in data_dir, already in torchvision's layout
    assert fashion.prepare(str(tmp_path / "data")) == str(tmp_path / "data")


def test_batches_crop_28x28_flip_and_normalise_one_channel(fashion_files, tmp_path):
    config = RunConfig(arch="resnet8", dataset="fashion-mnist", data_dir=str(tmp_path), train_subset=500)
    train_split, _ = load_splits(config, "cpu")
    batches = Batches(train_split, config.dataset, 100, augment=True)
    _, offsets, flips = batches.draw(torch.Generator().manual_seed(0))
    assert 150 < int(flips.sum()) < 350  # a horizontal flip with p = 0.5, as the anchors' recipe
    assert int(offsets.min()) == 0 and int(offsets.max()) == 8  # 4-pixel padding each side
    x, y = next(batches.ordered(500))
    assert x.shape == (500, 1, 28, 28) and x.is_contiguous(memory_format=torch.channels_last)
    raw = train_split.images.double() / 255
    torch.testing.assert_close(x.double(), (raw - fashion.MEAN) / fashion.STD, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("where", ["data_dir", "env"])
def test_plain_files_in_data_dir_or_adareg_data_are_found(fashion_files, nowhere, monkeypatch, where):
    plain = nowhere / "plain"
    plain.mkdir()
    for name in fashion.FILES:
        with gzip.open(os.path.join(fashion_files, f"{name}.gz")) as src, open(plain / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    data_dir = nowhere / "data"
    if where == "env":
        monkeypatch.setenv(fashion.DATA_ENV, str(plain))
    else:
        data_dir = plain
    x, y = fashion.fashion_arrays(str(data_dir), train=False)
    assert x.shape == (10_000, 1, 28, 28) and len(y) == 10_000
    assert (data_dir / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()


def test_missing_files_are_one_error_naming_every_folder_and_how_to_get_them(nowhere, monkeypatch):
    monkeypatch.setenv(fashion.DATA_ENV, str(nowhere / "env"))
    with pytest.raises(DataError) as info:
        fashion.fashion_arrays(str(nowhere / "data"), train=True)
    message = str(info.value)
    assert "\n" not in message
    for needle in (str(nowhere / "data"), str(nowhere / "env"), fashion.DEBIAN_DIR,
                   "apt-get install dataset-fashion-mnist", "ADAREG_NO_DOWNLOAD=1"):
        assert needle in message
    assert files_in(nowhere) == ["debian"]  # nothing written


def test_a_folder_with_some_of_the_files_names_the_missing_ones(nowhere):
    data = nowhere / "data"
    data.mkdir()
    (data / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte missing"):
        fashion.fashion_arrays(str(data), train=True)


@pytest.mark.parametrize("damage, needle", [
    (lambda raw: gzip.compress(raw[:-1] + bytes([raw[-1] ^ 1])), "is not the release's t10k-labels-idx1-ubyte"),
    (lambda raw: gzip.compress(raw)[:40], "cannot read"),  # truncated
    (lambda raw: b"not gzip at all", "cannot read"),
])
def test_a_corrupt_file_is_refused_naming_it_and_nothing_is_written(fashion_files, nowhere, damage, needle):
    data = nowhere / "data"
    data.mkdir()
    for name in fashion.FILES:
        shutil.copy(os.path.join(fashion_files, f"{name}.gz"), data)
    bad = data / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(damage(gzip.decompress(bad.read_bytes())))
    with pytest.raises(DataError) as info:
        fashion.fashion_arrays(str(data), train=True)
    assert needle in str(info.value) and str(bad) in str(info.value) and "\n" not in str(info.value)
    assert not (data / "FashionMNIST").exists()


# A few hundred steps on the real files, solo and packed: resnet8 on 7,500 training images, batch 50, two
# one-epoch steps at lr 0.1 then 0.01 (300 steps), weight decay 5e-4, evaluated on the 10,000 test images.
# Chance is 90 % test error; measured here: 25.1 / 25.7 / 25.6 % (solo, packed seeds 0 and 1). A linear
# classifier on raw pixels gets ~16 % with all 60,000 images, so 35 % is far from chance, and a broken
# pipeline (labels not matching images, unnormalised or wrongly shaped inputs, a BatchNorm left in training
# mode at evaluation) stays near 90 % or falls apart.
FEW_STEPS = dict(arch="resnet8", dataset="fashion-mnist", train_subset=7_500, batch_size=50, lr=[0.1, 0.01],
                 epochs_per_step=(1,), weight_decay=5e-4, grad_sparsity=0.0)
FAR_FROM_CHANCE = 0.35


@pytest.mark.slow
def test_a_few_hundred_steps_solo_and_packed_are_far_below_chance(fashion_files, tmp_path):
    torch.set_num_threads(2)
    configs = [RunConfig(seed=s, data_dir=str(tmp_path), **FEW_STEPS) for s in (0, 1)]
    solo = train(configs[0], device="cpu")
    packed = train_packed(configs, device="cpu")
    errors = [solo.history[-1]["test_error"]] + [m.history[-1]["test_error"] for m in packed.members]
    assert all(e < FAR_FROM_CHANCE for e in errors), errors
