"""What every DataModule shares: loader settings, worker seeding, the global batch and its shards, and the
split of each batch into the generator half and the discriminator half that one ACT iteration consumes
(docs/algorithm.md, section 3)."""

from __future__ import annotations

import hashlib
import itertools
import math
import os
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Subset, default_collate
from torch.utils.data.distributed import DistributedSampler

from act_lightning.checks import check_count
from act_lightning.compat import ignore_unresumable_loader_warning
from act_lightning.seeds import FLIP, mix_seed


def files_digest(paths, root: Path) -> str:
    """A digest of files as they are now: each one's path under `root`, size and modification time (the
    reference fingerprint of data a user can replace at the same count)."""
    digest = hashlib.sha256()
    for path in paths:
        st = Path(path).stat()
        digest.update(f"{Path(path).relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class DataError(ValueError):
    """A data file exists but is not what it should be (corrupt, truncated, wrong shape, bad checksum)."""


class DataUnavailable(FileNotFoundError):
    """The data set is not under data.root and could not be fetched there: found when Lightning prepares
    the data (`prepare_data`, inside `fit`), so the training command reports it in one line as a refusal."""


def to_signed(images: Tensor) -> Tensor:
    """uint8 images in [0, 255] -> float32 in [-1, 1]; float images pass through unchanged."""
    if images.dtype == torch.uint8:
        return images.float().div_(127.5).sub_(1.0)
    return images


def random_hflip(
    images: Tensor, generator: torch.Generator | None = None, rank: int = 0, world_size: int = 1
) -> Tensor:
    """Mirror each image of a (B, C, H, W) batch left-right with probability 1/2, on the batch's device.
    Under DDP `images` is rank `rank`'s share of a global batch (`shard_of_global_batch`): the coins are
    drawn for the whole global batch and each image takes its global position's, so one device and
    several flip the same images (the generator seeded alike on every rank)."""
    n = images.shape[0]
    flip = torch.rand(n * world_size, device=images.device, generator=generator) < 0.5  # (global B,)
    if world_size > 1:  # slices of the device tensor: nothing crosses from the host
        flip = torch.cat(_shard_parts(flip, rank, world_size))
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def collate_signed(samples) -> tuple[Tensor, Tensor]:
    """default_collate, then uint8 -> [-1, 1] (for loaders that bypass `on_after_batch_transfer`)."""
    images, labels = default_collate(samples)
    return to_signed(images), labels


class HalfBatch(NamedTuple):
    """One iteration's data on one device: B_G images for the generator update, B_D for the
    discriminator update (its first half is noised into fakes, its second half is the real half). With
    `micro` > 1 the iteration accumulates gradients over that many micro-batches."""

    gen: Tensor  # (B_G, C, H, W) in [-1, 1]
    gen_labels: Tensor  # (B_G,) int64; zeros for unconditional data
    disc: Tensor  # (B_D, C, H, W) in [-1, 1]: [fake half | real half]
    disc_labels: Tensor  # (B_D,)
    micro: int = 1

    def micro_batches(self) -> list[HalfBatch]:
        """The `micro` micro-batches: the i-th takes the i-th slice of the generator half, of the fake
        half and of the real half, so accumulating over them sees every example in the role it has in
        the whole batch."""
        if self.micro == 1:
            return [self]
        fake, real = self.disc.chunk(2)
        fake_y, real_y = self.disc_labels.chunk(2)
        parts = zip(
            self.gen.chunk(self.micro),
            self.gen_labels.chunk(self.micro),
            fake.chunk(self.micro),
            real.chunk(self.micro),
            fake_y.chunk(self.micro),
            real_y.chunk(self.micro),
        )
        return [HalfBatch(g, gy, torch.cat([f, r]), torch.cat([fy, ry])) for g, gy, f, r, fy, ry in parts]


def split_halves(images: Tensor, labels: Tensor, micro: int = 1) -> HalfBatch:
    """Split a (2B, ...) batch into its generator and discriminator halves."""
    if images.shape[0] % 2:
        raise ValueError(f"an ACT batch holds two equal halves; got {images.shape[0]} images")
    gen, disc = images.chunk(2)
    gen_labels, disc_labels = labels.chunk(2)
    return HalfBatch(gen, gen_labels, disc, disc_labels, micro)


class LoaderPosition:
    """Where the training loader stands within its epoch, shared by the DataModule (which counts the
    batches training consumed) and the batch sampler (which replays the epoch's order on resume)."""

    def __init__(self) -> None:
        self.consumed = 0  # batches of the current epoch that reached the training step
        self.epoch_generator_state: Tensor | None = None  # shuffling generator at the epoch's start
        self.resume: tuple[int, Tensor | None] | None = None


def shard_of_global_batch(indices: list[int], rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s share of a global batch laid out [generator half | fake half | real half]: the
    rank's contiguous slice of each, so the ranks' shares are [gen_r | fake_r | real_r] and one device
    with the whole global batch sees the same examples in the same roles."""
    gen, fake, real = _shard_parts(indices, rank, world_size)
    return gen + fake + real


def _shard_parts(batch, rank: int, world_size: int) -> tuple:
    """(gen_r, fake_r, real_r): rank `rank`'s slices of a global batch's three parts (a list, or a tensor
    along its first axis: views, no copy)."""
    half = len(batch) // 2
    gen, fake, real = batch[:half], batch[half : half + half // 2], batch[half + half // 2 :]
    n, m = half // world_size, half // 2 // world_size
    return gen[rank * n : (rank + 1) * n], fake[rank * m : (rank + 1) * m], real[rank * m : (rank + 1) * m]


class ResumableBatchSampler(BatchSampler):
    """A BatchSampler over global batches (all devices together) that yields this rank's share of each,
    and that can resume mid-epoch: on the first epoch after a restore it puts the shuffling generator
    back to where that epoch began and skips the batches already trained on (index lists only; no image
    is loaded for them). Every rank walks the same order (same seed), so no DistributedSampler is needed:
    the Trainer runs with `use_distributed_sampler=False`."""

    def __init__(
        self,
        sampler,
        batch_size: int,
        drop_last: bool,
        position: LoaderPosition | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__(sampler, batch_size, drop_last)
        self.position = position if position is not None else LoaderPosition()
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        if isinstance(self.sampler, DistributedSampler):
            raise RuntimeError(
                "trainer.use_distributed_sampler must be false: the data module shards every global batch "
                "itself (see conf/trainer/default.yaml)"
            )
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
        # len(self) batches and no more, as the training loop takes them: running the sampler on to its
        # end would draw the next shuffle from the generator (RandomSampler draws one more permutation
        # for the remainder), so a resume at an epoch's end, which skips all of that epoch, would change
        # every later epoch's order
        for i, batch in enumerate(itertools.islice(super().__iter__(), len(self))):
            if i >= skip:
                yield (
                    shard_of_global_batch(batch, self.rank, self.world_size) if self.world_size > 1 else batch
                )


def _positive_even(value: object) -> bool:
    """A batch size that splits into halves: an integer >= 2, even (not a bool, a float or a string)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 2 and value % 2 == 0


def check_batch_sizes(batch_size: object, global_batch_size: object) -> None:
    """data.batch_size and data.global_batch_size (null or a number): positive even integers."""
    if not _positive_even(batch_size):
        raise ValueError(
            "data.batch_size must be a positive even number (the discriminator's half splits into a "
            f"fake and a real half), got {batch_size!r}"
        )
    if global_batch_size is not None and not _positive_even(global_batch_size):
        raise ValueError(
            f"data.global_batch_size must be a positive even number or null, got {global_batch_size!r}"
        )


def _check_one_global_batch(images: int, per_device: int, world_size: int) -> None:
    if images < 2 * per_device * world_size:
        raise ValueError(
            f"the training set holds {images} images, fewer than one global batch of "
            f"2 x {per_device * world_size} (data.batch_size / data.global_batch_size, both halves)"
        )


def with_file_defaults(kwargs: dict, **defaults) -> dict:
    """The `ImageDataModule` arguments of a source read from files: the config's `kwargs` over the
    source's own `defaults`, over what suits every such source (random flips; worker processes that
    decode in parallel, kept alive between epochs; pinned host memory for the copy to the device)."""
    return dict(hflip=True, num_workers=8, pin_memory=True, persistent_workers=True) | defaults | kwargs


def check_readable(path: Path) -> None:
    """Raise, naming `path`, when this process cannot read the file or list the folder: at start-up,
    rather than in a worker process halfway through the first epoch."""
    try:
        if path.is_dir():
            with os.scandir(path):
                pass
        else:
            with open(path, "rb"):
                pass
    except OSError as err:
        raise type(err)(
            f"{path} cannot be read ({err.strerror or err}): give this user read access, or point data.root "
            "at a readable copy"
        ) from err


def reference_indices(length: int, max_images: int | None = None) -> list[int]:
    """All indices, or `max_images` evenly spaced ones (a class-sorted set keeps every class)."""
    if max_images is None or max_images >= length:
        return list(range(length))
    if max_images < 2:
        raise ValueError(f"eval.reference_max_images must be >= 2 or null, got {max_images}")
    return [int(i) for i in torch.linspace(0, length - 1, max_images).round().long().tolist()]


class ImageDataModule(L.LightningDataModule):
    """Base class: subclasses build the datasets (and check their files); this class owns the loaders.

    Datasets yield `(image, label)` with `image` a (C, H, W) tensor, either float in [-1, 1] or uint8
    in [0, 255], and `label` an int. uint8 is the fast path: a quarter of the host-to-device traffic,
    and `on_after_batch_transfer` converts to [-1, 1] on the device. With `hflip` the random
    left-right flip is done there too, per example, from coins drawn for the whole global batch by a
    generator seeded by (seed, batch count), each image taking its global position's coin, so it costs
    the workers nothing and depends neither on `num_workers` nor on the number of devices.
    `batch_size` is the number of images per half-batch per device and forward pass (the reference's
    `batch_size`). `global_batch_size`, when set, is the number of images per half-batch over all
    devices: each device then takes global / devices of them, in micro-batches of `batch_size` whose
    gradients accumulate (`HalfBatch.micro`), so a run has the same global batch on any number of
    devices. Each loader batch holds a device's two halves; the ranks share each global batch (see
    `shard_of_global_batch`). `reference_dataloader` always yields float images in [-1, 1], unflipped.

    Subclasses take their own arguments and pass the ones below on as keyword arguments (their own
    defaults for them through `with_file_defaults`), so each argument and its meaning is written once.
    `root` is the folder a source reads (None for sources held in memory).
    """

    def __init__(
        self,
        *,
        root: str | Path | None = None,
        batch_size: int,
        global_batch_size: int | None = None,
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
        check_batch_sizes(batch_size, global_batch_size)
        check_count(num_workers, "data.num_workers", 0)  # 0: load in the main process
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
        ):  # one meaning for every source: 0 is not a second spelling of null
            raise ValueError(
                "data.num_classes must be null (unconditional) or a number of classes >= 1, "
                f"got {num_classes!r}"
            )
        self.root = None if root is None else str(root)
        self.batch_size = batch_size
        self.global_batch_size = global_batch_size
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
        self._flips: int | None = None  # batches flipped so far in the run (None: not known yet)
        self._position = LoaderPosition()
        self._micro = 1  # micro-batches per iteration on this device (set with the training loader)

    @property
    def path(self) -> Path:
        """`data.root` as an absolute path (`~` expanded): the folder read, and named in messages."""
        if self.root is None:
            raise ValueError(f"data.root is not set: {type(self).__name__} reads its images from a folder")
        return Path(self.root).expanduser().resolve()

    # -- what subclasses provide ------------------------------------------------------------------
    def check_source(self) -> None:
        """Check that the data this module needs are there and readable, before the run creates any
        logger or folder: cheaply (no checksums, no decoding), creating nothing and downloading nothing.
        Raises the errors `prepare_data` and `setup` would raise later, naming the missing or unreadable
        file or folder, where it belongs and where to get it. Sources held in memory have nothing to
        check."""

    def build_train_dataset(self) -> Dataset:
        raise NotImplementedError

    def label_names(self) -> list[str] | None:
        """The name of each class index, where the data name their classes themselves (a folder's class
        sub-folders), once `setup` read them; None for an unconditional run or a set whose labels are its
        official indices. Checkpoints keep them (`act_label_names`): a resume refuses a changed mapping."""
        return None

    def count_train_images(self, enough: int) -> int | None:
        """How many training images there are, counted up to `enough` at least (a source may stop there),
        or None where that cannot be told cheaply before `setup` (sets too large to be the problem)."""
        return None

    def check_train_size(self, world_size: int) -> None:
        """At start-up: the training set holds one global batch on `world_size` devices, where the source
        can count that cheaply (`count_train_images`); the training loader checks it again in any case."""
        per_device, _ = self.batch_layout(world_size)
        have = self.count_train_images(2 * per_device * world_size)
        if have is not None:
            _check_one_global_batch(have, per_device, world_size)

    def build_reference_dataset(self) -> Dataset:
        """Real images whose feature statistics serve as the metric's reference (default: training set)."""
        return self.build_train_dataset()

    def reference_fingerprint(self) -> str | None:
        """A digest of the reference images as they are now, kept with cached reference statistics
        (`eval.reference_cache`), which are computed anew when it changes: for data a user can change
        without changing their count (a folder's images replaced, a set prepared again). None for an
        official release that is checked against its own checksums."""
        return None

    # -- the global batch ---------------------------------------------------------------------------
    def _devices(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def batch_layout(self, world_size: int) -> tuple[int, int]:
        """(images per half-batch per device, micro-batches per iteration) on `world_size` devices."""
        if self.global_batch_size is None:
            return self.batch_size, 1
        if self.global_batch_size % world_size or (self.global_batch_size // world_size) % 2:
            raise ValueError(
                f"data.global_batch_size={self.global_batch_size} images per half-batch cannot be shared by "
                f"{world_size} devices (trainer.devices x trainer.num_nodes) in even parts: use a multiple "
                f"of {2 * world_size}"
            )
        per_device = self.global_batch_size // world_size
        if per_device <= self.batch_size:
            return per_device, 1
        if per_device % self.batch_size:
            raise ValueError(
                f"data.global_batch_size={self.global_batch_size} gives {per_device} images per half-batch "
                f"on each of {world_size} devices, which micro-batches of data.batch_size={self.batch_size} "
                "do not divide: choose a data.batch_size that divides it"
            )
        return per_device, per_device // self.batch_size

    # -- Lightning hooks ----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self.build_train_dataset()

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._train_loader(self.train_set)

    def _train_loader(self, dataset: Dataset, **overrides) -> DataLoader:
        """The training loader: shuffled global batches (both halves, all devices), of which this rank
        loads its share; resumable mid-epoch."""
        rank, world = self._devices()
        per_device, self._micro = self.batch_layout(world)
        global_images = 2 * per_device * world
        _check_one_global_batch(len(dataset), per_device, world)
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(self.seed))
        batch_sampler = ResumableBatchSampler(
            sampler, global_images, drop_last=True, position=self._position, rank=rank, world_size=world
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

    # -- exact resume: the loader's position and the count of flipped batches are training state ------
    def state_dict(self) -> dict:
        pos = self._position
        # restored but not yet applied (the loader has not started its epoch: a checkpoint saved before
        # the launch's first iteration, by a stop or a best value at its start) is the position still
        consumed, generator_state = pos.resume or (pos.consumed, pos.epoch_generator_state)
        return {"consumed": consumed, "epoch_generator_state": generator_state, "flips": self._flips}

    def load_state_dict(self, state_dict: dict) -> None:
        self._position.resume = (int(state_dict["consumed"]), state_dict.get("epoch_generator_state"))
        # (a checkpoint from before the count was kept has a flip generator's state instead, one rank's:
        # such a run's flips go on from its iteration, as _flip_generator_for says)
        self._flips = state_dict.get("flips")
        ignore_unresumable_loader_warning()  # the position just restored makes this resume exact

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
        if self.hflip:  # flip the uint8: cheaper
            images = random_hflip(images, self._flip_generator_for(images.device), *self._devices())
        return split_halves(to_signed(images), labels, self._micro)

    def _flip_generator_for(self, device: torch.device) -> torch.Generator:
        """The generator of one global batch's flips, seeded from (seed, n, FLIP, 0), n the batches flipped
        before it in the run, alike on every rank (each takes its share of the global batch's coins:
        `random_hflip`), with no generator state to save. Every rank flips its share of every global
        batch, so n is the same on all of them and the one count a checkpoint holds resumes the flips
        exactly. (The 0 where a rank stood: one device flips as it did when each rank had its own.)"""
        trainer = self.trainer
        if self._flips is None:
            # a new run, or a checkpoint without the count: from the ACT iterations done, as the module
            # counts them (`trainer.global_step` counts optimiser steps, two per iteration with a
            # discriminator; a module without `k` counts from 0), so a resumed run does not replay the
            # flips of the run's start
            self._flips = 0 if trainer is None else getattr(trainer.lightning_module, "k", 0)
        if self._flip_generator is None or self._flip_generator.device != device:
            self._flip_generator = torch.Generator(device=device)
        self._flip_generator.manual_seed(mix_seed(self.seed, self._flips, FLIP, 0))
        self._flips += 1
        return self._flip_generator
