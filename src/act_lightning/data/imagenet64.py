"""ImageNet 64x64 (class-conditional): the official downsampled release, converted once into the
prepared form of `storage.py` (memory-mapped uint8 images, labels 0..999, checksum manifest).

The official files (https://image-net.org/download-images.php, "Downsampled ImageNet 64x64"):
`train_data_batch_1.npz` .. `train_data_batch_10.npz` and `val_data.npz`, each holding `data`, uint8
of shape (N, 12288) = 3 x 64 x 64 in channel-major order, and `labels`, 1..1000.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from act_lightning.data import storage
from act_lightning.data.base import DataError, ImageDataModule, check_readable, with_file_defaults

log = logging.getLogger(__name__)

SOURCE = "imagenet64"
URL = "https://image-net.org/download-images.php"
TRAIN_FILES = [f"train_data_batch_{i}.npz" for i in range(1, 11)]
VAL_FILE = "val_data.npz"
SIZE, CHANNELS, NUM_CLASSES = 64, 3, 1000
ROW = CHANNELS * SIZE * SIZE  # 12288 bytes per image


def _official_hint(where: Path) -> str:
    return (
        f"Get them from {URL} (Downsampled ImageNet 64x64, the npz release: Imagenet64_train_part1_npz.zip, "
        f"Imagenet64_train_part2_npz.zip, Imagenet64_val_npz.zip) and unzip them into {where}"
    )


def find_official_files(src: Path, require_val: bool = False) -> tuple[list[Path], Path | None]:
    """The ten training batches (and the validation file, if present) under `src`, searched recursively."""

    def find(name: str, one: bool = True) -> Path | None:
        hits = sorted(src.rglob(name)) if src.is_dir() else []
        if len(hits) > 1 and one:  # e.g. ImageNet 32's files of the same names beside the 64x64 ones
            raise FileNotFoundError(
                f"ImageNet 64x64: {len(hits)} files called {name} under {src} ({', '.join(map(str, hits))}); "
                "give the folder that holds only the 64x64 release (Imagenet64_*_npz)"
            )
        return hits[0] if hits else None

    train = {name: find(name) for name in TRAIN_FILES}
    val = find(VAL_FILE)
    missing = [name for name, path in train.items() if path is None] + (
        [VAL_FILE] if require_val and val is None else []
    )
    if missing:
        # the other release: Python pickles, never read (any copy of it will do for the hint)
        pickled = find(TRAIN_FILES[0].removesuffix(".npz"), one=False)
        found = (
            f" {pickled} is from the pickled release (Imagenet64_train_part1.zip, no .npz suffix), which "
            "this library does not read (unpickling runs code)."
            if pickled is not None
            else ""
        )
        raise FileNotFoundError(
            f"ImageNet 64x64: {', '.join(missing)} not found under {src}. Expected the official downsampled "
            f"release there: {TRAIN_FILES[0]} .. {TRAIN_FILES[-1]} and {VAL_FILE}.{found} "
            f"{_official_hint(src)}."
        )
    return [train[name] for name in TRAIN_FILES], val


def _npz_header(path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array in an .npz, read from its header only (no data, no pickles)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if f"{key}.npy" not in names:
                raise DataError(
                    f"{path}: no array `{key}` (found {', '.join(n.removesuffix('.npy') for n in names)})"
                )
            with archive.open(f"{key}.npy") as f:
                version = np.lib.format.read_magic(f)
                read_header = {
                    (1, 0): np.lib.format.read_array_header_1_0,
                    (2, 0): np.lib.format.read_array_header_2_0,
                }
                if version not in read_header:
                    raise ValueError(f"unsupported .npy format version {version}")
                shape, _, dtype = read_header[version](f)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise DataError(
            f"{path}: not a valid .npz archive ({type(err).__name__}: {err}); truncated download?"
        ) from err
    return shape, dtype


def count_images(path: Path) -> int:
    """The number of images in an official file, checked from the array headers alone."""
    shape, dtype = _npz_header(path, "data")
    if dtype != np.uint8 or len(shape) != 2 or shape[1] != ROW:
        raise DataError(
            f"{path}: `data` should be uint8 of shape (N, {ROW}) (3 x 64 x 64, channel-major); found "
            f"{dtype} of shape {shape}"
        )
    label_shape, label_dtype = _npz_header(path, "labels")
    if not np.issubdtype(label_dtype, np.integer) or label_shape != (shape[0],):
        raise DataError(
            f"{path}: `labels` should be {shape[0]} integers 1..1000, one per image; found {label_dtype} of "
            f"shape {label_shape} (object arrays are never unpickled)"
        )
    return shape[0]


def read_official_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """`data` as uint8 (N, 3, 64, 64) and `labels` as int16 0..999, with every check the format implies."""
    count_images(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            data, labels = npz["data"], np.asarray(npz["labels"])
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as err:
        raise DataError(
            f"{path}: could not be read ({type(err).__name__}: {err}); truncated or corrupt?"
        ) from err
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{path}: `labels` should be {len(data)} integers (one per image); found {labels.dtype} of shape "
            f"{labels.shape}"
        )
    if len(labels) and (labels.min() < 1 or labels.max() > NUM_CLASSES):
        raise DataError(
            f"{path}: labels must lie in 1..{NUM_CLASSES} (the official release counts from 1); found "
            f"{labels.min()}..{labels.max()}"
        )
    return data.reshape(-1, CHANNELS, SIZE, SIZE), (labels - 1).astype(np.int16)


def prepare_imagenet64(src: Path, dst: Path, progress: bool = True) -> dict:
    """Convert the official .npz files under `src` into the prepared form in `dst`; returns the manifest."""
    from tqdm.auto import tqdm

    src, dst = Path(src).expanduser().resolve(), Path(dst).expanduser().resolve()
    train_files, val_file = find_official_files(src)
    splits = {"train": train_files} | ({"val": [val_file]} if val_file is not None else {})
    manifest_splits = {}
    counts = {split: [count_images(path) for path in files] for split, files in splits.items()}  # headers
    total = sum(map(sum, counts.values()))
    with storage.no_partial_output(dst):  # a damaged file, Ctrl-C: nothing half-written is left
        need = total * (ROW + 2)  # uint8 images, int16 labels
        what = f"the prepared form of {total} images"
        storage.check_free_space(dst, need, what, "free space there, or prepare into another folder")
        for split, files in splits.items():
            shape = (CHANNELS, SIZE, SIZE)
            images, labels = storage.create_arrays(dst, split, sum(counts[split]), shape, labels=True)
            start = 0
            for path in tqdm(
                files, desc=f"imagenet64 {split}", unit="file", disable=not progress, dynamic_ncols=True
            ):
                data, label = read_official_file(path)
                images[start : start + len(data)] = data
                labels[start : start + len(data)] = label
                start += len(data)
            images.flush(), labels.flush()
            del images, labels
            manifest_splits[split] = {
                "count": start,
                "images": f"{split}_images.npy",
                "labels": f"{split}_labels.npy",
            }
        # inside: the folder stays this preparation's until its manifest, written last, says it is done
        return storage.write_manifest(
            dst,
            SOURCE,
            manifest_splits,
            extra={"image_size": SIZE, "channels": CHANNELS, "num_classes": NUM_CLASSES, "from": str(src)},
            progress=progress,
        )


class ImageNet64DataModule(ImageDataModule):
    """Downsampled ImageNet 64x64 from its prepared form under `root`.

    If `root` holds the official .npz files but no prepared form yet, `prepare_data` converts them there
    (once, on rank 0). `num_classes=1000` yields the class labels; null trains unconditionally.
    """

    def __init__(self, root: str, *, verify: bool = True, **kwargs) -> None:
        kwargs = with_file_defaults(kwargs, batch_size=320, image_size=SIZE, num_classes=NUM_CLASSES)
        super().__init__(root=root, **kwargs)
        if self.image_size != SIZE or self.channels != CHANNELS:
            raise ValueError(
                f"data=imagenet64 holds 64x64 RGB images: data.image_size must be 64 and data.channels 3, "
                f"got {self.image_size} and {self.channels}"
            )
        if self.num_classes not in (None, NUM_CLASSES):
            raise ValueError(
                f"data.num_classes must be 1000 (class-conditional) or null, got {self.num_classes}"
            )
        self.verify = verify

    def check_source(self) -> None:
        """The prepared form's files are all there at their recorded sizes (no hashing), or the official
        files are, with well-formed headers, in a folder `prepare_data` can write the prepared form to."""
        root = self.path
        if (root / storage.MANIFEST).is_file():
            manifest = storage.read_manifest(root, SOURCE)
            storage.check_files(root, manifest, verify=False)
            for name in manifest["files"]:
                check_readable(root / name)
            return
        if not root.is_dir() or not any(root.rglob("train_data_batch_*.npz")):
            raise FileNotFoundError(self._not_found_message())
        train_files, val_file = find_official_files(root)
        for path in [*train_files, *([val_file] if val_file is not None else [])]:
            count_images(path)  # reads the array headers only
        if not os.access(root, os.W_OK | os.X_OK):
            raise PermissionError(
                f"data.root={root} holds the official ImageNet 64x64 files but is not writable, so their "
                f"prepared form cannot be written next to them: run `python -m act_lightning.prepare "
                f"imagenet64 {root} DST` and set data.root=DST"
            )

    def prepare_data(self) -> None:
        root = self.path
        if not (root / storage.MANIFEST).is_file():
            if not root.is_dir() or not any(root.rglob("train_data_batch_*.npz")):
                raise FileNotFoundError(self._not_found_message())
            with storage.one_at_a_time(root):  # other nodes' rank 0, on a shared file system
                if not (root / storage.MANIFEST).is_file():  # not converted meanwhile by one of them
                    log.info(
                        "converting the official ImageNet 64x64 files under %s into its prepared form", root
                    )
                    prepare_imagenet64(root, root)
        storage.check_files(root, storage.read_manifest(root, SOURCE), verify=self.verify)

    def _not_found_message(self) -> str:
        root = self.path
        return (
            f"ImageNet 64x64 not found under data.root={root}. Expected either its prepared form "
            f"({root / storage.MANIFEST}, train_images.npy, train_labels.npy), written by `python -m "
            f"act_lightning.prepare imagenet64 SRC {root}`, or the official downsampled release in {root} "
            f"({TRAIN_FILES[0]} .. {TRAIN_FILES[-1]}, {VAL_FILE}), converted on first use. "
            f"{_official_hint(root)}.{storage.unfinished(root)}"
        )

    def _split(self, name: str) -> storage.PreparedArrays:
        root = self.path
        if not (root / storage.MANIFEST).is_file():
            raise FileNotFoundError(self._not_found_message())
        manifest = storage.read_manifest(root, SOURCE)
        if name not in manifest["splits"]:
            raise FileNotFoundError(
                f"{root / storage.MANIFEST}: no {name!r} split (the {VAL_FILE} was not converted)"
            )
        dataset = storage.PreparedArrays(root, manifest["splits"][name], conditional=bool(self.num_classes))
        if dataset.image_shape != (CHANNELS, SIZE, SIZE):
            raise DataError(
                f"{dataset.images_path}: images of shape {dataset.image_shape}, expected (3, 64, 64)"
            )
        labels = dataset.labels()
        if labels is None:
            raise DataError(f"{root / storage.MANIFEST}: the {name!r} split has no labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
            raise DataError(
                f"{dataset.labels_path}: labels must lie in 0..999, found {labels.min()}..{labels.max()}"
            )
        return dataset

    def build_train_dataset(self) -> Dataset:
        return self._split("train")

    def build_reference_dataset(self) -> Dataset:
        return self.train_set if self.train_set is not None else self._split("train")

    def reference_fingerprint(self) -> str:
        return storage.manifest_digest(storage.read_manifest(self.path, SOURCE), "train")

    def build_val_dataset(self) -> Dataset:
        """The 50,000 validation images (if `val_data.npz` was converted)."""
        return self._split("val")
