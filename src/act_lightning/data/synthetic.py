"""Random images of any size, channel count and class count: for tests and smoke runs without data."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from act_lightning.data.base import ImageDataModule


class SyntheticImages(Dataset):
    """`length` deterministic random images in [-1, 1] (smooth blobs, so they are not pure noise)."""

    def __init__(self, length: int, image_size: int, channels: int, num_classes: int | None, seed: int = 0):
        self.length, self.image_size, self.channels = length, image_size, channels
        self.num_classes, self.seed = num_classes, seed
        # each image is made once and kept (in each loader worker): an image made at every read cost
        # the benchmarks' timed iterations 27-39 ms per 160 images in the main process, work that a data
        # set read by worker processes never charges the training step
        self._made: dict[int, tuple[torch.Tensor, int]] = {}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if index not in self._made:
            self._made[index] = self._make(index)
        image, label = self._made[index]
        return image.clone(), label  # a caller's change in place never reaches the kept one

    def _make(self, index: int) -> tuple[torch.Tensor, int]:
        # Test fixtures, not a training stream: the images stay those the tests' tolerances were set on
        # (act_lightning.seeds.mix_seed would draw other ones; tests/unit/test_seeds.py says why).
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        coarse = torch.rand(self.channels, 4, 4, generator=g) * 2 - 1
        image = torch.nn.functional.interpolate(coarse[None], size=self.image_size, mode="bilinear")[0]
        label = int(torch.randint(self.num_classes, (), generator=g)) if self.num_classes else 0
        return image, label


class SyntheticDataModule(ImageDataModule):
    def __init__(self, length: int = 256, **kwargs) -> None:
        super().__init__(**kwargs)
        self.length = length

    def count_train_images(self, enough: int) -> int:
        return self.length

    def build_train_dataset(self) -> Dataset:
        return SyntheticImages(self.length, self.image_size, self.channels, self.num_classes, self.seed)
