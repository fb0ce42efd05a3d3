"""The embedded default: scikit-learn's 8x8 handwritten digits (1,797 images, shipped inside the
scikit-learn package, so the quickstart needs no download)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from act_lightning.data.base import ImageDataModule


def load_digits_split(
    held_out: int = 297, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] as (N, 1, 8, 8) float32 and labels, split into train and held-out parts.

    The split is a fixed permutation (seeded), so the held-out digits are the same in every run and can
    serve as the "real" reference of the quickstart's metric.
    """
    from sklearn.datasets import load_digits  # the data ship inside scikit-learn: no network

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0 * 2.0 - 1.0).unsqueeze(1)  # (N, 1, 8, 8)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    train, held = order[held_out:], order[:held_out]
    return images[train], labels[train], images[held], labels[held]


class DigitsDataModule(ImageDataModule):
    """8x8 one-channel digits; no flips (a mirrored digit is not a digit)."""

    def __init__(self, batch_size: int = 64, held_out: int = 297, split_seed: int = 0, **kwargs) -> None:
        kwargs.setdefault("image_size", 8)
        kwargs.setdefault("channels", 1)
        if kwargs["image_size"] != 8 or kwargs["channels"] != 1:
            raise ValueError(
                "data=digits holds 8x8 one-channel images: data.image_size must be 8 and data.channels 1, "
                f"got {kwargs['image_size']} and {kwargs['channels']}"
            )
        super().__init__(batch_size=batch_size, **kwargs)
        self.held_out = held_out
        self.split_seed = split_seed
        self._split = None

    def _get_split(self):
        if self._split is None:
            self._split = load_digits_split(self.held_out, self.split_seed)
        return self._split

    def build_train_dataset(self) -> Dataset:
        x, y, _, _ = self._get_split()
        return TensorDataset(x, y)

    def build_held_out_dataset(self) -> Dataset:
        _, _, x, y = self._get_split()
        return TensorDataset(x, y)
