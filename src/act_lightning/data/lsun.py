"""LSUN (Cat by default) from its official LMDB, whose values are encoded images (webp or jpeg), or from
the prepared form written by `python -m act_lightning.prepare lsun_cat256 SRC DST`.

Images are resized so the short side equals `image_size` (one BOX resize) and centre-cropped, as the
LSUN LMDBs were converted for ADM and the consistency-model papers. The LMDB is opened once per worker
process, read-only and without locks; the keys are listed once per rank into two flat arrays.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from act_lightning.data import storage
from act_lightning.data.base import DataError, ImageDataModule, check_readable, with_file_defaults
from act_lightning.data.images import load_image

log = logging.getLogger(__name__)

SOURCE = "lsun"
URLS = "http://dl.yf.io/lsun/objects/{category}.zip (see https://github.com/fyu/lsun)"
CROP = "box"


_ENVS: dict[tuple[int, str], object] = {}  # (pid, folder) -> this process's LMDB environment


def open_lmdb(path: Path):
    """This process's environment for an LMDB folder: opened once per process (lmdb allows one per
    process; one must not be used across a fork), read-only and without locks (many readers, no writer)."""
    import lmdb

    key = (os.getpid(), str(path))
    if key not in _ENVS:
        try:
            _ENVS[key] = lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False)
        except lmdb.Error as err:
            raise DataError(
                f"{path / 'data.mdb'}: not a readable LMDB ({type(err).__name__}: {err})"
            ) from err
        env = _ENVS[key]
        # a file cut short (an interrupted unzip or copy) is mapped whole: a read past its end would kill the
        # process with a bus error, naming nothing; the database says how many pages it has
        needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        size = (path / "data.mdb").stat().st_size
        if size < needed:
            close_lmdb(path)
            raise DataError(
                f"{path / 'data.mdb'}: {size:,} bytes, but the database it holds needs {needed:,}: the file "
                "was cut short (an interrupted unzip or copy?); unpack it again from its archive, "
                + URLS.format(category=path.name.removesuffix("_train_lmdb"))
            )
    return _ENVS[key]


def close_lmdb(path: Path) -> None:
    env = _ENVS.pop((os.getpid(), str(path)), None)
    if env is not None:
        env.close()


def find_lmdb(root: Path, category: str = "cat") -> Path | None:
    """The LMDB folder under `root`: root itself, root/<category> (the unzipped official archive) or
    root/<category>_train_lmdb (the scene categories' naming)."""
    for candidate in (root, root / category, root / f"{category}_train_lmdb"):
        if (candidate / "data.mdb").is_file():
            return candidate
    return None


def list_keys(path: Path, progress: bool = False) -> storage.PackedBytes:
    from tqdm.auto import tqdm

    with open_lmdb(path).begin(write=False) as txn:
        total = txn.stat()["entries"]
        keys = list(
            tqdm(
                txn.cursor().iternext(keys=True, values=False),
                total=total,
                desc=f"keys of {path.name}",
                unit="key",
                disable=not progress,
                dynamic_ncols=True,
            )
        )
    if not keys:
        raise DataError(f"{path / 'data.mdb'}: the LMDB holds no images")
    return storage.PackedBytes(keys)


class LMDBImages(Dataset):
    """Values of an LMDB, decoded, centre-cropped and resized: `(uint8 (C, S, S) tensor, 0)`."""

    def __init__(self, path: Path, keys: storage.PackedBytes, image_size: int, channels: int = 3) -> None:
        self.path, self.keys = path, keys
        self.image_size, self.channels = image_size, channels

    def read(self, index: int) -> tuple[bytes, str]:
        key = self.keys[index]
        with open_lmdb(self.path).begin(write=False) as txn:
            value = txn.get(key)
        source = f"{self.path / 'data.mdb'} key {key.decode(errors='backslashreplace')!r}"
        if value is None:
            raise DataError(f"{source}: the key is listed but has no value (was the LMDB modified?)")
        return value, source

    def __len__(self) -> int:
        return len(self.keys)

    def image(self, index: int) -> torch.Tensor:
        value, source = self.read(index)
        return load_image(value, source, self.image_size, self.channels, method=CROP)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            return self.image(index), 0
        except DataError as err:  # the order is the run's: a resume would meet it again, at the same point
            raise DataError(
                f"{err}; to train without the broken images, prepare the data leaving them out: python -m "
                f"act_lightning.prepare lsun_cat256 --skip-broken {self.path} DST, then train with "
                "data.root=DST"
            ) from None


# -- the prepared form -------------------------------------------------------------------------------
def _decode_chunk(args: tuple[str, list[bytes], int, int]) -> list[tuple[np.ndarray | None, str]]:
    path, keys, size, channels = args
    dataset = LMDBImages(Path(path), storage.PackedBytes(keys), size, channels)
    out = []
    for i in range(len(keys)):
        try:
            out.append((dataset.image(i).numpy(), ""))
        except DataError as err:
            out.append((None, str(err)))
    return out


def prepare_lsun(
    src: Path,
    dst: Path,
    category: str = "cat",
    image_size: int = 256,
    channels: int = 3,
    max_images: int | None = None,
    workers: int = 0,
    skip_broken: bool = False,
    progress: bool = True,
) -> dict:
    """Decode, crop and resize every image of the LMDB under `src` once, into memory-mapped uint8 arrays
    in `dst` (image_size^2 x channels bytes per image: about 300 GiB for all 1.66M images of LSUN Cat
    at 256)."""
    src, dst = Path(src).expanduser().resolve(), Path(dst).expanduser().resolve()
    lmdb_path, keys = _open_source(src, category, progress)
    count = len(keys) if max_images is None else min(max_images, len(keys))
    with storage.no_partial_output(dst):  # an image that does not decode, Ctrl-C: nothing half-written
        storage.check_free_space(
            dst,
            count * channels * image_size**2,
            f"the prepared form of {count} images at {image_size}x{image_size}",
            "use --max-images, or train from the LMDB directly",
        )
        shape = (channels, image_size, image_size)
        images, _ = storage.create_arrays(dst, "train", count, shape, labels=False)
        chunk = 64
        jobs = [
            (str(lmdb_path), [keys[i] for i in range(s, min(s + chunk, count))], image_size, channels)
            for s in range(0, count, chunk)
        ]
        written, skipped = _decode_into(
            images, jobs, count, workers, skip_broken, f"lsun {category} {image_size}", progress
        )
        images.flush()
        del images
        if skipped:
            log.warning("left out %d images that do not decode", len(skipped))
        split = {"count": written, "images": "train_images.npy", "labels": None}
        extra = {
            "category": category,
            "image_size": image_size,
            "channels": channels,
            "crop": CROP,
            "from": str(lmdb_path),
            "skipped": skipped,
            "max_images": max_images
            if count < len(keys)
            else None,  # a subset: said whenever a run trains on it
        }
        # inside: the folder stays this preparation's until its manifest, written last, says it is done
        return storage.write_manifest(dst, SOURCE, {"train": split}, extra=extra, progress=progress)


def _open_source(src: Path, category: str, progress: bool) -> tuple[Path, storage.PackedBytes]:
    """The LMDB folder under `src` and its keys; FileNotFoundError that says where to get it if none."""
    lmdb_path = find_lmdb(src, category)
    if lmdb_path is None:
        raise FileNotFoundError(_not_found_message(src, category, prepared_too=False))
    return lmdb_path, list_keys(lmdb_path, progress=progress)


def _decode_into(
    images: np.ndarray,
    jobs: list[tuple[str, list[bytes], int, int]],
    count: int,
    workers: int,
    skip_broken: bool,
    desc: str,
    progress: bool,
) -> tuple[int, list[str]]:
    """Decode the chunks of `jobs` (in `workers` spawned processes, or in this one when 0) into the first
    rows of `images`, in order. Returns how many were written and the errors of the images left out
    (DataError on the first one unless `skip_broken`)."""
    import multiprocessing

    from tqdm.auto import tqdm

    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 0 else None
    results = pool.imap(_decode_chunk, jobs) if pool else map(_decode_chunk, jobs)
    written, skipped = 0, []
    try:
        with tqdm(total=count, desc=desc, unit="img", disable=not progress) as bar:
            for decoded in results:
                for array, error in decoded:
                    if array is None:
                        if not skip_broken:
                            raise DataError(f"{error} (--skip-broken leaves such images out)")
                        skipped.append(error)
                    else:
                        images[written] = array
                        written += 1
                bar.update(len(decoded))
    finally:
        if pool:
            pool.terminate()
    return written, skipped


def _not_found_message(root: Path, category: str, prepared_too: bool = True) -> str:
    prepared = (
        f", or its prepared form ({root / storage.MANIFEST}, train_images.npy) written by `python -m "
        f"act_lightning.prepare lsun_cat256 {root / category} {root}`"
        if prepared_too
        else ""
    )
    unfinished = storage.unfinished(root) if prepared_too else ""
    return (
        f"LSUN {category} not found under {root}. Expected the official LMDB: the folder {root / category}/ "
        f"holding data.mdb (or data.mdb directly in {root}){prepared}. Get it from "
        f"{URLS.format(category=category)} and unzip it into {root}.{unfinished}"
    )


class LSUNDataModule(ImageDataModule):
    """LSUN `category` at `image_size`, unconditional. Reads the prepared form in `root` when one exists
    at this image size, otherwise the LMDB."""

    def __init__(self, root: str, *, category: str = "cat", verify: bool = True, **kwargs) -> None:
        super().__init__(root=root, **with_file_defaults(kwargs, batch_size=80, image_size=256))
        if self.num_classes:
            raise ValueError(
                f"LSUN {category} has no class labels: data.num_classes must be null, got {self.num_classes}"
            )
        if self.channels not in (1, 3):
            raise ValueError(f"data.channels must be 3 (RGB) or 1 (grey), got {self.channels}")
        self.category = category
        self.verify = verify

    def check_source(self) -> None:
        """A prepared form at this size with all its files at their recorded sizes (no hashing), or a
        readable LMDB (not opened: opening one may create its lock file)."""
        manifest = self._prepared()
        if manifest is not None:
            storage.check_files(self.path, manifest, verify=False)
            for name in manifest["files"]:
                check_readable(self.path / name)
            return
        lmdb_path = find_lmdb(self.path, self.category)
        if lmdb_path is None:
            raise FileNotFoundError(_not_found_message(self.path, self.category))
        check_readable(lmdb_path / "data.mdb")

    def _prepared(self) -> dict | None:
        """The prepared form's manifest if `root` holds one that fits this run, else None."""
        root = self.path
        if not (root / storage.MANIFEST).is_file():
            return None
        manifest = storage.read_manifest(root, SOURCE)
        fits = (manifest.get("image_size"), manifest.get("channels")) == (self.image_size, self.channels)
        if not fits:
            message = (
                f"{root / storage.MANIFEST}: prepared at {manifest.get('image_size')} px with "
                f"{manifest.get('channels')} channels, but data.image_size={self.image_size}, "
                f"data.channels={self.channels}"
            )
            if find_lmdb(root, self.category) is None:
                fixes = []
                if manifest.get("channels") != self.channels:  # prepare writes the source's colour images
                    fixes.append(f"set data.channels={manifest.get('channels')}")
                if manifest.get("image_size") != self.image_size:
                    fixes.append(f"prepare again with --image-size {self.image_size}, into another folder")
                raise DataError(f"{message}; {', and '.join(fixes)}")
            log.warning("%s: reading the LMDB instead", message)
            return None
        if manifest.get("max_images") is not None:
            log.warning(
                "%s was prepared with --max-images %d: training on its %d images, a subset of the category",
                root,
                manifest["max_images"],
                manifest["splits"]["train"]["count"],
            )
        return manifest

    def prepare_data(self) -> None:
        manifest = self._prepared()
        if manifest is not None:
            storage.check_files(self.path, manifest, verify=self.verify)
        elif find_lmdb(self.path, self.category) is None:
            raise FileNotFoundError(_not_found_message(self.path, self.category))

    def reference_fingerprint(self) -> str | None:
        """The prepared form's (None for the official LMDB, which is read as it is)."""
        manifest = self._prepared()
        return None if manifest is None else storage.manifest_digest(manifest, "train")

    def build_train_dataset(self) -> Dataset:
        root = self.path
        manifest = self._prepared()
        if manifest is not None:
            dataset = storage.PreparedArrays(root, manifest["splits"]["train"], conditional=False)
            expected = (self.channels, self.image_size, self.image_size)
            if dataset.image_shape != expected:
                raise DataError(
                    f"{dataset.images_path}: images of shape {dataset.image_shape}, expected {expected}"
                )
            return dataset
        lmdb_path = find_lmdb(root, self.category)
        if lmdb_path is None:
            raise FileNotFoundError(_not_found_message(root, self.category))
        dataset = LMDBImages(lmdb_path, list_keys(lmdb_path), self.image_size, self.channels)
        dataset[0]  # fail now, not in a worker, if the values are not images at all
        close_lmdb(lmdb_path)  # workers open their own; none inherits this one
        return dataset
