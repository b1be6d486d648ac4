"""Datasets as whole uint8 tensors on the training device, and batched augmentation.

``load_splits`` returns the train and evaluation split (test, or a held-out validation part of the
training split) of ``digits`` (scikit-learn's offline 8x8 digits, upscaled to 32x32), ``cifar10``,
``cifar100`` or ``fashion-mnist`` (1x28x28), each as ONE uint8 tensor on the device, with the run's
``train_subset`` and ``label_noise`` applied to the training split. CIFAR files (``training.cifar``) are
md5-checked against the official release before they are unpickled, and Fashion-MNIST's
(``training.fashion``) by their content, unless the run opts in with ``allow_unofficial_data``. ``Batches`` shuffles,
crops, flips and normalises whole batches with tensor ops; nothing runs per image in Python and
nothing syncs the host per batch.

Randomness comes only from explicitly seeded CPU ``torch.Generator`` objects, so the same seed gives
the same data on every call and every device.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from training import fashion
from training.cifar import Arrays, cifar_arrays
from training.config import DATASET_SPECS, ConfigError, RunConfig

PAD = 4  # zero padding before the random crop to the image's own size
DIGITS_TEST_SIZE = 500

# Per-channel mean / std of the training images on the 0..1 scale.
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "fashion-mnist": ((fashion.MEAN,), (fashion.STD,)),
}


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W] on the device (the dataset's ``ImageSpec``)
    labels: torch.Tensor  # int64 [N], same device

    def __len__(self) -> int:
        return self.labels.shape[0]


def seeded_generator(seed: int, purpose: str) -> torch.Generator:
    """A CPU generator for one ``purpose``; distinct purposes get unrelated streams of the same seed."""
    digest = hashlib.sha256(f"adareg:{purpose}:{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


VALIDATION_SEED = 0
"""Seed of the validation hold-out: fixed, so every run seed and every trial sees the same split."""


def load_splits(config: RunConfig, device: torch.device | str) -> tuple[Split, Split]:
    """(train, evaluation) splits of ``config.dataset`` on ``device``.

    The evaluation split is the test split, or with ``config.validation`` the part of the training
    split held out for validation (then the test split is never loaded). ``train_subset`` and
    ``label_noise`` apply to what is left for training; validation labels stay clean.
    """
    x_train, y_train = load_train_arrays(config)
    if config.validation:
        held, rest = validation_indices(y_train, config.validation)
        (x_eval, y_eval), (x_train, y_train) = (x_train[held], y_train[held]), (x_train[rest], y_train[rest])
    else:
        x_eval, y_eval = load_test_arrays(config)

    if config.train_subset:
        n = len(y_train)
        if config.train_subset > n:
            left = " left after the validation hold-out" if config.validation else ""
            raise ConfigError("train_subset", f"{config.train_subset} exceeds the {n} training images{left} of "
                              f"{config.dataset}")
        perm = torch.randperm(n, generator=seeded_generator(config.seed, "train_subset"))
        keep = perm[:config.train_subset]
        x_train, y_train = x_train[keep], y_train[keep]
    if config.label_noise:
        y_train, _ = noisy_labels(y_train, config.label_noise, config.num_classes,
                                  seeded_generator(config.seed, "label_noise"))

    def put(x: torch.Tensor, y: torch.Tensor) -> Split:  # copy=True: never hand out the cached tensors
        return Split(x.to(device, copy=True), y.to(device, copy=True))

    return put(x_train, y_train), put(x_eval, y_eval)


def load_train_arrays(config: RunConfig) -> Arrays:
    """The whole training split of ``config.dataset`` (CPU), before any hold-out, subset or noise."""
    return _arrays(config, train=True)


def load_test_arrays(config: RunConfig) -> Arrays:
    """The test split of ``config.dataset`` (CPU). Never called for a run with a validation split."""
    return _arrays(config, train=False)


def _arrays(config: RunConfig, train: bool) -> Arrays:
    if config.dataset == "digits":
        return _digits()[0 if train else 1]
    if config.dataset == "fashion-mnist":
        return fashion.fashion_arrays(config.data_dir, train=train, allow_unofficial=config.allow_unofficial_data)
    return cifar_arrays(config.dataset, config.data_dir, train=train, allow_unofficial=config.allow_unofficial_data)


def validation_indices(labels: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out, rest) indices into ``labels``, both ascending: from every class, ``floor(fraction x n_c
    + 0.5)`` of its n_c images, drawn with the fixed ``VALIDATION_SEED`` (the same for every run)."""
    generator = seeded_generator(VALIDATION_SEED, "validation")
    held = []
    for c in torch.unique(labels, sorted=True).tolist():
        idx = (labels == c).nonzero().flatten()
        k = math.floor(fraction * len(idx) + 0.5)
        held.append(idx[torch.randperm(len(idx), generator=generator)[:k]])
    held_idx = torch.cat(held).sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held_idx] = False
    rest_idx = mask.nonzero().flatten()
    if not len(held_idx) or not len(rest_idx):
        raise ConfigError("validation", f"{fraction} of {len(labels)} training images leaves "
                          f"{len(held_idx)} for validation and {len(rest_idx)} for training")
    return held_idx, rest_idx


def noisy_labels(labels: torch.Tensor, fraction: float, num_classes: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace ``round(fraction x N)`` labels, chosen by ``generator``, by uniform random classes.

    As in Zhang et al. 2017, a replacement is drawn from all classes, so it may equal the true class
    (the share of wrong labels is ``fraction x (1 - 1/num_classes)`` on average). Returns the new
    labels and the indices of the chosen ones.
    """
    n = labels.shape[0]
    chosen = torch.randperm(n, generator=generator)[:round(fraction * n)]
    out = labels.clone()
    out[chosen] = torch.randint(0, num_classes, (chosen.numel(),), generator=generator)
    return out, chosen


# --- digits ----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _digits() -> tuple[Arrays, Arrays]:
    """scikit-learn digits as 32x32x3 uint8 (bilinear upscale), fixed stratified 1,297 / 500 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.from_numpy(bunch.images).float().mul_(255.0 / 16.0).unsqueeze(1)  # [N,1,8,8], 0..255
    size = DATASET_SPECS["digits"].size
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(bunch.target).long()
    train, test = train_test_split(np.arange(len(y)), test_size=DIGITS_TEST_SIZE, stratify=bunch.target,
                                   random_state=0)
    train, test = torch.from_numpy(train), torch.from_numpy(test)
    return (x[train], y[train]), (x[test], y[test])


@functools.lru_cache(maxsize=1)
def _digits_stats() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean / std (0..1 scale) of the full digits training split."""
    x = _digits()[0][0].double() / 255.0
    return tuple(x.mean(dim=(0, 2, 3)).tolist()), tuple(x.std(dim=(0, 2, 3), unbiased=False).tolist())


def normalisation(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) on the 0..1 scale used to normalise ``dataset``."""
    return _digits_stats() if dataset == "digits" else STATS[dataset]


# --- batching and augmentation --------------------------------------------------------------------

class Batches:
    """Shuffled, augmented, normalised mini-batches of a ``Split``, built with tensor ops only.

    Augmentation (``augment=True``): 4-pixel zero padding then a random crop to the image's size (32x32,
    or 28x28 on Fashion-MNIST) per image, and a horizontal flip with p=0.5 where the dataset's
    ``ImageSpec.flip`` says a mirror image is the same class (not on digits: a mirrored digit is another
    symbol).
    Batches are float32 in ``torch.channels_last`` memory format; labels int64.
    """

    def __init__(self, split: Split, dataset: str, batch_size: int, augment: bool):
        self.split = split
        self.batch_size = batch_size
        self.augment = augment
        self.flip = DATASET_SPECS[dataset].flip
        self.size = split.images.shape[-1]
        mean, std = normalisation(dataset)
        device = split.images.device
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        # (x / 255 - mean) / std == x * scale + shift
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -mean_t / std_t
        self._cols = torch.arange(self.size, device=device)

    def __len__(self) -> int:
        return math.ceil(len(self.split) / self.batch_size)

    axis = 0
    """The position axis of ``draw``'s tensors (``training.graphed`` slices batches along it)."""

    def epoch(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch in a random order: ``draw``, then ``make`` of each batch's slice of the draws."""
        draws = self.draw(generator)
        for start in range(0, len(self.split), self.batch_size):
            yield self.make(*(d[start:start + self.batch_size] if d is not None else None for d in draws))

    def draw(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """An epoch's random draws, on the device: (permutation [N], crop offsets [N, 2] (row, column) in 0..8,
        flip bits [N]), the last two None without augmentation. Drawn from ``generator`` (CPU) in this
        order: the permutation, then (if augmenting) the offsets and, where the dataset flips, the flip
        bits (digits: no flips), all indexed by position in the permutation."""
        n = len(self.split)
        device = self.split.images.device
        perm = torch.randperm(n, generator=generator)
        offsets = flips = None
        if self.augment:
            offsets = torch.randint(0, 2 * PAD + 1, (n, 2), generator=generator)
            if self.flip:
                flips = torch.rand(n, generator=generator) < 0.5
            else:
                flips = torch.zeros(n, dtype=torch.bool)
            offsets, flips = offsets.to(device), flips.to(device)
        return perm.to(device), offsets, flips

    def make(self, idx: torch.Tensor, offsets: torch.Tensor | None,
             flips: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of the images ``idx`` (device ops only), cropped and flipped by ``offsets`` / ``flips``."""
        x = self.split.images[idx]
        if self.augment:
            x = self._crop_flip(x, offsets, flips)
        return self._normalise(x), self.split.labels[idx]

    def ordered(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The split in order, not augmented (for evaluation)."""
        for start in range(0, len(self.split), batch_size):
            stop = start + batch_size
            yield self._normalise(self.split.images[start:stop]), self.split.labels[start:stop]

    def _crop_flip(self, x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Crop ``x[b]`` (zero-padded by PAD) at ``offsets[b]``, mirrored where ``flips[b]``.

        Two gathers (rows, then columns) on the padded batch; about 2x faster on the CPU than one
        4-D advanced index.
        """
        b, c, size = x.shape[0], x.shape[1], self.size
        padded = F.pad(x, (PAD, PAD, PAD, PAD))
        rows = (offsets[:, :1] + self._cols).view(b, 1, size, 1).expand(b, c, size, size + 2 * PAD)
        cols = offsets[:, 1:] + torch.where(flips[:, None], size - 1 - self._cols, self._cols)
        return padded.gather(2, rows).gather(3, cols.view(b, 1, 1, size).expand(b, c, size, size))

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        # Normalising in NCHW, then converting, is ~2x faster on the CPU than the other way round.
        return x.float().mul_(self.scale).add_(self.shift).contiguous(memory_format=torch.channels_last)
