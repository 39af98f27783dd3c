"""Binarized image data sets for sigmoid belief nets.

* :func:`load_digits` — the 1,797 8×8 handwritten digits that ship inside scikit-learn
  (no download), binarized: real data available on every install of the ``examples``
  extra (``pip install pyro-wakesleep[examples]``).
* :func:`load_mnist_subset` — 8,000 training and 500 held-out images of the standard
  statically binarized MNIST (Larochelle & Murray, 2011), bit-packed inside this package
  (about 0.3 MB; no download): the data of ``pyro-wakesleep compare``;
  :func:`pack_mnist_subset` wrote it.
* :func:`load_binarized_mnist` — the whole binarized MNIST from a local ``.npz`` file.
"""

from __future__ import annotations

import os
from importlib import resources
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from pyro_wakesleep.examples._optional import require

__all__ = [
    "MNIST_SUBSET", "Split", "load_binarized_mnist", "load_digits", "load_mnist_subset",
    "pack_mnist_subset",
]

#: file name of the packaged subset, in ``pyro_wakesleep/examples/data/``
MNIST_SUBSET = "binarized_mnist_subset.npz"


class Split(NamedTuple):
    """Train and test images as float tensors of 0/1 pixels, one image per row."""

    train: Tensor
    test: Tensor


def load_digits(test_fraction: float = 0.2, threshold: float = 8.0, seed: int = 0) -> Split:
    """scikit-learn's 8×8 digits, binarized at ``threshold`` (pixel range 0–16) and split
    at random into train and test.

    :param float test_fraction: fraction of the 1,797 images held out, in (0, 1).
    :param float threshold: a pixel is 1 where its grey level is >= ``threshold``.
    :param int seed: seed of the split.
    :return: :class:`Split` of ``(n, 64)`` tensors.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    sklearn_datasets = require("sklearn.datasets", "load_digits")

    images = (sklearn_datasets.load_digits().data >= threshold).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(images))
    n_test = round(test_fraction * len(images))
    data = torch.from_numpy(images[order])
    return Split(train=data[n_test:], test=data[:n_test])


def load_binarized_mnist(path: str | os.PathLike, split: str = "train") -> Tensor:
    """Binarized MNIST from an ``.npz`` with bit-packed ``uint8`` arrays ``train``,
    ``valid``, ``test`` of shape ``(n, 98)`` (784 pixels packed 8 to a byte).

    :param path: the ``.npz`` file.
    :param str split: ``"train"``, ``"valid"`` or ``"test"``.
    :return: a ``(n, 784)`` float tensor of 0/1 pixels.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"binarized MNIST file not found: {os.fspath(path)!r}")
    with np.load(path) as archive:
        if split not in archive.files:
            raise ValueError(f"split must be one of {sorted(archive.files)}, got {split!r}")
        packed = archive[split]
    if packed.dtype != np.uint8 or packed.ndim != 2 or packed.shape[1] != 98:
        raise ValueError(
            f"split {split!r} of {os.fspath(path)!r} must be uint8 of shape (n, 98), "
            f"got {packed.dtype} {packed.shape}"
        )
    return torch.from_numpy(np.unpackbits(packed, axis=1)[:, :784].astype(np.float32))


def _unpack(packed: np.ndarray, what: str) -> Tensor:
    if packed.dtype != np.uint8 or packed.ndim != 2 or packed.shape[1] != 98:
        raise ValueError(f"{what} must be uint8 of shape (n, 98), got {packed.dtype} "
                         f"{packed.shape}")
    return torch.from_numpy(np.unpackbits(packed, axis=1)[:, :784].astype(np.float32))


def load_mnist_subset() -> Split:
    """The binarized MNIST subset that ships inside this package: 8,000 images of the
    standard training split and 500 of the test split (Larochelle & Murray, 2011), chosen
    at random (seed 0) by :func:`pack_mnist_subset`; their indices in the full splits are
    stored beside them (``train_index``, ``test_index``).

    :return: :class:`Split` of ``(8000, 784)`` and ``(500, 784)`` float tensors of 0/1.
    """
    source = resources.files("pyro_wakesleep.examples").joinpath("data", MNIST_SUBSET)
    with source.open("rb") as f, np.load(f) as archive:
        return Split(train=_unpack(archive["train"], f"{MNIST_SUBSET}['train']"),
                     test=_unpack(archive["test"], f"{MNIST_SUBSET}['test']"))


def pack_mnist_subset(source: str | os.PathLike, out: str | os.PathLike,
                      num_train: int = 8000, num_test: int = 500, seed: int = 0) -> None:
    """Writes a random subset of a binarized MNIST ``.npz`` (the layout that
    :func:`load_binarized_mnist` reads), bit-packed and compressed, as
    :func:`load_mnist_subset` reads it: ``num_train`` images of ``train`` and ``num_test``
    of ``test``, drawn without replacement (seed ``seed``) and kept in their original
    order, with their indices.

    :param source: the full ``.npz``.
    :param out: the file to write.
    :param int num_train: images taken from ``train``.
    :param int num_test: images taken from ``test``.
    :param int seed: seed of the draw.
    """
    rng = np.random.default_rng(seed)
    with np.load(source) as archive:
        train, test = archive["train"], archive["test"]
    for name, packed, n in (("train", train, num_train), ("test", test, num_test)):
        _unpack(packed[:1], f"{os.fspath(source)!r}[{name!r}]")
        if not 0 < n <= len(packed):
            raise ValueError(f"num_{name} must lie in [1, {len(packed)}], got {n}")
    train_index = np.sort(rng.choice(len(train), num_train, replace=False))
    test_index = np.sort(rng.choice(len(test), num_test, replace=False))
    np.savez_compressed(out, train=train[train_index], test=test[test_index],
                        train_index=train_index.astype(np.int32),
                        test_index=test_index.astype(np.int32))
