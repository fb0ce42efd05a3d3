"""The shared image pipeline: encoded bytes -> PIL image -> centre crop and resize -> uint8 (C, H, W).

Conversion to [-1, 1] happens on the training device (`ImageDataModule.on_after_batch_transfer`);
`to_signed` in `base.py` is the one place that maps [0, 255] to [-1, 1].

Two centre-crop conventions, both from the consistency-model code bases:
- `"box"`: one BOX resize so the short side equals the target, then a centre crop. This is how the
  LSUN LMDBs were converted for ADM / consistency models (guided-diffusion's `lsun_bedroom.py`).
- `"adm"`: halve with BOX while the short side is at least twice the target, then BICUBIC to the
  target, then a centre crop (guided-diffusion's `center_crop_arr`, EDM's "center-crop-dhariwal");
  better for photos much larger than the target.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from act_lightning.data.base import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CROPS = ("box", "adm")


def decode_image(data: bytes, source: str, channels: int = 3, draft_size: int | None = None) -> Image.Image:
    """Decode an encoded image (png, jpeg, webp, ...) into an RGB (channels=3) or L (channels=1) image.

    `source` names the file or key in the error raised when the bytes do not decode. With
    `draft_size`, JPEGs are decoded at the smallest DCT scale whose short side stays >= draft_size.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if draft_size is not None and image.format == "JPEG":
                image.draft("RGB" if channels == 3 else "L", (draft_size, draft_size))
            image.load()
    except UnidentifiedImageError as err:
        raise DataError(
            f"{source}: the image does not decode: not a format Pillow reads (png, jpeg, webp, ...); its "
            f"first bytes are {data[:12]!r}"
        ) from err
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for bad data
        raise DataError(f"{source}: the image does not decode ({type(err).__name__}: {err})") from err
    return eight_bit(image, source).convert("RGB" if channels == 3 else "L")


def eight_bit(image: Image.Image, source: str) -> Image.Image:
    """`image` in a mode that `convert("RGB")` and `convert("L")` read without loss of range: palette and
    alpha images through RGBA (whose alpha the conversion drops), 16-bit grey scaled to 8 bits (Pillow's
    own conversion would clip every level above 255 to white); a floating-point image is refused, naming
    `source`."""
    if image.mode in ("P", "LA", "PA"):
        image = image.convert("RGBA")
    if image.mode.startswith("I"):  # 16-bit grey (I;16*, or I as Pillow opens some)
        image = Image.fromarray(_high_byte(np.asarray(image), image.mode, source), mode="L")
    elif image.mode == "F":
        raise DataError(
            f"{source}: a floating-point image (mode F) has no fixed range: save it with 8 or 16 bits"
        )
    return image


def _high_byte(values: np.ndarray, mode: str, source: str) -> np.ndarray:
    """A 16-bit image's levels scaled to 8 bits (v >> 8, as Pillow reads 16-bit colour PNGs), where
    `Image.convert` clips every level above 255 to white."""
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > 65535:
        raise DataError(
            f"{source}: a {mode} image with levels {low}..{high}; 8 or 16 bits per channel are read (16-bit "
            "levels are scaled to 8)"
        )
    return (values.astype(np.int64) >> 8).astype(np.uint8)


def center_crop(image: Image.Image, size: int, method: str = "adm") -> np.ndarray:
    """Resize so the short side is `size`, then take the central size x size square: (H, W[, C]) uint8."""
    if method == "adm":
        while min(image.size) >= 2 * size:
            image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
        scale = size / min(image.size)
        image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.Resampling.BICUBIC)
    elif method == "box":
        scale = size / min(image.size)
        image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.Resampling.BOX)
    else:
        raise ValueError(f"unknown crop method {method!r}; expected one of {', '.join(CROPS)}")
    array = np.asarray(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top : top + size, left : left + size]


def to_chw_uint8(array: np.ndarray) -> torch.Tensor:
    """(H, W) or (H, W, C) uint8 array -> contiguous (C, H, W) uint8 tensor."""
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.array(array.transpose(2, 0, 1), order="C"))  # a writable copy


def load_image(data: bytes, source: str, size: int, channels: int = 3, method: str = "adm") -> torch.Tensor:
    """Encoded bytes -> (channels, size, size) uint8 tensor, centre-cropped and resized."""
    image = decode_image(data, source, channels, draft_size=2 * size)
    if method == "adm":
        image = halved_as_adm(image, data)
    return to_chw_uint8(center_crop(image, size, method))


def halved_as_adm(image: Image.Image, data: bytes) -> Image.Image:
    """A JPEG decoded at a reduced DCT scale, 1/2^k with each side rounded up, BOX-resized to the size that
    ADM's k halvings of the full image reach (each side rounded down), from which `center_crop` goes on as
    from a full decode. A side the two round apart (427 / 2: 214 against 213) shifted the resize and the
    crop by up to half a pixel: 5 to 7 levels off a full decode on average, where sides that halve evenly
    are about one off. An image decoded whole is returned as it is."""
    with Image.open(io.BytesIO(data)) as header:
        full = header.size
    if image.size == full:
        return image
    halvings = round(math.log2(full[0] / image.size[0]))
    target = full
    for _ in range(halvings):
        target = (target[0] // 2, target[1] // 2)
    return image if target == image.size else image.resize(target, resample=Image.Resampling.BOX)
