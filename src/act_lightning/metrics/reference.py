"""Reference statistics (mu, sigma) for FID: published .npz files, or the training set's, cached as .npz.

Accepted files (read with `allow_pickle=False`: nothing in them is ever unpickled):
- `mu` and `sigma` (EDM's `cifar10-32x32.npz`, our own caches, guided-diffusion's reference batches);
- images under `arr_0`, uint8 (N, H, W, C) (guided-diffusion's reference batches, e.g.
  `VIRTUAL_imagenet64_labeled.npz`), whose statistics are computed with the given feature extractor.
When a file holds both, `mu`/`sigma` are used: they are what published tables were computed against.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from act_lightning.atomic import atomic_write

# Where the published reference files come from, by file name (for the messages of a missing file).
PUBLISHED = {
    "cifar10-32x32.npz": "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz",
    "VIRTUAL_imagenet64_labeled.npz": (
        "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/64/"
        "VIRTUAL_imagenet64_labeled.npz"
    ),
    "VIRTUAL_lsun_cat256.npz": (
        "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/lsun/cat/VIRTUAL_lsun_cat256.npz"
    ),
}


class ReferenceStatisticsError(ValueError):
    """A reference statistics file is missing, unreadable or does not fit the feature extractor."""


def missing_reference_message(path: Path) -> str:
    url = PUBLISHED.get(path.name)
    where = f" Get it from {url}." if url else ""
    return (
        f"eval.reference={path}: no such file.{where} Put it there, point eval.reference at it, or use "
        "eval.reference=train to compute the statistics of the training set (cached as .npz)."
    )


def load_reference(
    path: str | Path,
    num_features: int,
    extract: Callable[[Iterable[Tensor]], tuple[np.ndarray, np.ndarray]] | None = None,
    batch_size: int = 250,
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from `path`. For an `arr_0` image batch, `extract` maps batches of (B, C, H, W)
    images in [-1, 1] to statistics."""
    path = Path(path)
    if not path.is_file():
        raise ReferenceStatisticsError(missing_reference_message(path))
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            if {"mu", "sigma"} <= keys:
                mu, sigma = npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
                images = None
            elif "arr_0" in keys:
                mu = sigma = None
                images = npz["arr_0"]
            else:
                raise ReferenceStatisticsError(
                    f"{path}: expected arrays `mu` and `sigma`, or images under `arr_0`; found {sorted(keys)}"
                )
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ReferenceStatisticsError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    except ValueError as e:
        if isinstance(e, ReferenceStatisticsError):
            raise
        raise ReferenceStatisticsError(f"{path}: holds object arrays, which are never unpickled ({e})") from e

    if images is not None:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ReferenceStatisticsError(
                f"{path}: arr_0 should hold uint8 images of shape (N, H, W, C) with C = 1 or 3; "
                f"found {images.dtype} of shape {images.shape}"
            )
        if extract is None:
            raise ReferenceStatisticsError(f"{path}: holds images (arr_0) but no feature extractor was given")

        mu, sigma = extract(image_batches(images, batch_size))
    if mu.shape != (num_features,) or sigma.shape != (num_features, num_features):
        raise ReferenceStatisticsError(
            f"{path}: statistics of {mu.shape[0] if mu.ndim else '?'}-d features, but the feature "
            f"extractor gives {num_features}-d (mu {mu.shape}, sigma {sigma.shape}): a file made with "
            "another extractor?"
        )
    return mu, sigma


def image_batches(images: np.ndarray, batch_size: int) -> Iterator[Tensor]:
    """(N, H, W, C) uint8 images as batches of (B, C, H, W) floats in [-1, 1]."""
    for start in range(0, len(images), batch_size):
        chunk = rearrange(torch.from_numpy(images[start : start + batch_size]), "b h w c -> b c h w")
        yield chunk.float() / 127.5 - 1  # exact inverse of the uint8 rounding


def require_reference_images(path: Path, metrics: Sequence[str] = ("kid", "pr")) -> None:
    """Refuses, by name, a reference file without images (`arr_0`) for `metrics`, those that need real
    images (KID and precision/recall compare sets of features; FD-DINOv2 measures its own statistics)."""
    with np.load(path, allow_pickle=False) as npz:
        if "arr_0" not in npz.files:
            named = (
                f"metric {metrics[0]} needs" if len(metrics) == 1 else f"metrics {' and '.join(metrics)} need"
            )
            raise ReferenceStatisticsError(
                f"{path}: holds statistics only ({', '.join(sorted(npz.files))}); {named} real images: "
                "eval.reference=train or an .npz with arr_0"
            )


def check_reference_images(path: Path, image_size: int, channels: int) -> None:
    """Refuses, by name, a reference batch whose images (`arr_0`, read from the array's header alone) are
    not the model's size and channels: another data set's batch would be scored without a word."""
    try:
        with zipfile.ZipFile(path) as archive:
            if "arr_0.npy" not in archive.namelist():
                return  # statistics (mu, sigma): their dimension is checked when they are read
            with archive.open("arr_0.npy") as f:
                major, _ = np.lib.format.read_magic(f)
                read = (
                    np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                )
                shape = read(f)[0]
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # load_reference says what is wrong with the file
    if len(shape) == 4 and shape[0] < 2:
        raise ReferenceStatisticsError(
            f"eval.reference={path}: arr_0 holds {shape[0]} image(s); the Fréchet distance's covariance "
            "needs at least 2 (a reference batch holds thousands: ADM's 10,000)"
        )
    nchw = len(shape) == 4 and shape[1] == channels and (shape[2], shape[3]) == (image_size, image_size)
    if nchw and channels != image_size:  # channels first, as torch keeps images: not the evaluators' layout
        raise ReferenceStatisticsError(
            f"eval.reference={path}: arr_0 of shape {tuple(shape)} holds channels first; a reference batch "
            f"holds uint8 images of shape (N, H, W, C), here (N, {image_size}, {image_size}, {channels}) "
            "(numpy: images.transpose(0, 2, 3, 1))"
        )
    if len(shape) == 4 and (shape[1], shape[2], shape[3]) != (image_size, image_size, channels):
        raise ReferenceStatisticsError(
            f"eval.reference={path}: images of {shape[1]}x{shape[2]} with {shape[3]} channel(s), but the "
            f"model generates {image_size}x{image_size} with {channels}: another data set's reference batch?"
        )


def reference_image_batches(path: Path, batch_size: int, count: int) -> Iterator[Tensor]:
    """The first `count` images of a reference batch (`arr_0`) as batches in [-1, 1]."""
    require_reference_images(path)
    with np.load(path, allow_pickle=False) as npz:
        images = npz["arr_0"][:count]
    return image_batches(images, batch_size)


@torch.no_grad()
def reference_image_features(
    reference: str, datamodule, extractor, count: int, batch_size: int, device
) -> Tensor:
    """(N, D) features of up to `count` real images of the reference: the training set's (`train`, from
    `datamodule.reference_dataloader`) or an .npz batch's (arr_0). KID, precision/recall and FD-DINOv2
    compare with them."""
    if str(reference) == "train":
        batches = (x for x, _ in datamodule.reference_dataloader(batch_size, max_images=count))
    else:
        batches = reference_image_batches(Path(reference), batch_size, count)
    return torch.cat([extractor(x.to(device), real=True).float().cpu() for x in batches])


def save_reference(path: str | Path, mu: np.ndarray, sigma: np.ndarray, **meta) -> None:
    """Writes `mu`, `sigma` and scalar/str metadata atomically."""
    with atomic_write(path) as f:
        np.savez(f, mu=mu, sigma=sigma, **{k: np.asarray(v) for k, v in meta.items()})
