"""Binarized image data sets for sigmoid belief nets.

* :func:`load_digits` — the 1,797 8×8 handwritten digits that ship inside scikit-learn
  (no download), binarized: real data available on every install of the ``examples``
  extra (``pip install pyro-wakesleep[examples]``).
* :func:`load_binarized_mnist` — the standard statically binarized MNIST
  (Larochelle & Murray, 2011) from a local ``.npz`` file.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from pyro_wakesleep.examples._optional import require

__all__ = ["Split", "load_binarized_mnist", "load_digits"]


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
