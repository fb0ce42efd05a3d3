"""The shared parts of every DataModule: uint8 -> [-1, 1], device flips, halves, the shared image pipeline."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from act_lightning.data import DataError, HalfBatch, ImageDataModule
from act_lightning.data.base import random_hflip, to_signed
from act_lightning.data.images import center_crop, decode_image, load_image
from act_lightning.data.storage import PackedBytes


class _Tiny(ImageDataModule):
    def __init__(self, **kwargs):
        super().__init__(root=None, batch_size=2, image_size=4, channels=1, **kwargs)

    def build_train_dataset(self):
        images = torch.arange(16 * 16, dtype=torch.uint8).reshape(16, 1, 4, 4)  # distinct rows, values < 256
        return TensorDataset(images, torch.arange(16))


def test_to_signed_maps_the_byte_range_onto_minus_one_one():
    x = torch.tensor([0, 127, 255], dtype=torch.uint8)
    assert torch.allclose(to_signed(x), torch.tensor([-1.0, 127 / 127.5 - 1, 1.0]))
    f = torch.rand(3)
    assert to_signed(f) is f  # float images pass through


def test_random_hflip_mirrors_whole_examples():
    x = torch.arange(64 * 2 * 3, dtype=torch.float32).reshape(64, 1, 2, 3)
    y = random_hflip(x, torch.Generator().manual_seed(0))
    same = (y == x).flatten(1).all(1)
    mirrored = (y == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 10 < int(mirrored.sum()) < 54


def test_batches_become_float_halves_with_flips_on_the_device():
    dm = _Tiny(hflip=True, seed=3)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (4, 1, 4, 4)
    half = dm.on_after_batch_transfer((images, labels), 0)
    assert isinstance(half, HalfBatch)
    assert half.gen.shape == half.disc.shape == (2, 1, 4, 4) and half.gen.dtype == torch.float32
    assert half.gen.min() >= -1 and half.gen.max() <= 1
    expected = to_signed(images)
    for got, want in zip(torch.cat([half.gen, half.disc]), expected, strict=True):
        assert torch.equal(got, want) or torch.equal(got, want.flip(-1))
    assert torch.equal(torch.cat([half.gen_labels, half.disc_labels]), labels)


def test_flips_are_deterministic_for_a_seed():
    batch = (torch.arange(64 * 6, dtype=torch.uint8).reshape(64, 1, 2, 3), torch.zeros(64, dtype=torch.long))
    a, b = _Tiny(hflip=True, seed=1), _Tiny(hflip=True, seed=1)
    assert torch.equal(a.on_after_batch_transfer(batch, 0).gen, b.on_after_batch_transfer(batch, 0).gen)


def test_reference_loader_yields_float_images_unflipped():
    dm = _Tiny(hflip=True)
    images, _ = next(iter(dm.reference_dataloader(batch_size=16)))
    assert images.dtype == torch.float32
    assert torch.equal(images, to_signed(torch.arange(256, dtype=torch.uint8).reshape(16, 1, 4, 4)))


def test_packed_bytes_round_trips():
    items = [b"", b"a", b"\x00\xffkey\x00", "é".encode()]
    packed = PackedBytes(items)
    assert len(packed) == 4 and [packed[i] for i in range(4)] == items


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("method", ["adm", "box"])
def test_center_crop_takes_the_middle_square(method):
    array = np.zeros((40, 100, 3), dtype=np.uint8)
    array[:, 30:70] = 255  # a white square in the middle of a wide black image
    out = center_crop(Image.fromarray(array), 20, method)
    assert out.shape == (20, 20, 3)
    assert out[:, 2:-2].min() > 200  # only white remains (edges may blend)


def test_load_image_handles_modes_and_formats():
    rgba = Image.new("RGBA", (30, 50), (255, 0, 0, 128))
    for fmt in ("PNG", "WEBP"):
        x = load_image(_encoded(rgba, fmt), "x", 16)
        assert x.shape == (3, 16, 16) and x.dtype == torch.uint8
    grey = load_image(_encoded(Image.new("L", (64, 64), 7), "JPEG"), "x", 8, channels=1)
    assert grey.shape == (1, 8, 8)
    big = load_image(
        _encoded(Image.new("RGB", (1024, 800), (0, 200, 0)), "JPEG"), "x", 32
    )  # decoded in draft
    assert big.shape == (3, 32, 32) and abs(int(big[1].float().mean()) - 200) < 3


def test_undecodable_bytes_name_their_source():
    with pytest.raises(DataError, match=r"somewhere/x\.jpg: the image does not decode"):
        decode_image(b"not an image", "somewhere/x.jpg")
    truncated = _encoded(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")[:200]
    with pytest.raises(DataError, match="does not decode"):
        decode_image(truncated, "t.jpg")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_conversion_and_flips_run_on_the_gpu():
    dm = _Tiny(hflip=True, seed=0)
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    half = dm.on_after_batch_transfer((images.cuda(), torch.zeros(64, dtype=torch.long, device="cuda")), 0)
    assert half.gen.is_cuda and half.gen.dtype == torch.float32
    got, want = torch.cat([half.gen, half.disc]).cpu(), to_signed(images)
    same = torch.isclose(got, want, atol=1e-6).flatten(1).all(1)  # CUDA divides via the reciprocal
    mirrored = torch.isclose(got, want.flip(-1), atol=1e-6).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 10 < int(mirrored.sum()) < 54
