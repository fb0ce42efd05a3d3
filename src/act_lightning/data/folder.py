"""Your own images: any folder tree of png / jpg / webp files, resized and centre-cropped to the
experiment's `image_size`. With `num_classes` set, each image's label is its top-level sub-folder
(sorted by name, as torchvision's ImageFolder does); with `num_classes: null` training is unconditional
and the tree's structure does not matter.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from act_lightning.data.base import (
    DataError,
    ImageDataModule,
    check_readable,
    files_digest,
    with_file_defaults,
)
from act_lightning.data.images import IMAGE_SUFFIXES, load_image
from act_lightning.data.storage import PackedBytes
from act_lightning.launch import rank_zero_warning

log = logging.getLogger(__name__)


def iter_files(root: Path) -> Iterator[tuple[Path, str]]:
    """Every file under `root` (recursively, hidden entries skipped, sorted) with its lower-case suffix.
    Linked folders are followed, except a link to a folder the walk is inside of (`x/up -> ..`), which
    would repeat that folder's files over and over (os.walk goes round such a loop until paths are too
    long)."""
    real: dict[str, str] = {}  # folder as walked -> its real path
    for folder, dirs, files in os.walk(root, followlinks=True):
        real[folder] = os.path.realpath(folder)
        above, child, parent = set(), folder, os.path.dirname(folder)
        while parent in real and parent != child:  # the real paths of the folders the walk is inside
            above.add(real[parent])
            child, parent = parent, os.path.dirname(parent)
        if real[folder] in above:
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(folder) / name, os.path.splitext(name)[1].lower()


def scan_images(root: Path) -> tuple[list[Path], Counter]:
    """All image files under `root` (recursively, hidden entries skipped, sorted), and a count of the
    suffixes of the other files (for the message when there are no images)."""
    images, others = [], Counter()
    for path, suffix in iter_files(root):
        if suffix in IMAGE_SUFFIXES:
            images.append(path)
        else:
            others[suffix or "(no suffix)"] += 1
    return images, others


def _not_a_folder_message(root: Path) -> str:
    return (
        f"data.root={root} is not a folder. data=folder trains on the png / jpg / webp images in a "
        f"folder tree: point data.root at it"
    )


def _no_images_message(root: Path, others: Counter) -> str:
    found = ", ".join(f"{n} {s}" for s, n in others.most_common(5)) or "nothing"
    return (
        f"data.root={root} holds no images: expected files ending in {', '.join(IMAGE_SUFFIXES)} "
        f"(in any sub-folder); found {found}"
    )


class FolderImages(Dataset):
    """`(uint8 (C, S, S) tensor, label)` for each file; paths packed so workers share them."""

    def __init__(self, paths: list[Path], labels: np.ndarray, image_size: int, channels: int = 3) -> None:
        self.paths = PackedBytes([os.fsencode(p) for p in paths])
        self.labels = labels.astype(np.int64)
        self.image_size, self.channels = image_size, channels

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, index: int) -> str:
        return os.fsdecode(self.paths[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.path(index)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as err:
            raise DataError(
                f"{path}: cannot be read ({err}); was the folder changed during training?"
            ) from err
        return load_image(data, path, self.image_size, self.channels, method="adm"), int(self.labels[index])


class FolderDataModule(ImageDataModule):
    """Images from `root`; labels from sub-folder names when `num_classes` is set.

    `verify` opens every file's header in `prepare_data` (fast) so that a file that is not an image
    stops the run before training; a file whose header is fine but whose data is truncated still
    fails when it is first read, naming the file.
    """

    def __init__(self, root: str, *, verify: bool = True, **kwargs) -> None:
        super().__init__(root=root, **with_file_defaults(kwargs, batch_size=64, image_size=64))
        if self.channels not in (1, 3):
            raise ValueError(f"data.channels must be 3 (RGB) or 1 (grey), got {self.channels}")
        self.verify = verify
        self.class_names: list[str] = []
        self._scan: tuple[list[Path], np.ndarray] | None = None

    def check_source(self) -> None:
        """`root` is a readable folder and its tree holds an image that can be read: the walk stops at
        the first one, so a large tree costs no more than a small one (the full scan, and the class
        sub-folders, are checked by `setup`)."""
        root = self.path
        if not root.is_dir():
            raise FileNotFoundError(_not_a_folder_message(root))
        check_readable(root)  # os.walk would pass over an unreadable folder in silence
        others = Counter()
        for path, suffix in iter_files(root):
            if suffix in IMAGE_SUFFIXES:
                check_readable(path)
                return
            others[suffix or "(no suffix)"] += 1
        raise FileNotFoundError(_no_images_message(root, others))

    def _files(self) -> tuple[list[Path], np.ndarray]:
        if self._scan is not None:
            return self._scan
        root = self.path
        if not root.is_dir():
            raise FileNotFoundError(_not_a_folder_message(root))
        paths, others = scan_images(root)
        if not paths:
            raise FileNotFoundError(_no_images_message(root, others))
        if others:  # a .gif, .bmp, .tiff or .heic beside the images is not read: said, not passed over
            found = ", ".join(f"{n} {s}" for s, n in others.most_common(5))
            rank_zero_warning(
                log,
                "%s: %d images (%s); %d other files are not read (%s)",
                root,
                len(paths),
                ", ".join(IMAGE_SUFFIXES),
                sum(others.values()),
                found,
            )
        labels = np.zeros(len(paths), dtype=np.int64)
        if self.num_classes:
            labels = self._labels_from_folders(root, paths)
        self._scan = (paths, labels)
        return self._scan

    def _labels_from_folders(self, root: Path, paths: list[Path]) -> np.ndarray:
        top = [p.relative_to(root).parts for p in paths]
        loose = [p for p, parts in zip(paths, top, strict=True) if len(parts) == 1]
        if loose:
            raise DataError(
                f"data.num_classes={self.num_classes} takes each image's class from its sub-folder of "
                f"{root}, but {len(loose)} images sit directly in it (e.g. {loose[0].name}); move them into "
                "class folders, or set data.num_classes=null to train unconditionally"
            )
        self.class_names = sorted({parts[0] for parts in top})
        # every sub-folder is a class, as in torchvision's ImageFolder: one without images left out would
        # shift the index of every class after it
        bare = sorted(
            d.name
            for d in root.iterdir()
            if d.is_dir() and not d.name.startswith(".") and d.name not in self.class_names
        )
        if bare:
            raise DataError(
                f"data.num_classes={self.num_classes} takes each sub-folder of {root} as a class, but "
                f"{', '.join(bare)} holds no image ({', '.join(IMAGE_SUFFIXES)}): add images, or move the "
                "folder out (each sub-folder's index is its place in name order)"
            )
        if len(self.class_names) != self.num_classes:
            shown = ", ".join(self.class_names[:10]) + (", ..." if len(self.class_names) > 10 else "")
            raise DataError(
                f"data.num_classes={self.num_classes}, but {root} has {len(self.class_names)} class "
                f"sub-folders with images ({shown}); set data.num_classes={len(self.class_names)}, or null "
                "to train unconditionally"
            )
        index = {name: i for i, name in enumerate(self.class_names)}
        return np.array([index[parts[0]] for parts in top], dtype=np.int64)

    def label_names(self) -> list[str] | None:
        return list(self.class_names) if self.num_classes and self.class_names else None

    def count_train_images(self, enough: int) -> int:
        """The images under `root`, counted up to `enough` (the walk stops there: cheap for any tree)."""
        count = 0
        for _, suffix in iter_files(self.path):
            count += suffix in IMAGE_SUFFIXES
            if count >= enough:
                break
        return count

    def prepare_data(self) -> None:
        paths, _ = self._files()
        if self.verify:
            from tqdm.auto import tqdm

            for path in tqdm(paths, desc=f"checking {self.path}", unit="img", disable=len(paths) < 10_000):
                try:
                    with Image.open(path) as image:
                        image.size  # noqa: B018 - reading the header is the check
                except Exception as err:
                    raise DataError(
                        f"{path}: not an image that can be decoded ({type(err).__name__}: {err})"
                    ) from err

    def build_train_dataset(self) -> Dataset:
        paths, labels = self._files()
        if self.class_names:
            log.info(
                "%d images in %d classes: %s", len(paths), len(self.class_names), ", ".join(self.class_names)
            )
        return FolderImages(paths, labels, self.image_size, self.channels)

    def build_reference_dataset(self) -> Dataset:
        return self.train_set if self.train_set is not None else self.build_train_dataset()

    def reference_fingerprint(self) -> str:
        """Each image's path under `root`, size and modification time: images replaced by others (the
        same count) make the cached reference statistics be computed anew."""
        paths, _ = self._files()
        return files_digest(paths, self.path)
