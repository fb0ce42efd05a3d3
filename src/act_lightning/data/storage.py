"""Storage shared by the DataModules: the *prepared form* (memory-mapped uint8 arrays described by a
checksum manifest, written once by `python -m act_lightning.prepare`) and a compact list of byte
strings that worker processes can share without copying.

A prepared folder holds, per split (`train`, optionally `val`):

    <split>_images.npy   uint8 (N, C, H, W), channel-major, ready for torch
    <split>_labels.npy   int16 (N,), 0-based class indices (absent for unlabelled sources)
    manifest.json        source, shapes, counts and the size and SHA-256 of every array file

Plain `.npy` files, so `np.load(path, mmap_mode="r")` reads them anywhere without unpickling; any
number of workers share the page cache. The manifest's `count` is authoritative: a writer that skips
broken inputs leaves unused rows at the end of the array.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from act_lightning.atomic import atomic_write
from act_lightning.data.base import DataError

MANIFEST = "manifest.json"
FORMAT = "act-lightning/prepared-v1"
LOCK = ".prepare.lock"  # held (flock) by the process that prepares a folder, while the others wait
WRITING = ".preparing"  # held (flock) by a preparation while it writes into the folder
_STAMP = ".verified.json"  # sizes and mtimes of the files whose checksums last matched the manifest


class PackedBytes(Sequence):
    """An immutable list of byte strings in two numpy arrays (a blob and offsets).

    A Python list of a million keys or paths in a Dataset is copied page by page into every worker
    (reference counts touch every object); two flat arrays are shared as they are.
    """

    def __init__(self, items: Sequence[bytes]) -> None:
        lengths = np.fromiter((len(b) for b in items), dtype=np.int64, count=len(items))
        self._offsets = np.zeros(len(items) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self._offsets[1:])
        self._blob = np.frombuffer(b"".join(items), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> bytes:  # type: ignore[override]
        return self._blob[self._offsets[index] : self._offsets[index + 1]].tobytes()


# -- checksums ---------------------------------------------------------------------------------------
def sha256_file(path: Path, progress: bool = False, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    bar = _bar(size, f"sha256 {path.name}", unit="B", disable=not progress)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            bar.update(len(block))
    bar.close()
    return digest.hexdigest()


def _bar(total: int, desc: str, unit: str = "it", disable: bool = False):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit=unit, unit_scale=unit == "B", disable=disable, dynamic_ncols=True
    )


# -- writing -----------------------------------------------------------------------------------------
@contextmanager
def one_at_a_time(folder: Path) -> Iterator[list[Path]]:
    """Within: this process alone prepares `folder` (an exclusive flock on `folder/.prepare.lock`, which
    waits for the holder). Lightning prepares the data on local rank 0 of every node: nodes that share a
    file system would otherwise convert, extract or download into the same files at once (one truncating
    the other's memory map: SIGBUS). Re-check for the finished form after entering.

    Yields what this process created to hold the lock, outermost first: the folders up to `folder` that
    were missing, then the lock file, when it was missing (a preparation that fails removes them again,
    `remove_created`). The holder may remove the lock file: a waiter that then gets the lock of a file no
    longer there takes the lock again, on the file now at that path, so that it never shares the folder
    with a process that came later."""
    path = folder / LOCK
    folders: list[Path] = []  # made by this process, in any pass (another may have removed them since)
    for _ in range(1000):  # a holder removes the folder at most once per failed preparation
        lock, made_lock = _open_lock(folder, path, folders)
        if lock is None:
            continue  # the holder removed the folder meanwhile: make it again
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if _same_file(lock.fileno(), path):
            break
        lock.close()  # closing lets go of its lock
    else:
        raise OSError(f"{path}: could not take this lock (its folder keeps disappearing)")
    created = [f for f in folders if f.is_dir()] + ([path] if made_lock else [])
    with lock:
        try:
            yield created
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _open_lock(folder: Path, path: Path, folders: list[Path]):
    """(the lock file opened, whether this call created it), or (None, False) when `folder` vanished
    between making it and opening the file (another process's `remove_created`): then try again. The
    folders this call makes are added to `folders`, outermost first."""
    for missing in _missing_folders(folder):
        try:
            missing.mkdir()
        except FileExistsError:  # made by another process just now (or a file: refused below)
            continue
        except FileNotFoundError:  # its parent was removed just now
            return None, False
        if missing not in folders:
            folders.append(missing)
    if not folder.is_dir():
        if folder.exists():
            raise NotADirectoryError(f"{folder}: not a folder")
        return None, False
    try:
        return open(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL), "r+b"), True
    except FileExistsError:
        pass
    except FileNotFoundError:
        return None, False
    try:
        return open(path, "r+b"), False  # a folder here raises, by name
    except FileNotFoundError:
        if os.path.lexists(path):  # a link to nowhere: no retry makes it a file
            raise FileNotFoundError(f"{path}: a link to a missing file; remove it") from None
        return None, False  # removed by its holder just now: try again


def remove_created(created: list[Path]) -> None:
    """Removes what `one_at_a_time` created, innermost first, while its lock is held: the lock file, then
    each folder that is empty (one another job wrote into meanwhile stays, with the folders above it)."""
    for path in reversed(created):
        try:
            if path.name == LOCK:
                path.unlink()
            else:
                path.rmdir()
        except FileNotFoundError:  # removed already: go on with the folders above
            continue
        except OSError:  # not empty: the folders above it stay too
            return


def _missing_folders(folder: Path) -> list[Path]:
    """The folders that `folder.mkdir(parents=True)` would create, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


def _same_file(fd: int, path: Path) -> bool:
    """`fd` is the file at `path` now (not one removed, nor one removed and made again)."""
    try:
        there = path.stat()
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


@contextmanager
def no_partial_output(dst: Path) -> Iterator[None]:
    """Within: a conversion writes its arrays and then its manifest into `dst`, alone (it holds
    `dst/.preparing`, flock, while it writes: a second one into the same folder is refused, and
    `unfinished` tells a running one from a killed one). If it stops (a file that does not decode,
    Ctrl-C), the files it created there are removed, and `dst` too when it made it and nothing else is in
    it: no half-written array is left without the manifest that would say it is incomplete. A folder
    prepared before loses its manifest (and verification stamp) first: the arrays are rewritten in place,
    and a conversion that stops must not leave the old manifest describing arrays it half overwrote."""
    created = not dst.exists()
    dst.mkdir(parents=True, exist_ok=True)
    lock_path = dst / WRITING  # kept after a success, as one_at_a_time's (unlinking a lock is a race)
    ours = not lock_path.exists()
    failed = False
    with open(lock_path, "a+b") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(
                f"{dst}: another preparation is writing into it now (it holds {lock_path}): wait for it to "
                "finish (its manifest.json comes last), or prepare into another folder"
            ) from None
        try:
            for name in (MANIFEST, _STAMP):
                (dst / name).unlink(missing_ok=True)
            before = set(dst.iterdir())
            try:
                yield
            except BaseException:
                failed = True
                for path in set(dst.iterdir()) - before:
                    if path.is_file():
                        path.unlink(missing_ok=True)
                raise
        finally:
            if failed and ours:  # a failure leaves the folder as it found it
                lock_path.unlink(missing_ok=True)
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
            if failed and created and not any(dst.iterdir()):
                dst.rmdir()


def writing(root: Path) -> bool:
    """Whether a preparation is writing into `root` now (it holds `root/.preparing`)."""
    path = root / WRITING
    try:
        with open(path, "rb") as lock:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    except OSError:  # no such file: nobody writes
        return False
    return False


def unfinished(root: Path) -> str:
    """For a not-found message: a sentence on the arrays `root` holds without a manifest (empty when it
    holds none, or its manifest). A preparation killed before its end (kill -9, a node lost) leaves them:
    `no_partial_output` cleans up after an exception, and the manifest is written last."""
    arrays = sorted(p.name for p in root.glob("*_images.npy")) if root.is_dir() else []
    if not arrays or (root / MANIFEST).is_file():
        return ""
    if writing(root):
        return (
            f" {root} holds {', '.join(arrays)} but no {MANIFEST} yet: a preparation is writing into it now "
            "(the manifest comes last); wait for it to finish."
        )
    return (
        f" {root} holds {', '.join(arrays)} but no {MANIFEST}: a preparation into it did not finish (the "
        "manifest is written last); run it again, it rewrites them."
    )


def check_free_space(dst: Path, need: int, what: str, advice: str) -> None:
    """Create `dst`; OSError, naming `what` needs how much, if its disk cannot hold `need` more bytes
    (files of `dst` a conversion rewrites in place count as free). Checked before the arrays are made:
    they are sparse memory maps, and a disk that fills up under one kills the process with SIGBUS, with
    no message and a half-written array left behind."""
    dst.mkdir(parents=True, exist_ok=True)
    rewritten = sum(f.stat().st_size for f in dst.glob("*.npy") if f.is_file())
    free = shutil.disk_usage(dst).free + rewritten
    if need > free:
        raise OSError(f"{dst}: {what} needs {_size(need)}, only {_size(free)} are free ({advice})")


def _size(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def create_arrays(dst: Path, split: str, count: int, shape: tuple[int, int, int], labels: bool):
    """Pre-allocate `<split>_images.npy` (and `<split>_labels.npy`) as writable memory maps."""
    dst.mkdir(parents=True, exist_ok=True)
    images = np.lib.format.open_memmap(
        dst / f"{split}_images.npy", mode="w+", dtype=np.uint8, shape=(count, *shape)
    )
    label_array = None
    if labels:
        label_array = np.lib.format.open_memmap(
            dst / f"{split}_labels.npy", mode="w+", dtype=np.int16, shape=(count,)
        )
    return images, label_array


def write_manifest(
    dst: Path, source: str, splits: dict[str, dict], extra: dict | None = None, progress: bool = True
) -> dict:
    """Hash every array file of `splits` and write `manifest.json` (last, so its presence means done)."""
    files = {}
    for info in splits.values():
        for key in ("images", "labels"):
            if info.get(key):
                path = dst / info[key]
                files[info[key]] = {
                    "bytes": path.stat().st_size,
                    "sha256": sha256_file(path, progress=progress),
                }
    manifest = {"format": FORMAT, "source": source, "splits": splits, "files": files, **(extra or {})}
    _atomic_write_json(dst / MANIFEST, manifest)
    _write_stamp(dst, manifest)
    return manifest


def _atomic_write_json(path: Path, obj: dict) -> None:
    """A crash mid-write leaves the previous file (or none), never half a manifest."""
    with atomic_write(path) as f:
        f.write((json.dumps(obj, indent=2) + "\n").encode())


# -- reading -----------------------------------------------------------------------------------------
def read_manifest(root: Path, source: str) -> dict:
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(
            f"{path}: not a readable manifest ({err}); re-run `python -m act_lightning.prepare`"
        ) from err
    if manifest.get("format") != FORMAT or manifest.get("source") != source:
        raise DataError(
            f"{path}: expected a manifest of format {FORMAT!r} for source {source!r}, found format "
            f"{manifest.get('format')!r} for source {manifest.get('source')!r}"
        )
    return manifest


def check_files(
    root: Path, manifest: dict, verify: bool, switch: str = " (data.verify=false skips this check)"
) -> None:
    """Every file the manifest lists exists with its recorded size; with `verify`, also its SHA-256 (a
    mismatch's message ends with `switch`, how a run turns the check off).

    Hashing is skipped for files unchanged (same size and mtime) since they last matched, so only the
    first run after `prepare` (or after a file changed) pays for it.
    """
    stamp = _read_stamp(root)
    changed = False
    for name, info in manifest["files"].items():
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: {root / MANIFEST} lists it; {_rerun(root, manifest)}"
            )
        size = path.stat().st_size
        if size != info["bytes"]:
            raise DataError(
                f"{path} holds {size} bytes, the manifest records {info['bytes']}: the file is truncated or "
                f"was overwritten; {_rerun(root, manifest)}"
            )
        if verify and stamp.get(name) != _fingerprint(path):
            digest = sha256_file(path, progress=size > 1 << 28)
            if digest != info["sha256"]:
                raise DataError(
                    f"{path}: checksum mismatch (sha256 {digest}, the manifest records {info['sha256']}); "
                    f"the file is corrupt: {_rerun(root, manifest)}{switch}"
                )
            stamp[name] = _fingerprint(path)
            changed = True
    if changed:
        try:
            _atomic_write_json(root / _STAMP, stamp)
        except OSError:
            pass  # a read-only data folder: verify again next time


def manifest_digest(manifest: dict, split: str) -> str:
    """A digest of one split of a prepared folder, from the checksums its manifest records for the split's
    files (`reference_fingerprint`)."""
    names = [v for k, v in manifest["splits"][split].items() if isinstance(v, str) and v in manifest["files"]]
    checksums = {name: manifest["files"][name]["sha256"] for name in sorted(names)}
    return hashlib.sha256(json.dumps(checksums, sort_keys=True).encode()).hexdigest()


def _rerun(root: Path, manifest: dict) -> str:
    """What to do about a prepared file that is not as its manifest records: prepare again, from the
    official files the manifest names (`from`)."""
    source = manifest.get("from")
    return f"re-run `python -m act_lightning.prepare` into {root}" + (f" from {source}" if source else "")


def _fingerprint(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _read_stamp(root: Path) -> dict:
    try:
        return json.loads((root / _STAMP).read_text())
    except (OSError, ValueError):
        return {}


def _write_stamp(root: Path, manifest: dict) -> None:
    _atomic_write_json(root / _STAMP, {name: _fingerprint(root / name) for name in manifest["files"]})


def open_array(path: Path, dtype: np.dtype, ndim: int) -> np.ndarray:
    """Memory-map a `.npy` file read-only, refusing pickled object arrays and unexpected dtypes."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npy array ({err})") from err
    if array.dtype != dtype or array.ndim != ndim:
        raise DataError(
            f"{path}: expected a {ndim}-d {np.dtype(dtype)} array, found {array.dtype} of shape {array.shape}"
        )
    return array


class PreparedArrays(Dataset):
    """One split of a prepared folder: `(uint8 (C, H, W) tensor, label)` by random access.

    The memory maps are opened lazily in each process (never pickled into workers).
    """

    def __init__(self, root: Path, split: dict, conditional: bool) -> None:
        self.images_path = root / split["images"]
        self.labels_path = root / split["labels"] if split.get("labels") else None
        self.count = int(split["count"])
        self.conditional = conditional and self.labels_path is not None
        self._images: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        self._check()

    def _check(self) -> None:
        images = open_array(self.images_path, np.dtype(np.uint8), 4)
        if images.shape[0] < self.count:
            raise DataError(
                f"{self.images_path}: holds {images.shape[0]} images, the manifest records {self.count}"
            )
        if self.labels_path is not None:
            labels = open_array(self.labels_path, np.dtype(np.int16), 1)
            if labels.shape[0] < self.count:
                raise DataError(
                    f"{self.labels_path}: holds {labels.shape[0]} labels, the manifest records {self.count}"
                )

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self._arrays()[0].shape[1:])

    def _arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self._images is None:
            self._images = np.load(self.images_path, mmap_mode="r", allow_pickle=False)
            if self.labels_path is not None:
                self._labels = np.load(self.labels_path, mmap_mode="r", allow_pickle=False)
        return self._images, self._labels

    def labels(self) -> np.ndarray | None:
        """All labels of the split (int64), or None for an unlabelled split."""
        labels = self._arrays()[1]
        return None if labels is None else np.asarray(labels[: self.count], dtype=np.int64)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None, "_labels": None}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        images, labels = self._arrays()
        image = torch.from_numpy(np.array(images[index]))  # (C, H, W) uint8, copied out of the map
        label = int(labels[index]) if self.conditional else 0
        return image, label
