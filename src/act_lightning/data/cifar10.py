"""CIFAR-10: the 50,000 32x32 training images, from the official python batches.

Those batches are pickles; they are read by a restricted unpickler that builds nothing but what the
official files hold (byte strings, numbers, lists, a dict and one numpy array), so a tampered batch is
refused by name and never runs code, whether or not `data.verify` checked its checksum first."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import shutil
import socket
import tarfile
import urllib.error
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import calculate_md5, download_url

from act_lightning.data.base import (
    DataError,
    DataUnavailable,
    HalfBatch,
    ImageDataModule,
    check_readable,
    files_digest,
    with_file_defaults,
)
from act_lightning.data.storage import one_at_a_time, remove_created

log = logging.getLogger(__name__)

URL = CIFAR10.url  # https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz
ARCHIVE = CIFAR10.filename  # cifar-10-python.tar.gz
DOWNLOAD_TIMEOUT = 60.0  # seconds a connection may wait for the server (to connect, or for each read)
FOLDER = CIFAR10.base_folder  # cifar-10-batches-py
TRAIN_FILES = [(name, md5) for name, md5 in CIFAR10.train_list]  # data_batch_1 .. data_batch_5
EXTRACTING = f".{FOLDER}.extracting"  # the archive is extracted here, then its files moved into FOLDER

# The only globals a batch may name. The official batches are Python 2 pickles (protocol 2) of a dict
# {b"batch_label": str, b"labels": [int], b"data": uint8 array (10000, 3072), b"filenames": [str]}; the
# array is rebuilt by numpy's reconstructor, which numpy 1.x wrote as numpy.core.multiarray._reconstruct
# (numpy 2 writes numpy._core.multiarray: a batch re-saved under Python 3 with protocol 3 or 4), from
# numpy.ndarray and a numpy.dtype. Everything else a pickle could name is refused, among them what
# Python 3 adds with protocol 2 (_codecs.encode, for bytes) and 5 (numpy's _frombuffer). None of the three
# is numpy's own: numpy's dtype and array take any state they are given (a dtype whose field lies a GiB
# past its item's end read memory out of bounds and ended the process), so a batch's arrays are built here
# from their shape, a plain integer type and the file's own bytes, and nothing else.
_INTEGER_TYPES = frozenset(f"{kind}{size}" for kind in "iu" for size in (1, 2, 4, 8))
_BYTE_ORDERS = {"|": "=", "=": "=", "<": "<", ">": ">"}


def _text(value: Any) -> Any:
    """A Python 2 str as the unpickler gives it (bytes, under encoding="bytes"), as a str."""
    return value.decode("latin-1") if isinstance(value, bytes) else value


class _DType:
    """numpy.dtype as a batch names it: a plain integer type (`u1`, `i8`, ...) in a byte order, nothing
    more; its state may only say the byte order."""

    def __init__(self, name: Any, align: Any = False, copy: Any = True) -> None:
        if _text(name) not in _INTEGER_TYPES:
            raise pickle.UnpicklingError(f"numpy.dtype({name!r}): a batch's arrays hold integers only")
        self.dtype = np.dtype(_text(name))

    def __setstate__(self, state: Any) -> None:
        plain = isinstance(state, tuple) and len(state) == 8 and state[0] == 3
        plain = plain and state[2:5] == (None, None, None) and state[5:] == (-1, -1, 0)
        if not plain or _text(state[1]) not in _BYTE_ORDERS:
            raise pickle.UnpicklingError(f"numpy.dtype state {state!r}: not a plain integer type's")
        self.dtype = self.dtype.newbyteorder(_BYTE_ORDERS[_text(state[1])])


class _Array:
    """An array as a batch holds it: numpy's reconstructor makes an empty one, whose state then gives its
    shape, type and bytes; `array` is it, built by numpy from those bytes (whose length must match)."""

    array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise pickle.UnpicklingError("numpy array state: not (1, shape, dtype, fortran, bytes)")
        _, shape, dtype, fortran, raw = state
        if not isinstance(shape, tuple) or not 1 <= len(shape) <= 2 or not all(type(n) is int for n in shape):
            raise pickle.UnpicklingError(f"numpy array shape {shape!r}: one or two dimensions expected")
        if not isinstance(dtype, _DType) or not isinstance(fortran, bool) or not isinstance(raw, bytes):
            raise pickle.UnpicklingError("numpy array state: a plain integer type and bytes expected")
        if len(raw) != math.prod(shape) * dtype.dtype.itemsize or min(shape) < 0:
            raise pickle.UnpicklingError(f"numpy array of shape {shape}: {len(raw)} bytes do not fill it")
        order = "F" if fortran else "C"  # numpy writes a Fortran-ordered array's bytes column by column
        self.array = np.frombuffer(raw, dtype.dtype).reshape(shape, order=order).copy(order="C")  # writable


class _ArrayClass:
    """numpy.ndarray as a batch names it: only an argument of the reconstructor below. It is no callable,
    so a batch that calls it (`numpy.ndarray((N, 3072), uint8)`: N x 3072 bytes of uninitialised memory
    from a few bytes of pickle, gigabytes for a large N) fails to unpickle."""


def _reconstruct(cls: Any, shape: Any, dtype: Any) -> _Array:
    """numpy's reconstructor as the official batches call it: an empty array of numpy.ndarray, which
    its state then fills from the file's own bytes."""
    if not isinstance(cls, _ArrayClass) or tuple(shape) != (0,):
        raise pickle.UnpicklingError(f"numpy's reconstructor called as ({cls!r}, {shape!r}, {dtype!r})")
    return _Array()


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _ArrayClass(),
    ("numpy", "dtype"): _DType,
}


class RefusedGlobal(pickle.UnpicklingError):
    """A batch names a global that the official files do not hold (`module.name`)."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualified = f"{module}.{name}"


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that looks up only ALLOWED_GLOBALS: the pickle can build nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedGlobal(module, name) from None


@contextlib.contextmanager
def socket_timeout(seconds: float):
    """Sockets opened within time out after `seconds` without progress (urllib's default is to wait for
    ever): a stalled download fails with TimeoutError, an OSError, and is cleaned up and said as such."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _refused_message(path: Path, qualified: str) -> str:
    allowed = ", ".join(f"{module}.{name}" for module, name in ALLOWED_GLOBALS)
    return (
        f"{path}: refused to unpickle the global `{qualified}`: the official CIFAR-10 python batches "
        f"name only {allowed}, so this file is not one of them and reading it could run code (whatever "
        f"data.verify says). {_start_again(path)}; a batch you wrote yourself loads when pickled with "
        "protocol 3 or 4"
    )


def _start_again(path: Path) -> str:
    """How to replace the python batches `path` is one of: from the archive beside them when it is there,
    else from the download (which a run does itself once the folder is gone, unless data.download=false)."""
    archive = path.parent.parent / ARCHIVE
    if archive.is_file():
        return f"Delete {path.parent} and extract {archive} again (from {URL})"
    return (
        f"Delete {path.parent}: the next run downloads {ARCHIVE} into {archive.parent} (with "
        f"data.download=false, put it there yourself, from {URL})"
    )


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One python batch's images, uint8 (n, 3072) channel-major rows, and labels, read without running
    code: a name outside ALLOWED_GLOBALS, a damaged file or an unexpected layout raises DataError."""
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()  # Python 2 strings stay bytes
    except RefusedGlobal as err:
        raise DataError(_refused_message(path, err.qualified)) from None
    except Exception as err:  # unpickling raises almost anything on a truncated or foreign file
        raise DataError(
            f"{path}: not a readable CIFAR-10 python batch ({type(err).__name__}: {err}). The file is "
            f"truncated or corrupt. {_start_again(path)}"
        ) from err
    if not isinstance(batch, dict):
        raise DataError(f"{path}: a CIFAR-10 python batch is a dict, found {type(batch).__name__}")
    data, labels = (batch.get(key, batch.get(key.decode())) for key in (b"data", b"labels"))
    data = data.array if isinstance(data, _Array) else data
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: `data` should be a uint8 (N, 3072) array, found {found}")
    return data, batch_labels(path, labels.array if isinstance(labels, _Array) else labels, len(data))


def batch_labels(path: Path, labels: Any, n: int) -> np.ndarray:
    """A batch's `labels`, n classes in 0..9 (a list of ints, as the official files hold, or a 1-d integer
    array), as an int64 array; anything else is refused by name before numpy reads it (a list nested a
    few levels deep through the pickle's references would have numpy allocate gigabytes)."""
    if isinstance(labels, np.ndarray):
        fine = labels.ndim == 1 and labels.dtype.kind in "iu"
        found = f"a {labels.ndim}-d {labels.dtype} array"
    else:
        fine = type(labels) is list and all(type(v) is int for v in labels)
        found = "a list of integers" if fine else f"a {type(labels).__name__} that is no list of integers"
    if not fine or len(labels) != n:
        size = f" of {len(labels)}" if fine else ""
        raise DataError(f"{path}: {n} images but `labels` is {found}{size}; expected {n} integers in 0..9")
    if n and not all(0 <= int(v) <= 9 for v in (min(labels), max(labels))):
        raise DataError(f"{path}: labels must lie in 0..9, found {min(labels)}..{max(labels)}")
    return np.asarray(labels, dtype=np.int64)


def load_cifar10_train(root: Path) -> tuple[Tensor, Tensor]:
    """All training batches as a uint8 (N, 3, 32, 32) tensor and int64 labels, each file validated."""
    images, labels = [], []
    for name, _ in TRAIN_FILES:
        data, targets = read_batch(root / FOLDER / name)
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32)))  # (n, 3, 32, 32)
        labels.append(torch.from_numpy(targets))
    return torch.cat(images), torch.cat(labels)


def _nearest_existing(path: Path) -> Path:
    """`path` itself if it exists, else its nearest ancestor that does."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _remove(path: Path) -> None:
    """Delete a file or a folder tree, if it is there."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _check_writable(folder: Path, why: str) -> None:
    """Raise when files cannot be created in `folder` (missing, not a folder, or read-only)."""
    if not folder.is_dir():
        raise NotADirectoryError(f"{why}, but {folder} is not a folder: check data.root")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{why}, but {folder} is not writable: check data.root")


class _Indices(Dataset):
    """0..n-1: the in-memory path samples indices (so Lightning's samplers still shard them)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


def _extract_safely(archive: Path, folder: Path) -> None:
    """Extract a gzip'ed tar into `folder` with tarfile's "data" filter: a member that would land outside
    `folder` (an absolute path, `..`), a link pointing out of it or a device file is refused (DataError)
    instead of being written. (torchvision's extraction applies no filter.)"""
    if not hasattr(tarfile, "data_filter"):
        raise DataError(
            f"{archive}: extracting it safely needs tarfile's data filter (Python 3.10.12 or later); "
            f"extract it yourself into {archive.parent}, or upgrade Python"
        )
    with tarfile.open(archive, "r:gz") as tar:
        try:
            tar.extractall(folder, filter="data")
        except tarfile.FilterError as err:
            raise DataError(
                f"{archive}: refused, it holds {err} (the official archive holds no path outside its "
                f"folder, no link and no device file). Delete it and download {URL} again."
            ) from err


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 training set, random horizontal flips, values in [-1, 1].

    `root` holds `cifar-10-batches-py/` or `cifar-10-python.tar.gz` (extracted on first use); with
    `download` the archive is fetched when neither is there. `verify` checks torchvision's MD5s.
    `in_memory`: the whole set lives on the training device as one uint8 tensor, batches are gathered
    there and flipped there; no worker processes.
    """

    def __init__(
        self,
        root: str,
        *,
        download: bool = True,
        verify: bool = True,
        in_memory: bool = False,
        **kwargs,
    ) -> None:
        kwargs = with_file_defaults(kwargs, batch_size=80, image_size=32, num_workers=4)
        if in_memory:
            kwargs.update(num_workers=0, persistent_workers=False, pin_memory=False)
        super().__init__(root=root, **kwargs)
        if self.image_size != 32 or self.channels != 3:
            raise ValueError(
                f"data=cifar10 holds 32x32 RGB images: data.image_size must be 32 and data.channels 3, got "
                f"{self.image_size} and {self.channels} (use data=folder to train on images resized to "
                "another size)"
            )
        if self.num_classes not in (None, 10):
            raise ValueError(
                f"data.num_classes must be null (unconditional) or 10 for CIFAR-10, got {self.num_classes}"
            )
        self.download = download
        self.verify = verify
        self.in_memory = in_memory
        self._images: Tensor | None = None  # (N, 3, 32, 32) uint8 on the host
        self._labels: Tensor | None = None
        self._on_device: tuple[Tensor, Tensor] | None = None
        self._verified = False  # the batches' MD5s were checked by this object (prepare_data or _load)

    # -- files -------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        root = self.path
        if self._missing_batches() and (said := self._batches_in_root()):
            raise DataUnavailable(said)
        if self._missing_batches() and ((root / ARCHIVE).is_file() or self.download):
            # other nodes' rank 0 extract or download into the same folder when it is shared: one at a
            # time, and the ones that waited find the batches
            with one_at_a_time(root) as created:
                missing = self._missing_batches()  # none when one of them finished meanwhile
                if missing and (root / ARCHIVE).is_file():
                    self._extract(root / ARCHIVE)
                elif missing and self.download and not os.path.lexists(root / ARCHIVE):
                    self._download(created)
        missing = self._missing_batches()
        if missing:
            raise DataUnavailable(self._not_found_message(missing))
        self._check_batches()

    def _check_batches(self) -> None:
        """With `verify`, each batch against the release's MD5 (once per object): before any is read, by
        training's prepare_data, and by `_load` where none ran (evaluate's reference images)."""
        if self.verify and not self._verified:
            for name, md5 in TRAIN_FILES:
                self._check_md5(self.path / FOLDER / name, md5)
            self._verified = True

    def reference_fingerprint(self) -> str | None:
        """None where `verify` checks the batches against the release's MD5s (they are the release);
        with data.verify=false, batches a user wrote may be replaced at the same count: their sizes and
        modification times."""
        if self.verify:
            return None
        return files_digest([self.path / FOLDER / name for name, _ in TRAIN_FILES], self.path)

    def check_source(self) -> None:
        """The batches are there and readable; or the archive is, in a folder it can be extracted into;
        or, with `download`, the data set may be missing for now if the nearest existing folder on the
        way to `root` is writable, so that `prepare_data` can create `root` and download into it."""
        root = self.path
        missing = self._missing_batches()
        if missing and (said := self._batches_in_root()):  # no download into a folder inside the data set
            raise FileNotFoundError(said)
        if not missing:
            for name, _ in TRAIN_FILES:
                check_readable(root / FOLDER / name)
        elif (root / ARCHIVE).is_file():
            check_readable(root / ARCHIVE)
            _check_writable(root, f"{root / ARCHIVE} is extracted into {root / FOLDER}/")
        elif self.download:
            where = _nearest_existing(root)
            _check_writable(
                where,
                f"{self._not_found_message(missing)} data.download=true fetches the archive into {root}",
            )
        else:
            raise FileNotFoundError(self._not_found_message(missing))

    def _missing_batches(self) -> list[str]:
        return [name for name, _ in TRAIN_FILES if not (self.path / FOLDER / name).is_file()]

    def _not_found_message(self, missing: list[str]) -> str:
        root = self.path
        more = f" (and {', '.join(missing[1:])})" if len(missing) > 1 else ""
        return (
            f"CIFAR-10 not found: {root / FOLDER / missing[0]} is missing{more}. Expected the python version "
            f"of CIFAR-10 under data.root={root}: either the folder {root / FOLDER}/ with data_batch_1 .. "
            f"data_batch_5, or the archive {root / ARCHIVE}. Get it from {URL}"
            + (" (data.download=true fetches it on a machine that is online)." if not self.download else ".")
        )

    def _batches_in_root(self) -> str | None:
        """What to say when data.root is the batches' own folder (it should be the one above it)."""
        if (self.path / TRAIN_FILES[0][0]).is_file():
            return (
                f"data.root={self.path} holds the batches themselves ({TRAIN_FILES[0][0]}, ...): data.root "
                f"is the folder above them, data.root={self.path.parent} for {self.path.parent / FOLDER}"
                + ("" if self.path.name == FOLDER else f" once the folder is renamed {FOLDER}")
            )
        return None

    def _check_md5(self, path: Path, md5: str) -> None:
        found = calculate_md5(path)
        if found != md5:
            raise DataError(
                f"{path}: checksum mismatch (md5 {found}, expected {md5} for the official CIFAR-10 "
                f"file). The file is corrupt or not the official one: extract it again from {URL}. "
                "(data.verify=false only skips this checksum, for batches you wrote yourself in the "
                "official format; it makes no file safe, and a batch that names more than the official "
                "files do is refused when read either way.)"
            )

    def _extract(self, archive: Path) -> None:
        if self.verify:
            self._check_md5(archive, CIFAR10.tgz_md5)
        log.info("extracting %s", archive)
        tmp = archive.parent / EXTRACTING
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _extract_safely(archive, tmp)
        except DataError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DataError(
                f"{archive}: not a complete gzip'ed tar archive ({type(err).__name__}: {err}); the "
                f"download is truncated or corrupt. Delete it and download {URL} again."
            ) from err
        if not (tmp / FOLDER).is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            raise DataError(
                f"{archive}: the archive holds no {FOLDER}/ folder; it is not the python version of "
                f"CIFAR-10 ({URL})"
            )
        (archive.parent / FOLDER).mkdir(exist_ok=True)
        for item in (tmp / FOLDER).iterdir():
            os.replace(item, archive.parent / FOLDER / item.name)
        shutil.rmtree(tmp, ignore_errors=True)

    def _download(self, created: list[Path]) -> None:
        """Fetch the archive into `root` and extract it. When that fails, everything it created goes: the
        partial archive, the batches' folder and what was made to hold the lock (`created`, by
        `one_at_a_time`: folders up to `root`, each removed only when empty, and the lock file). A
        mistyped data.root must not leave a tree of empty folders behind, nor a truncated archive that the
        next run would take for the user's own; files that another job wrote meanwhile into a folder made
        here stay. The archive is fetched under a temporary name, so a killed download leaves none."""
        root = self.path
        part = root / f".{ARCHIVE}.part"
        # under the lock: no one else writes there now (a link to a missing folder is the user's: kept)
        made_folder = not os.path.lexists(root / FOLDER)
        try:
            with socket_timeout(DOWNLOAD_TIMEOUT):  # torchvision's urlopen has none: a stalled server hung
                download_url(URL, str(root), filename=part.name)
            os.replace(part, root / ARCHIVE)
            self._extract(root / ARCHIVE)
        except BaseException as err:
            # root / ARCHIVE too: _download runs only when there was none (nor a link of that name)
            for path in (root / FOLDER if made_folder else None, part, root / ARCHIVE, root / EXTRACTING):
                if path is not None:
                    _remove(path)
            remove_created(created)
            if isinstance(err, (urllib.error.URLError, OSError, DataError)):
                raise DataUnavailable(
                    f"{self._not_found_message(self._missing_batches())} The download failed: "
                    f"{type(err).__name__}: {err}"
                ) from err
            raise

    # -- datasets ----------------------------------------------------------------------------------
    def _load(self) -> tuple[Tensor, Tensor]:
        if self._images is None:
            missing = self._missing_batches()
            if missing:
                raise FileNotFoundError(self._not_found_message(missing))
            self._check_batches()
            images, labels = load_cifar10_train(self.path)
            if not self.num_classes:
                labels = torch.zeros_like(labels)
            self._images, self._labels = images, labels
        return self._images, self._labels

    def build_train_dataset(self) -> Dataset:
        images, labels = self._load()
        return _Indices(len(images)) if self.in_memory else TensorDataset(images, labels)

    def build_reference_dataset(self) -> Dataset:
        return TensorDataset(*self._load())

    def train_dataloader(self) -> DataLoader:
        if not self.in_memory:
            return super().train_dataloader()
        self.setup("fit")
        return self._train_loader(self.train_set, num_workers=0, pin_memory=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int) -> HalfBatch:
        if not self.in_memory:
            return super().on_after_batch_transfer(batch, dataloader_idx)
        index = batch  # (2B,) int64, already on the device
        if self._on_device is None or self._on_device[0].device != index.device:
            images, labels = self._load()
            self._on_device = (images.to(index.device), labels.to(index.device))
        images, labels = self._on_device
        return self.to_half_batch(images[index], labels[index])
