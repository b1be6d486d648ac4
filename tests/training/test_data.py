import os
import socket
import tarfile
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cifar_archives import CIFAR_LAYOUT, UNOFFICIAL, evil_pickle, write_cifar
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from training import cifar as cifar_files
from training import data
from training.config import ConfigError, DataError, RunConfig
from training.data import (
    Batches,
    Split,
    load_splits,
    noisy_labels,
    normalisation,
    seeded_generator,
)

DIGITS_CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    monkeypatch.setenv("ADAREG_NO_DOWNLOAD", "1")


def digits(**changes):
    return load_splits(RunConfig(dataset="digits", **changes), "cpu")


# --- digits ----------------------------------------------------------------------------------------

def test_digits_split_sizes_types_and_stratification():
    train, test = digits()
    assert train.images.shape == (1297, 3, 32, 32) and test.images.shape == (500, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.images.device.type == "cpu" and train.labels.shape == (1297,)
    assert torch.equal(train.images[:, 0], train.images[:, 2])  # grey replicated to 3 channels
    counts = train.labels.bincount(minlength=10) + test.labels.bincount(minlength=10)
    assert counts.tolist() == DIGITS_CLASS_COUNTS
    expected_test = torch.tensor(DIGITS_CLASS_COUNTS) * 500 / 1797
    assert (test.labels.bincount(minlength=10) - expected_test).abs().max() < 1


def test_digits_images_are_bilinear_upscales_of_the_sklearn_split():
    bunch = load_digits()
    train_idx, _ = train_test_split(np.arange(1797), test_size=500, stratify=bunch.target, random_state=0)
    src = torch.from_numpy(bunch.images[train_idx[:20]]).float().unsqueeze(1) * (255 / 16)
    expected = F.interpolate(src, size=(32, 32), mode="bilinear", align_corners=False).round().to(torch.uint8)
    train, _ = digits()
    assert torch.equal(train.images[:20, :1], expected)
    assert train.labels[:20].tolist() == bunch.target[train_idx[:20]].tolist()
    assert train.images.max() == 255


def test_loaded_tensors_are_copies_of_the_cache():
    first, _ = digits()
    first.images.zero_()
    first.labels.fill_(3)
    second, _ = digits()
    assert second.images.any() and (second.labels != 3).any()


def test_train_subset_is_a_seeded_prefix_of_a_permutation():
    full, full_test = digits()
    sub, sub_test = digits(train_subset=100, seed=7)
    keep = torch.randperm(1297, generator=seeded_generator(7, "train_subset"))[:100]
    assert torch.equal(sub.images, full.images[keep]) and torch.equal(sub.labels, full.labels[keep])
    assert torch.equal(sub_test.images, full_test.images)  # the test split is never cut
    other, _ = digits(train_subset=100, seed=8)
    assert not torch.equal(other.labels, sub.labels)


def test_train_subset_larger_than_the_split_names_train_subset():
    with pytest.raises(ConfigError, match="^train_subset: 1298 exceeds the 1297"):
        digits(train_subset=1298)


def test_label_noise_replaces_exactly_the_chosen_share():
    clean, clean_test = digits()
    noisy, noisy_test = digits(label_noise=0.3, seed=3)
    expected, chosen = noisy_labels(clean.labels, 0.3, 10, seeded_generator(3, "label_noise"))
    assert torch.equal(noisy.labels, expected)
    assert chosen.unique().numel() == 389  # round(0.3 * 1297)
    outside = torch.ones(1297, dtype=torch.bool)
    outside[chosen] = False
    assert torch.equal(noisy.labels[outside], clean.labels[outside])
    changed = int((noisy.labels != clean.labels).sum())
    assert 300 < changed < 389  # a uniform replacement keeps the true class ~1/10 of the time
    assert torch.equal(noisy.images, clean.images) and torch.equal(noisy_test.labels, clean_test.labels)
    assert torch.equal(digits(label_noise=0.3, seed=3)[0].labels, noisy.labels)
    assert not torch.equal(digits(label_noise=0.3, seed=4)[0].labels, noisy.labels)


def test_label_noise_applies_to_the_subset():
    sub, _ = digits(train_subset=200, seed=1)
    noisy, _ = digits(train_subset=200, seed=1, label_noise=0.5)
    assert torch.equal(noisy.images, sub.images)
    assert 50 < int((noisy.labels != sub.labels).sum()) <= 100


def test_noisy_labels_draw_uniform_classes_including_the_true_one():
    labels = torch.zeros(20_000, dtype=torch.long)
    out, chosen = noisy_labels(labels, 1.0, 10, torch.Generator().manual_seed(0))
    assert chosen.sort().values.tolist() == list(range(20_000))
    share = out.bincount(minlength=10).float() / 20_000
    assert share.sub(0.1).abs().max() < 0.01
    assert labels.eq(0).all()  # the input is not modified


def test_seeded_generators_differ_by_purpose_and_seed():
    def draw(seed, purpose):
        return torch.randperm(50, generator=seeded_generator(seed, purpose))

    assert torch.equal(draw(0, "a"), draw(0, "a"))
    assert not torch.equal(draw(0, "a"), draw(0, "b"))
    assert not torch.equal(draw(0, "a"), draw(1, "a"))


# --- batches and augmentation ----------------------------------------------------------------------

def tracked_split(n=103, seed=0):
    """Random images whose labels are their own indices, so a batch says which images it holds."""
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n))


def normalise_ref(x, dataset):
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in normalisation(dataset))
    return (x.float() / 255 - mean) / std


def crop_ref(image, top, left, flip):
    """Slow reference: zero-pad by 4, take the 32x32 window at (top, left), mirror it if asked."""
    padded = torch.zeros(3, 40, 40, dtype=torch.uint8)
    padded[:, 4:36, 4:36] = image
    out = padded[:, top:top + 32, left:left + 32]
    return out.flip(-1) if flip else out


@pytest.mark.parametrize("dataset", ["cifar10", "digits"])
def test_epoch_crop_and_flip_match_the_reference(dataset):
    split = tracked_split()
    g = torch.Generator().manual_seed(5)
    batches = list(Batches(split, dataset, 25, augment=True).epoch(g))
    ref = torch.Generator().manual_seed(5)  # documented draw order: permutation, offsets, flips
    perm = torch.randperm(103, generator=ref)
    offsets = torch.randint(0, 9, (103, 2), generator=ref)
    flips = torch.rand(103, generator=ref) < 0.5
    if dataset == "digits":
        flips[:] = False
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert torch.equal(y, perm)
    for i in (0, 1, 24, 25, 60, 102):
        top, left = offsets[i].tolist()
        expected = normalise_ref(crop_ref(split.images[perm[i]], top, left, bool(flips[i]))[None], dataset)
        torch.testing.assert_close(x[i:i + 1], expected, rtol=0, atol=1e-5)


def test_epoch_batches_shapes_layout_and_partial_last_batch():
    batches = Batches(tracked_split(), "cifar10", 25, augment=True)
    out = list(batches.epoch(torch.Generator().manual_seed(0)))
    assert len(batches) == 5 and [x.shape[0] for x, _ in out] == [25, 25, 25, 25, 3]
    for x, y in out:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32) and y.dtype == torch.int64
        assert x.is_contiguous(memory_format=torch.channels_last)
    assert sorted(torch.cat([y for _, y in out]).tolist()) == list(range(103))


def gradient_split(n):
    """Every row reads 1, 2, ..., 32: a crop's shift and mirroring can be read off its middle."""
    row = torch.arange(1, 33, dtype=torch.uint8)
    return Split(row.expand(n, 3, 32, 32).contiguous(), torch.zeros(n, dtype=torch.long))


def shifts_and_flips(dataset, n, seed=0):
    """Per image of an epoch over ``gradient_split``: whether it was mirrored, and the source column
    seen at output column 8 (or 23 if mirrored), i.e. 8 + the horizontal shift."""
    batches = Batches(gradient_split(n), dataset, 50, augment=True)
    x = torch.cat([x for x, _ in batches.epoch(torch.Generator().manual_seed(seed))])
    mean, std = normalisation(dataset)
    mid = (x[:, 0, 16, 8:24] * std[0] + mean[0]) * 255  # never padding: crops move by at most 4 pixels
    flipped = mid[:, 0] > mid[:, -1]
    return flipped, mid[:, 0].round().long() - 1


def test_cifar_flips_about_half_and_digits_never():
    n = 2000
    cifar_flipped, _ = shifts_and_flips("cifar10", n)
    digits_flipped, digits_cols = shifts_and_flips("digits", n)
    assert 900 < int(cifar_flipped.sum()) < 1100
    assert not digits_flipped.any()
    assert sorted(digits_cols.unique().tolist()) == list(range(4, 13))  # 8 + shift, shift in -4..4


def test_same_generator_state_gives_identical_epochs():
    batches = Batches(tracked_split(), "cifar10", 25, augment=True)
    a = list(batches.epoch(torch.Generator().manual_seed(11)))
    b = list(batches.epoch(torch.Generator().manual_seed(11)))
    c = list(batches.epoch(torch.Generator().manual_seed(12)))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))
    assert not torch.equal(a[0][1], c[0][1])


def test_no_augment_only_shuffles():
    split = tracked_split()
    out = list(Batches(split, "cifar10", 40, augment=False).epoch(torch.Generator().manual_seed(1)))
    y = torch.cat([y for _, y in out])
    assert torch.equal(y, torch.randperm(103, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(torch.cat([x for x, _ in out]), normalise_ref(split.images[y], "cifar10"),
                               rtol=0, atol=1e-5)


def test_ordered_is_in_order_normalised_and_unaugmented():
    split = tracked_split()
    out = list(Batches(split, "cifar100", 50, augment=True).ordered(40))
    assert [x.shape[0] for x, _ in out] == [40, 40, 23]
    assert torch.equal(torch.cat([y for _, y in out]), torch.arange(103))
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in out)
    torch.testing.assert_close(torch.cat([x for x, _ in out]), normalise_ref(split.images, "cifar100"),
                               rtol=0, atol=1e-5)


def test_normalisation_constants():
    assert normalisation("cifar10") == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    assert normalisation("cifar100") == ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    train, _ = digits()
    x = torch.cat([x for x, _ in Batches(train, "digits", 50, augment=False).ordered(500)])
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (x.std(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-4
    mean, std = normalisation("digits")
    assert mean[0] == pytest.approx(train.images.double().mean().item() / 255, rel=1e-9)
    assert mean[0] == mean[1] == mean[2] and std[0] == std[2]


# --- CIFAR -----------------------------------------------------------------------------------------

def cifar(name, root, **changes):
    """Load the tests' small CIFAR archives (not the official files: opted in unless told otherwise)."""
    return load_splits(RunConfig(dataset=name, data_dir=str(root), **{**UNOFFICIAL, **changes}), "cpu")


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("archive", [False, True])
def test_cifar_loads_from_folder_or_archive(tmp_path, name, archive):
    (x_train, y_train), (x_test, y_test) = write_cifar(tmp_path, name, archive=archive)
    train, test = cifar(name, tmp_path)
    assert train.images.shape == (20 if name == "cifar10" else 4, 3, 32, 32)
    assert torch.equal(train.images, x_train) and torch.equal(train.labels, y_train)
    assert torch.equal(test.images, x_test) and torch.equal(test.labels, y_test)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    folder, tar_name = CIFAR_LAYOUT[name][:2]
    assert sorted(os.listdir(tmp_path)) == sorted([folder] + ([tar_name] if archive else []))


def test_cifar_subset_and_noise_use_the_train_split(tmp_path):
    (x_train, y_train), _ = write_cifar(tmp_path, "cifar10", per_file=20)
    train, _ = cifar("cifar10", tmp_path, train_subset=30, label_noise=0.5, seed=2)
    keep = torch.randperm(100, generator=seeded_generator(2, "train_subset"))[:30]
    assert torch.equal(train.images, x_train[keep])
    expected, _ = noisy_labels(y_train[keep], 0.5, 10, seeded_generator(2, "label_noise"))
    assert torch.equal(train.labels, expected)


@pytest.mark.parametrize("name, folder, archive", [
    ("cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz"),
    ("cifar100", "cifar-100-python", "cifar-100-python.tar.gz"),
])
def test_absent_cifar_without_download_is_a_one_line_data_error(tmp_path, name, folder, archive):
    root = tmp_path / "data"
    with pytest.raises(DataError) as info:
        cifar(name, root)
    message = str(info.value)
    assert message.startswith(f"{name}: not found in {root} and could not be downloaded")
    assert "ADAREG_NO_DOWNLOAD=1" in message and f"place {archive} (https://" in message
    assert message.endswith(f"in {root}") and "\n" not in message
    assert not root.exists()


def test_failed_download_leaves_nothing_and_restores_the_socket_timeout(tmp_path, monkeypatch):
    monkeypatch.delenv("ADAREG_NO_DOWNLOAD")
    seen = {}

    def failing_download(url, root, filename, md5):
        seen["timeout"] = socket.getdefaulttimeout()
        with open(os.path.join(root, filename), "wb") as f:
            f.write(b"partial")
        raise urllib.error.URLError("Name or service\nnot known")

    monkeypatch.setattr(cifar_files, "download_and_extract_archive", failing_download)
    before = socket.getdefaulttimeout()
    with pytest.raises(DataError, match=r"\(URLError: <urlopen error Name or service not known>\); place"):
        cifar("cifar10", tmp_path / "data")
    assert 0 < seen["timeout"] <= 10 and socket.getdefaulttimeout() == before
    assert os.listdir(tmp_path / "data") == []


def test_successful_download_moves_archive_and_folder_in(tmp_path, monkeypatch):
    monkeypatch.delenv("ADAREG_NO_DOWNLOAD")
    source = tmp_path / "mirror"
    source.mkdir()
    (x_train, _), _ = write_cifar(source, "cifar10", archive=True)

    def fake_download(url, root, filename, md5):
        assert url == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" and md5
        os.link(source / filename, os.path.join(root, filename))
        with tarfile.open(source / filename) as tar:
            tar.extractall(root)

    monkeypatch.setattr(cifar_files, "download_and_extract_archive", fake_download)
    train, _ = cifar("cifar10", tmp_path / "data")
    assert torch.equal(train.images, x_train)
    assert sorted(os.listdir(tmp_path / "data")) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_corrupt_archive_is_a_data_error_and_leaves_no_folder(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tar file")
    with pytest.raises(DataError, match="cifar-10-python.tar.gz: cannot extract"):
        cifar("cifar10", tmp_path)
    with pytest.raises(DataError, match="cifar-10-python.tar.gz is not the official CIFAR-10 archive"):
        cifar("cifar10", tmp_path, allow_unofficial_data=False)
    assert os.listdir(tmp_path) == ["cifar-10-python.tar.gz"]


# --- only the official CIFAR files are unpickled, unless the run opts in -----------------------------

def tampered(tmp_path, name, archive, split="train"):
    """A small CIFAR whose first ``split`` file, once unpickled, creates ``tmp_path/marker``."""
    build = tmp_path / "build"
    write_cifar(build, name)
    folder, tar_name, train_files, test_files = CIFAR_LAYOUT[name]
    target = (train_files if split == "train" else test_files)[0]
    (build / folder / target).write_bytes(evil_pickle(tmp_path / "marker"))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    if archive:
        with tarfile.open(data_dir / tar_name, "w:gz") as tar:
            tar.add(build / folder, arcname=folder)
    else:
        os.rename(build / folder, data_dir / folder)
    return data_dir


@pytest.mark.parametrize("name, title", [("cifar10", "CIFAR-10"), ("cifar100", "CIFAR-100")])
def test_tampered_archive_is_refused_before_extraction(tmp_path, name, title):
    data_dir = tampered(tmp_path, name, archive=True)
    tar_name = CIFAR_LAYOUT[name][1]
    md5 = cifar_files.file_md5(str(data_dir / tar_name))
    with pytest.raises(DataError) as info:
        cifar(name, data_dir, allow_unofficial_data=False)
    official = {"cifar10": "c58f30108f718f92721af3b95e74349a", "cifar100": "eb9058c3a382ffc7106e4002c42a8d85"}[name]
    assert str(info.value) == (f"{data_dir / tar_name} is not the official {title} archive (md5 {md5}, expected "
                               f"{official}); set train.allow_unofficial_data: true to load it anyway")
    assert not (tmp_path / "marker").exists()
    assert os.listdir(data_dir) == [tar_name]  # not even extracted


def test_tampered_file_in_an_extracted_folder_is_refused_before_unpickling(tmp_path):
    data_dir = tampered(tmp_path, "cifar10", archive=False)
    path = data_dir / "cifar-10-batches-py" / "data_batch_1"
    with pytest.raises(DataError) as info:
        cifar("cifar10", data_dir, allow_unofficial_data=False)
    md5 = cifar_files.file_md5(str(path))
    assert str(info.value) == (f"{path} is not the official CIFAR-10 file data_batch_1 (md5 {md5}"
                               ", expected c99cafc152244af753f735de768cd75f); set train.allow_unofficial_data: true "
                               "to load it anyway")
    assert not (tmp_path / "marker").exists()


def test_the_opt_in_does_unpickle_the_tampered_file(tmp_path):
    """The marker does detect unpickling: with the opt-in, the tampered file runs its code."""
    data_dir = tampered(tmp_path, "cifar10", archive=True)
    with pytest.raises(DataError, match="^cifar10: cannot read"):  # then it is no CIFAR batch
        cifar("cifar10", data_dir)
    assert (tmp_path / "marker").exists()


def test_files_with_the_official_md5_load_without_the_opt_in(tmp_path, monkeypatch):
    """With the published md5 replaced by the test archive's, it loads without the opt-in, every file checked."""
    data_dir = tmp_path / "data"
    (x_train, y_train), (x_test, _) = write_cifar(data_dir, "cifar10", archive=True)
    with tarfile.open(data_dir / "cifar-10-python.tar.gz") as tar:
        tar.extractall(tmp_path / "ref", filter="data")
    files = {p.name: cifar_files.file_md5(str(p)) for p in (tmp_path / "ref" / "cifar-10-batches-py").iterdir()}
    archive_md5 = cifar_files.file_md5(str(data_dir / "cifar-10-python.tar.gz"))
    monkeypatch.setitem(cifar_files.OFFICIAL_MD5, "cifar10", (archive_md5, files))
    checked = []
    real_md5 = cifar_files.file_md5
    monkeypatch.setattr(cifar_files, "file_md5", lambda path: checked.append(os.path.basename(path)) or real_md5(path))
    train, test = cifar("cifar10", data_dir, allow_unofficial_data=False)
    assert torch.equal(train.images, x_train) and torch.equal(train.labels, y_train)
    assert torch.equal(test.images, x_test)
    assert checked == ["cifar-10-python.tar.gz", *[f"data_batch_{i}" for i in range(1, 6)], "batches.meta",
                       "test_batch", "batches.meta"]


def test_incomplete_folder_is_a_data_error(tmp_path):
    write_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"^cifar10: cannot read .*cifar-10-batches-py"):
        cifar("cifar10", tmp_path)


def test_a_folder_another_worker_put_in_place_wins(tmp_path):
    """Parallel workers of a fresh sweep extract the same archive; the later one must not fail."""
    for d in ("mine/cifar-10-batches-py", "cifar-10-batches-py"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "data_batch_1").write_text(d)
    cifar_files._move_into_place(str(tmp_path / "mine/cifar-10-batches-py"), str(tmp_path / "cifar-10-batches-py"))
    assert (tmp_path / "cifar-10-batches-py/data_batch_1").read_text() == "cifar-10-batches-py"
    with pytest.raises(OSError):
        cifar_files._move_into_place(str(tmp_path / "absent"), str(tmp_path / "elsewhere"))


# --- validation split ------------------------------------------------------------------------------

def test_validation_is_stratified_fixed_and_clean():
    full_x, full_y = data.load_train_arrays(RunConfig(dataset="digits"))
    held, rest = data.validation_indices(full_y, 0.1)
    counts = full_y.bincount(minlength=10)
    assert full_y[held].bincount(minlength=10).tolist() == [int(c * 0.1 + 0.5) for c in counts.tolist()]
    assert len(held) == 130 and len(rest) == 1297 - 130
    assert torch.equal(torch.cat([held, rest]).sort().values, torch.arange(1297))
    for seed in (0, 5):  # the same held-out images for every run seed, subset and noise
        train, val = digits(validation=0.1, seed=seed, train_subset=300, label_noise=0.5)
        assert torch.equal(val.images, full_x[held]) and torch.equal(val.labels, full_y[held])
        keep = torch.randperm(len(rest), generator=seeded_generator(seed, "train_subset"))[:300]
        assert torch.equal(train.images, full_x[rest][keep])
        expected, _ = noisy_labels(full_y[rest][keep], 0.5, 10, seeded_generator(seed, "label_noise"))
        assert torch.equal(train.labels, expected)
    other, _ = data.validation_indices(full_y, 0.2)
    assert len(other) == 259


def test_validation_never_loads_the_test_split(monkeypatch):
    def refuse(config):
        raise AssertionError("the test split was loaded")

    monkeypatch.setattr(data, "load_test_arrays", refuse)
    train, val = digits(validation=0.25)
    assert len(train) + len(val) == 1297
    with pytest.raises(AssertionError, match="the test split was loaded"):
        digits()


def test_validation_on_cifar_never_reads_the_test_file(tmp_path):
    data_dir = tampered(tmp_path, "cifar10", archive=True, split="test")
    train, val = cifar("cifar10", data_dir, validation=0.2)
    assert len(train) + len(val) == 20 and len(val) >= 2
    assert not (tmp_path / "marker").exists()
    (data_dir / "cifar-10-batches-py" / "test_batch").unlink()  # not even needed
    assert torch.equal(cifar("cifar10", data_dir, validation=0.2)[1].images, val.images)


def test_validation_leaving_nothing_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^validation: 0.001 of 1297 training images leaves 0 for validation"):
        digits(validation=0.001)
    with pytest.raises(ConfigError, match=r"^train_subset: 1200 exceeds the 1167 training images left after the "
                                          r"validation hold-out of digits"):
        digits(validation=0.1, train_subset=1200)
