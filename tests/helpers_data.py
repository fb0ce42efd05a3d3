"""Small files in each data set's exact official format, for the data tests and the benchmark.

- CIFAR-10: python batches as the official archive holds them (Python 2 pickles of dicts whose keys
  are byte strings: b"data" uint8 (N, 3072), b"labels", ...), optionally packed as the .tar.gz.
- ImageNet 64x64: train_data_batch_1..10.npz and val_data.npz with `data` uint8 (N, 12288), channel-major,
  and `labels` 1..1000.
- LSUN: an LMDB folder (data.mdb, lock.mdb) whose values are webp and jpeg bytes under arbitrary keys.
- An image folder: png / jpg / webp files in class sub-folders.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR_FOLDER = "cifar-10-batches-py"
NUMPY_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy.core.multiarray._reconstruct in numpy 1.x


def smooth_images(n: int, height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """(n, height, width, channels) uint8: smooth random colour fields (compress like photos, not noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(n, 4, 4, channels), dtype=np.uint8)
    return np.stack(
        [np.asarray(Image.fromarray(c.squeeze()).resize((width, height), Image.BILINEAR)) for c in coarse]
    ).reshape(n, height, width, channels)


# -- CIFAR-10 ----------------------------------------------------------------------------------------
class _Py2Pickler(pickle._Pickler):
    """Writes a pickle as Python 2's cPickle and numpy 1.x wrote the official batches (protocol 2): every
    string as a Python 2 `str` (BINSTRING; the arrays' raw bytes included), and numpy's array
    reconstructor under its numpy 1.x name, numpy.core.multiarray._reconstruct."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes | str) -> None:
        obj = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj, name=None) -> None:
        if obj is NUMPY_RECONSTRUCT:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def py2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def cifar10_files(per_batch: int = 8, seed: int = 0) -> dict[str, bytes]:
    """{name: content} of cifar-10-batches-py/: data_batch_1..5, test_batch, batches.meta."""
    files = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        images = smooth_images(per_batch, 32, 32, seed=seed * 100 + i)  # (n, 32, 32, 3)
        data = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(
            per_batch, 3072
        )  # channel-major rows
        labels = [int(v) for v in np.random.default_rng(i).integers(0, 10, per_batch)]
        files[name] = py2_pickle(
            {
                b"batch_label": f"training batch {i + 1} of 5".encode(),
                b"labels": labels,
                b"data": data,
                b"filenames": [f"image_{i}_{j}.png".encode() for j in range(per_batch)],
            }
        )
    files["batches.meta"] = py2_pickle(
        {
            b"num_cases_per_batch": per_batch,
            b"label_names": [
                n.encode() for n in "airplane automobile bird cat deer dog frog horse ship truck".split()
            ],
            b"num_vis": 3072,
        }
    )
    return files


def write_cifar10(root: Path, per_batch: int = 8, archive: bool = False, seed: int = 0) -> Path:
    """Extracted batches in root/cifar-10-batches-py/, or (archive=True) root/cifar-10-python.tar.gz."""
    root.mkdir(parents=True, exist_ok=True)
    files = cifar10_files(per_batch, seed)
    if archive:
        path = root / "cifar-10-python.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            for name, content in files.items():
                info = tarfile.TarInfo(f"{CIFAR_FOLDER}/{name}")
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
        return path
    folder = root / CIFAR_FOLDER
    folder.mkdir(exist_ok=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return folder


# -- ImageNet 64x64 ----------------------------------------------------------------------------------
def write_imagenet64(src: Path, per_file: int = 4, val: bool = True, seed: int = 0) -> list[Path]:
    """The official release's file set under `src`, `per_file` images each; labels 1..1000."""
    src.mkdir(parents=True, exist_ok=True)
    names = [f"train_data_batch_{i}.npz" for i in range(1, 11)] + (["val_data.npz"] if val else [])
    paths = []
    for i, name in enumerate(names):
        images = smooth_images(per_file, 64, 64, seed=seed * 100 + i)
        data = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(per_file, 12288)  # channel-major
        labels = (np.arange(per_file) * 97 + i * 13) % 1000 + 1  # 1..1000, as the official files
        arrays = {"data": data, "labels": labels.astype(np.int64)}
        if name.startswith("train"):
            arrays["mean"] = data.mean(0)
        np.savez(src / name, **arrays)
        paths.append(src / name)
    return paths


# -- LSUN --------------------------------------------------------------------------------------------
def encode(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, quality=90)
    return buffer.getvalue()


def write_lsun_lmdb(path: Path, n: int = 8, seed: int = 0, extra: dict[bytes, bytes] | None = None) -> Path:
    """An LSUN-style LMDB folder: values are webp and jpeg images of assorted non-square sizes (short side
    around 256, as LSUN's), keys are hex digests as in the official databases."""
    import lmdb

    path.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=1 << 28)
    sizes = [(341, 256), (256, 320), (300, 300), (256, 384)]
    with env.begin(write=True) as txn:
        for i in range(n):
            w, h = sizes[i % len(sizes)]
            image = smooth_images(1, h, w, seed=seed * 1000 + i)[0]
            key = hashlib.sha1(f"{seed}-{i}".encode()).hexdigest().encode()
            txn.put(key, encode(image, "WEBP" if i % 2 == 0 else "JPEG"))
        for key, value in (extra or {}).items():
            txn.put(key, value)
    env.close()
    return path


# -- checks shared by the DataModule tests -----------------------------------------------------------
def listing(root: Path) -> set[str]:
    """Every file and folder under `root` (hidden ones too), relative to it: to assert a step created
    nothing."""
    return {str(path.relative_to(root)) for path in root.rglob("*")}


def batch_digests(images) -> list[str]:
    """One digest per image of a (B, C, H, W) tensor: identifies images across loaders."""
    return [hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest() for image in images]


def on_rank(datamodule, rank: int, world_size: int):
    """Attach a stand-in trainer, so the data module builds the loader of `rank` of `world_size` (as the
    Trainer does under DDP, with use_distributed_sampler=False)."""
    from types import SimpleNamespace

    datamodule.trainer = SimpleNamespace(
        global_rank=rank, world_size=world_size, training=False, lightning_module=None
    )
    return datamodule


def shards(datamodule, world_size: int = 2) -> list[list[str]]:
    """The images each rank sees in one epoch (its share of every global batch), identified by digest."""
    seen = []
    try:
        for rank in range(world_size):
            loader = on_rank(datamodule, rank, world_size).train_dataloader()
            bs = loader.batch_sampler  # global batches of both halves, of which this rank loads its share
            assert bs.batch_size == 2 * datamodule.batch_size * world_size and bs.drop_last
            assert (bs.rank, bs.world_size) == (rank, world_size)
            digests = []
            for batch in loader:
                images = datamodule.on_after_batch_transfer(batch, 0)  # HalfBatch of float images
                assert images.gen.shape[0] == images.disc.shape[0] == datamodule.batch_size
                digests += batch_digests(images.gen) + batch_digests(images.disc)
            seen.append(digests)
    finally:
        datamodule.trainer = None
    return seen


# -- image folder ------------------------------------------------------------------------------------
def write_image_folder(
    root: Path, classes: tuple[str, ...] = ("cats", "dogs"), per_class: int = 4, seed: int = 0
) -> Path:
    """root/<class>/img_<i>.{png,jpg,webp}, assorted sizes and modes (RGB, RGBA, grey)."""
    formats = [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP")]
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = 40 + 8 * i, 48 + 4 * c
            image = Image.fromarray(smooth_images(1, h, w, seed=seed * 1000 + c * 100 + i)[0])
            suffix, fmt = formats[i % 3]
            if i == 3:
                image = image.convert("RGBA")
                suffix, fmt = "png", "PNG"
            elif i == 4:
                image = image.convert("L")
            image.save(root / name / f"img_{i}.{suffix}", format=fmt)
    return root
