"""What every DataModule shares: loader settings, worker seeding, and the split of each batch into the
generator half and the discriminator half that one ACT iteration consumes (ACT.md section 3)."""

from __future__ import annotations

import math
from typing import NamedTuple

import lightning as L
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Subset, default_collate


class DataError(ValueError):
    """A data file exists but is not what it should be (corrupt, truncated, wrong shape, bad checksum)."""


def to_signed(images: Tensor) -> Tensor:
    """uint8 images in [0, 255] -> float32 in [-1, 1]; float images pass through unchanged."""
    if images.dtype == torch.uint8:
        return images.float().div_(127.5).sub_(1.0)
    return images


def random_hflip(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Mirror each image of a (B, C, H, W) batch left-right with probability 1/2, on the batch's device."""
    flip = torch.rand(images.shape[0], device=images.device, generator=generator) < 0.5  # (B,)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def collate_signed(samples) -> tuple[Tensor, Tensor]:
    """default_collate, then uint8 -> [-1, 1] (for loaders that bypass `on_after_batch_transfer`)."""
    images, labels = default_collate(samples)
    return to_signed(images), labels


class HalfBatch(NamedTuple):
    """One iteration's data: B_G images for the generator update, B_D for the discriminator update."""

    gen: Tensor  # (B_G, C, H, W) in [-1, 1]
    gen_labels: Tensor  # (B_G,) int64; zeros for unconditional data
    disc: Tensor  # (B_D, C, H, W) in [-1, 1]
    disc_labels: Tensor  # (B_D,)


def split_halves(images: Tensor, labels: Tensor) -> HalfBatch:
    """Split a (2B, ...) batch into its generator and discriminator halves."""
    if images.shape[0] % 2:
        raise ValueError(f"an ACT batch holds two equal halves; got {images.shape[0]} images")
    gen, disc = images.chunk(2)
    gen_labels, disc_labels = labels.chunk(2)
    return HalfBatch(gen, gen_labels, disc, disc_labels)


class LoaderPosition:
    """Where the training loader stands within its epoch, shared by the DataModule (which counts the
    batches training consumed) and the batch sampler (which replays the epoch's order on resume)."""

    def __init__(self) -> None:
        self.consumed = 0  # batches of the current epoch that reached the training step
        self.epoch_generator_state: Tensor | None = None  # shuffling generator at the epoch's start
        self.resume: tuple[int, Tensor | None] | None = None


class ResumableBatchSampler(BatchSampler):
    """A BatchSampler that can resume mid-epoch: on the first epoch after a restore it puts the shuffling
    generator back to where that epoch began and skips the batches already trained on (index lists only;
    no image is loaded for them). Under DDP Lightning rebuilds it around its DistributedSampler, whose
    order depends on (seed, epoch) alone, and the skip still applies."""

    def __init__(self, sampler, batch_size: int, drop_last: bool, position: LoaderPosition | None = None):
        super().__init__(sampler, batch_size, drop_last)
        self.position = position if position is not None else LoaderPosition()

    def __iter__(self):
        pos = self.position
        generator = getattr(self.sampler, "generator", None)
        skip = 0
        if pos.resume is not None:
            skip, state = pos.resume
            pos.resume = None
            if state is not None and generator is not None:
                generator.set_state(state)
        pos.epoch_generator_state = generator.get_state() if generator is not None else None
        pos.consumed = skip
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                yield batch


def reference_indices(length: int, max_images: int | None = None) -> list[int]:
    """All indices, or `max_images` evenly spaced ones (a class-sorted set keeps every class)."""
    if max_images is None or max_images >= length:
        return list(range(length))
    if max_images < 2:
        raise ValueError(f"eval.reference_max_images must be >= 2 or null, got {max_images}")
    return [int(i) for i in torch.linspace(0, length - 1, max_images).round().long().tolist()]


class ImageDataModule(L.LightningDataModule):
    """Base class: subclasses build the datasets; this class owns the loaders.

    Datasets yield `(image, label)` with `image` a (C, H, W) tensor, either float in [-1, 1] or uint8
    in [0, 255], and `label` an int. uint8 is the fast path: a quarter of the host-to-device traffic,
    and `on_after_batch_transfer` converts to [-1, 1] on the device. With `hflip` the random
    left-right flip is done there too, per example, from a generator seeded by (seed, rank, step), so
    it costs the workers nothing and does not depend on `num_workers`.
    `batch_size` is the number of images per half-batch per device (the reference's `batch_size`), so
    each loader batch holds `2 * batch_size` images. Under DDP Lightning swaps the sampler for a
    DistributedSampler, so each rank sees its own shard. `reference_dataloader` always yields float
    images in [-1, 1], unflipped.
    """

    def __init__(
        self,
        root: str | None,
        batch_size: int,
        image_size: int,
        channels: int = 3,
        num_classes: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        seed: int = 0,
        hflip: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be a positive integer, got {batch_size}")
        self.root = root
        self.batch_size = batch_size
        self.image_size = image_size
        self.channels = channels
        self.num_classes = num_classes
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.seed = seed
        self.hflip = hflip
        self.train_set: Dataset | None = None
        self._flip_generator: torch.Generator | None = None
        self._position = LoaderPosition()
        self._restore_flip_state: Tensor | None = None

    # -- what subclasses provide ------------------------------------------------------------------
    def build_train_dataset(self) -> Dataset:
        raise NotImplementedError

    def build_reference_dataset(self) -> Dataset:
        """Real images whose feature statistics serve as the metric's reference (default: training set)."""
        return self.build_train_dataset()

    # -- Lightning hooks ----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self.build_train_dataset()
            if len(self.train_set) < 2 * self.batch_size:
                raise ValueError(
                    f"the training set holds {len(self.train_set)} images, fewer than one batch of "
                    f"2 x data.batch_size = {2 * self.batch_size}"
                )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._train_loader(self.train_set)

    def _train_loader(self, dataset: Dataset, **overrides) -> DataLoader:
        """The training loader: shuffled, whole batches of 2 x batch_size, resumable mid-epoch."""
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(self.seed))
        batch_sampler = ResumableBatchSampler(
            sampler, 2 * self.batch_size, drop_last=True, position=self._position
        )
        return DataLoader(dataset, batch_sampler=batch_sampler, **self._worker_options(**overrides))

    def _worker_options(self, **overrides) -> dict:
        """Worker, pinning and seeding options shared by the training and reference loaders."""
        options = dict(
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),  # no pinning (and no warning) on CPU
            persistent_workers=self.persistent_workers,
        )
        options.update(overrides)
        workers = options["num_workers"] > 0
        options["persistent_workers"] = options["persistent_workers"] and workers
        options["worker_init_fn"] = pl_worker_init_function if workers else None
        return options

    # -- exact resume: the loader's position and the flip generator are training state ----------------
    def state_dict(self) -> dict:
        pos = self._position
        return {
            "consumed": pos.consumed,
            "epoch_generator_state": pos.epoch_generator_state,
            "flip_generator_state": None
            if self._flip_generator is None
            else self._flip_generator.get_state(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self._position.resume = (int(state_dict["consumed"]), state_dict.get("epoch_generator_state"))
        self._restore_flip_state = state_dict.get("flip_generator_state")

    def reference_dataloader(
        self,
        batch_size: int = 256,
        rank: int = 0,
        world_size: int = 1,
        dataset: Dataset | None = None,
        max_images: int | None = None,
    ) -> DataLoader:
        """Real images in a fixed order, float in [-1, 1], unflipped (reference statistics); with
        `max_images`, that many evenly spaced ones. Under DDP each rank reads every `world_size`-th chunk
        of `batch_size` images, so the ranks together read each image once, in the batches one process
        would read."""
        dataset = self.build_reference_dataset() if dataset is None else dataset
        order = reference_indices(len(dataset), max_images)
        chunks = range(rank, math.ceil(len(order) / batch_size), world_size)
        indices = [i for c in chunks for i in order[c * batch_size : (c + 1) * batch_size]]
        return DataLoader(
            Subset(dataset, indices),
            batch_size=batch_size,
            collate_fn=collate_signed,
            **self._worker_options(persistent_workers=False),  # read once per run
        )

    def on_after_batch_transfer(self, batch, dataloader_idx: int) -> HalfBatch:
        images, labels = batch
        return self.to_half_batch(images, labels)

    def to_half_batch(self, images: Tensor, labels: Tensor) -> HalfBatch:
        """(2B, C, H, W) uint8 or float on the device -> flipped (if `hflip`), in [-1, 1], split in halves."""
        if self.trainer is not None and self.trainer.training:
            self._position.consumed += 1
        if self.hflip:
            images = random_hflip(images, self._device_generator(images.device))  # flip the uint8: cheaper
        return split_halves(to_signed(images), labels)

    def _device_generator(self, device: torch.device) -> torch.Generator:
        if self._flip_generator is None or self._flip_generator.device != device:
            trainer = self.trainer
            rank, step = (trainer.global_rank, trainer.global_step) if trainer is not None else (0, 0)
            # distinct per rank; a resumed run (step > 0) does not replay the flips of the run's start
            seed = (self.seed * 1_000_003 + rank * 7919 + step) % 2**63
            self._flip_generator = torch.Generator(device=device).manual_seed(seed)
            if self._restore_flip_state is not None:
                self._flip_generator.set_state(self._restore_flip_state)
                self._restore_flip_state = None
        return self._flip_generator
