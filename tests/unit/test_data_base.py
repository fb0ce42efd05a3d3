"""The shared parts of every DataModule: uint8 -> [-1, 1], device flips, halves, the shared image pipeline."""

from __future__ import annotations

import io
import os
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import TensorDataset

from act_lightning.data import (
    CIFAR10DataModule,
    DataError,
    DigitsDataModule,
    FolderDataModule,
    HalfBatch,
    ImageDataModule,
    ImageNet64DataModule,
    LSUNDataModule,
    SyntheticDataModule,
    storage,
)
from act_lightning.data.base import random_hflip, reference_indices, to_signed
from act_lightning.data.digits import load_digits_split
from act_lightning.data.images import center_crop, decode_image, load_image, to_chw_uint8
from act_lightning.data.storage import PackedBytes
from act_lightning.data.synthetic import SyntheticImages
from act_lightning.seeds import FLIP, mix_seed


class _Tiny(ImageDataModule):
    def __init__(self, **kwargs):
        super().__init__(**(dict(batch_size=2, image_size=4, channels=1) | kwargs))

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
    many = torch.zeros(40000, 1, 1, 2)
    many[..., 1] = 1
    share = (random_hflip(many, torch.Generator().manual_seed(1))[..., 0] == 1).float().mean().item()
    assert 0.49 < share < 0.51  # each image mirrored with probability 1/2 (sd 0.0025)


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


def _attach_trainer(
    dm: ImageDataModule, k: int | None, global_step: int, rank: int = 0, world_size: int = 1
) -> None:
    """What the flips read of a trainer: its rank and world size, its step, and the module's `k` (if any)."""
    module = SimpleNamespace() if k is None else SimpleNamespace(k=k)
    dm.trainer = SimpleNamespace(
        global_rank=rank,
        world_size=world_size,
        global_step=global_step,
        lightning_module=module,
        training=False,
    )


def test_flips_are_seeded_from_the_act_iteration_not_the_optimiser_step():
    cpu = torch.device("cpu")
    seeds = {}
    for k, global_step in [(5, 10), (5, 11), (6, 10)]:
        dm = _Tiny(hflip=True, seed=3)
        _attach_trainer(dm, k=k, global_step=global_step, rank=1, world_size=2)
        seeds[k, global_step] = dm._flip_generator_for(cpu).initial_seed()
        assert dm._flip_generator_for(cpu).initial_seed() == mix_seed(3, k + 1, FLIP, 0)  # the next batch
    assert seeds[5, 10] == seeds[5, 11] == mix_seed(3, 5, FLIP, 0)  # (seed, k, FLIP, 0) on every rank
    assert seeds[6, 10] != seeds[5, 10]
    dm = _Tiny(hflip=True, seed=3)
    _attach_trainer(dm, k=None, global_step=10)  # a module that counts no ACT iterations
    assert dm._flip_generator_for(cpu).initial_seed() == mix_seed(3, 0, FLIP, 0)


def test_each_rank_flips_on_as_it_would_have_after_a_resume_from_rank_zeros_checkpoint():
    """Under DDP only rank 0's data-module state is written, and every rank reads it back: each rank must
    still go on with its own flips, the ones it would have drawn without the stop."""
    batch = (torch.arange(64 * 6, dtype=torch.uint8).reshape(64, 1, 2, 3), torch.zeros(64, dtype=torch.long))

    def rank(r: int, state: dict | None = None) -> _Tiny:
        dm = _Tiny(hflip=True, seed=1)
        _attach_trainer(dm, k=0, global_step=0, rank=r, world_size=2)
        if state is not None:
            dm.load_state_dict(state)
        return dm

    def flipped(dm: _Tiny) -> Tensor:
        return dm.on_after_batch_transfer(batch, 0).gen

    straight = [rank(0), rank(1)]
    for _ in range(3):
        for dm in straight:
            flipped(dm)
    saved = straight[0].state_dict()  # what the checkpoint holds
    resumed = [rank(0, saved), rank(1, saved)]
    for _ in range(2):
        expected = [flipped(dm) for dm in straight]
        assert not torch.equal(expected[0], expected[1])  # the ranks flip their own global positions
        for dm, want in zip(resumed, expected, strict=True):
            assert torch.equal(flipped(dm), want)


def test_one_device_and_several_flip_the_same_images_of_a_global_batch():
    """The coins are drawn for the global batch [gen | fake | real] and each rank's share [gen_r | fake_r |
    real_r] takes its positions' coins: two ranks' flipped shares are the one device's flipped global
    batch, sharded. (Each rank with its own coins, as before, flipped other images.)"""
    from act_lightning.data.base import shard_of_global_batch

    images = torch.arange(16 * 6, dtype=torch.uint8).reshape(16, 1, 2, 3)
    labels = torch.arange(16)

    def flipped(rank: int, world: int) -> Tensor:
        dm = _Tiny(hflip=True, seed=5)
        _attach_trainer(dm, k=3, global_step=6, rank=rank, world_size=world)
        mine = shard_of_global_batch(list(range(16)), rank, world)
        half = dm.on_after_batch_transfer((images[mine], labels[mine]), 0)
        return torch.cat([half.gen, half.disc])

    one = flipped(0, 1)
    for world in (2, 4):
        for rank in range(world):
            mine = shard_of_global_batch(list(range(16)), rank, world)
            assert torch.equal(flipped(rank, world), one[mine])
    assert not torch.equal(one, to_signed(images)) and not torch.equal(one, to_signed(images).flip(-1))


def test_path_is_the_absolute_root_and_only_sources_with_files_need_one(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _Tiny(root="~/data/../images").path == tmp_path.resolve() / "images"
    assert _Tiny(root=tmp_path).root == str(tmp_path)  # a Path is kept as the string the config holds
    with pytest.raises(ValueError, match="data.root is not set"):
        _Tiny().path  # noqa: B018


def test_sources_in_memory_have_nothing_to_check(tmp_path):
    _Tiny(root=tmp_path / "nothing").check_source()
    SyntheticDataModule(batch_size=2, image_size=4).check_source()
    DigitsDataModule().check_source()
    assert list(tmp_path.iterdir()) == []


FILE_SOURCES = {
    # class: (defaults of the base arguments it had before they moved into ImageDataModule)
    CIFAR10DataModule: dict(batch_size=80, image_size=32, num_classes=None, num_workers=4),
    ImageNet64DataModule: dict(batch_size=320, image_size=64, num_classes=1000, num_workers=8),
    LSUNDataModule: dict(batch_size=80, image_size=256, num_classes=None, num_workers=8),
    FolderDataModule: dict(batch_size=64, image_size=64, num_classes=None, num_workers=8),
}


@pytest.mark.parametrize("cls", list(FILE_SOURCES), ids=lambda c: c.__name__)
def test_file_sources_keep_their_defaults_and_the_config_wins(cls):
    dm = cls(root="x")
    for key, value in FILE_SOURCES[cls].items():
        assert getattr(dm, key) == value, key
    assert (dm.channels, dm.seed, dm.hflip, dm.pin_memory, dm.persistent_workers) == (3, 0, True, True, True)
    dm = cls(root="x", num_workers=0, hflip=False, seed=7, batch_size=6)
    assert (dm.num_workers, dm.persistent_workers, dm.hflip, dm.seed) == (0, False, False, 7)
    assert dm.batch_size == 6
    with pytest.raises(TypeError, match="batch_sise"):  # a mistyped config key is refused, not ignored
        cls(root="x", batch_sise=3)
    with pytest.raises(ValueError, match="data.batch_size must be a positive even number"):
        cls(root="x", batch_size=0)
    with pytest.raises(ValueError, match="data.num_workers must be an integer >= 0"):
        cls(root="x", num_workers=-1)  # torch's own refusal came at the first batch, without the key
    with pytest.raises(ValueError, match="data.batch_size must be a positive even number .* got 'abc'"):
        cls(root="x", batch_size="abc")


EVERY_SOURCE = {
    CIFAR10DataModule: dict(root="x"),
    ImageNet64DataModule: dict(root="x"),
    LSUNDataModule: dict(root="x"),
    FolderDataModule: dict(root="x"),
    DigitsDataModule: {},
    SyntheticDataModule: dict(batch_size=2, image_size=4),
}


@pytest.mark.parametrize("cls", list(EVERY_SOURCE), ids=lambda c: c.__name__)
@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "10"])
def test_every_source_reads_num_classes_one_way_null_or_a_positive_count(cls, bad):
    """0 was unconditional for LSUN and folder data but refused by ImageNet 64; a class-conditional
    network built from it gets an embedding of no classes. Every source now refuses it, naming null."""
    with pytest.raises(
        ValueError,
        match=rf"data.num_classes must be null \(unconditional\) or a number of classes >= 1, got {bad!r}",
    ):
        cls(**EVERY_SOURCE[cls], num_classes=bad)
    assert cls(**EVERY_SOURCE[cls], num_classes=None).num_classes is None


def test_manifest_is_replaced_atomically(tmp_path, monkeypatch):
    images, _ = storage.create_arrays(tmp_path, "train", 2, (1, 2, 2), labels=False)
    del images
    splits = {"train": {"count": 2, "images": "train_images.npy", "labels": None}}
    storage.write_manifest(tmp_path, "test", splits, progress=False)
    before = (tmp_path / storage.MANIFEST).read_text()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # fails after the new manifest was written in full
    with pytest.raises(OSError, match="No space left on device"):
        storage.write_manifest(tmp_path, "another source", splits, progress=False)
    assert (tmp_path / storage.MANIFEST).read_text() == before  # the old manifest, whole
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        ".verified.json",
        "manifest.json",
        "train_images.npy",
    ]  # and no temporary file left behind


def test_a_preparation_writes_alone_and_is_told_from_a_killed_one_while_it_writes(tmp_path):
    dst = tmp_path / "prepared"
    with storage.no_partial_output(dst):
        images, _ = storage.create_arrays(dst, "train", 2, (1, 2, 2), labels=False)
        assert storage.writing(dst)
        assert "a preparation is writing into it now" in storage.unfinished(dst)
        with pytest.raises(DataError, match="another preparation is writing into it now"):
            with storage.no_partial_output(dst):  # a second one (flock: also from another process)
                pass
        assert (dst / "train_images.npy").is_file()  # the refused one removed nothing
    # done writing (no manifest here: as a kill would leave it, had it come before the manifest)
    assert not storage.writing(dst)
    assert "a preparation into it did not finish" in storage.unfinished(dst)
    with pytest.raises(RuntimeError, match="decode"):  # a failed one removes its arrays and its folder
        with storage.no_partial_output(tmp_path / "other"):
            storage.create_arrays(tmp_path / "other", "train", 2, (1, 2, 2), labels=False)
            raise RuntimeError("an image that does not decode")
    assert not (tmp_path / "other").exists()


def test_a_waiter_whose_lock_file_was_removed_locks_the_file_there_now(tmp_path):
    # a failed CIFAR-10 download removes the folder it made, lock file included, while it holds the lock:
    # the node that waited must then hold the lock of the file at that path, or a node that came later
    # would create a new lock file and prepare the folder beside it
    import fcntl
    import shutil
    import threading

    from act_lightning.data import storage

    folder, seen = tmp_path / "cifar10", []

    def second_node():
        with storage.one_at_a_time(folder), open(folder / storage.LOCK, "a+b") as third:
            try:
                fcntl.flock(third.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append("a third node got in")
            except BlockingIOError:
                seen.append("a third node waits")

    thread = threading.Thread(target=second_node)
    with storage.one_at_a_time(folder):
        thread.start()
        thread.join(timeout=1)
        assert thread.is_alive()
        shutil.rmtree(folder)
    thread.join(timeout=30)
    assert seen == ["a third node waits"]


def test_a_lock_that_is_a_link_to_nowhere_is_named_and_not_waited_on(tmp_path):
    # retrying the open (as after a holder removed the folder) spun forever at full CPU on such a link
    import os

    from act_lightning.data import storage

    (tmp_path / "cifar10").mkdir()
    os.symlink(tmp_path / "gone" / "x", tmp_path / "cifar10" / storage.LOCK)
    with pytest.raises(FileNotFoundError, match=r"\.prepare\.lock: a link to a missing file; remove it"):
        with storage.one_at_a_time(tmp_path / "cifar10"):
            pass


def test_reference_loader_yields_float_images_unflipped():
    dm = _Tiny(hflip=True)
    images, _ = next(iter(dm.reference_dataloader(batch_size=16)))
    assert images.dtype == torch.float32
    assert torch.equal(images, to_signed(torch.arange(256, dtype=torch.uint8).reshape(16, 1, 4, 4)))


def test_reference_loader_reads_every_image_once_the_last_chunk_partial_on_any_rank_count():
    dm = _Tiny()
    everything = to_signed(torch.arange(256, dtype=torch.uint8).reshape(16, 1, 4, 4))
    for world in (1, 2, 3):
        read = [x for rank in range(world) for x, _ in dm.reference_dataloader(5, rank, world)]
        assert sum(len(x) for x in read) == 16  # chunks of 5, 5, 5 and 1
        assert torch.equal(torch.cat(read).flatten(1).sort(0).values, everything.flatten(1).sort(0).values)
    (first,) = [x for x, _ in dm.reference_dataloader(16, max_images=4)]
    assert torch.equal(first, everything[[0, 5, 10, 15]])  # evenly spaced, both ends included
    assert reference_indices(10, 4) == [0, 3, 6, 9] and reference_indices(11, 4) == [0, 3, 7, 10]


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


def test_prepared_arrays_check_their_rank_dtype_rows_and_source_against_the_manifest(tmp_path):
    images, labels = storage.create_arrays(tmp_path, "train", 3, (1, 2, 2), labels=True)
    images[:] = np.arange(12, dtype=np.uint8).reshape(3, 1, 2, 2)
    labels[:] = [5, 6, 7]
    images.flush(), labels.flush()
    del images, labels
    split = {"count": 3, "images": "train_images.npy", "labels": "train_labels.npy"}
    data = storage.PreparedArrays(tmp_path, split, conditional=True)
    assert len(data) == 3 and data.labels().tolist() == [5, 6, 7]
    image, label = data[2]
    assert label == 7 and torch.equal(image, torch.arange(8, 12, dtype=torch.uint8).reshape(1, 2, 2))
    assert storage.PreparedArrays(tmp_path, split | {"count": 2}, True).labels().tolist() == [5, 6]
    with pytest.raises(DataError, match=r"train_images\.npy: holds 3 images, the manifest records 4"):
        storage.PreparedArrays(tmp_path, split | {"count": 4}, conditional=True)
    np.save(tmp_path / "short_labels.npy", np.zeros(2, dtype=np.int16))
    with pytest.raises(DataError, match=r"short_labels\.npy: holds 2 labels, the manifest records 3"):
        storage.PreparedArrays(tmp_path, split | {"labels": "short_labels.npy"}, conditional=True)
    np.save(tmp_path / "flat.npy", np.zeros((3, 4), dtype=np.uint8))
    with pytest.raises(
        DataError, match=r"flat\.npy: expected a 4-d uint8 array, found uint8 of shape \(3, 4\)"
    ):
        storage.open_array(tmp_path / "flat.npy", np.dtype(np.uint8), 4)
    # a split without labels: unconditional, whatever the run asks for
    unlabelled = storage.PreparedArrays(
        tmp_path, {"count": 3, "images": "train_images.npy"}, conditional=True
    )
    assert not unlabelled.conditional and unlabelled.labels() is None and unlabelled[1][1] == 0
    storage.write_manifest(tmp_path, "imagenet64", {"train": split}, progress=False)
    assert storage.read_manifest(tmp_path, "imagenet64")["splits"]["train"] == split
    with pytest.raises(
        DataError, match=r"expected a manifest .* for source 'lsun_cat256', found .* 'imagenet64'"
    ):
        storage.read_manifest(tmp_path, "lsun_cat256")


def _noise(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_adm_crop_halves_with_box_while_at_least_twice_the_size_then_resizes_bicubic():
    image = _noise(64, 64)  # exactly twice the target: one BOX halving, then nothing left to resize
    assert np.array_equal(center_crop(image, 32, "adm"), np.asarray(image.resize((32, 32), Image.BOX)))
    image = _noise(40, 61)  # under twice: one BICUBIC resize to round(48.8) x 32, then the middle 32
    expected = np.asarray(image.resize((49, 32), Image.BICUBIC))[:, 8:40]
    assert np.array_equal(center_crop(image, 32, "adm"), expected)


def test_box_crop_is_one_box_resize_then_the_middle_square():
    image = _noise(80, 100)
    expected = np.asarray(image.resize((40, 32), Image.BOX))[:, 4:36]
    assert np.array_equal(center_crop(image, 32, "box"), expected)


def test_jpegs_are_decoded_at_the_smallest_scale_that_keeps_twice_the_size():
    data = _encoded(_noise(400, 512), "JPEG")
    assert decode_image(data, "x").size == (512, 400)
    assert decode_image(data, "x", draft_size=64).size == (128, 100)  # 1/4: 1/8 would be 64 x 50
    reference = center_crop(decode_image(data, "x", draft_size=64), 32, "adm")
    assert torch.equal(load_image(data, "x", 32), torch.from_numpy(reference.transpose(2, 0, 1).copy()))


def test_a_jpeg_decoded_at_a_reduced_scale_is_resized_as_adms_halvings_of_the_full_image():
    # 640 x 427 to 64, decoded at 1/2: the DCT scale rounds 427 / 2 up (214), ADM's halving down (213); the
    # resize and crop that followed were shifted, 5 to 6 levels off a full decode on average (the README
    # said 1 to 1.5)
    from sklearn.datasets import load_sample_images

    photo = Image.fromarray(load_sample_images().images[0]).resize((640, 427), Image.BICUBIC)
    data = _encoded(photo, "JPEG")
    assert decode_image(data, "x", draft_size=128).size == (320, 214)
    full = center_crop(decode_image(data, "x"), 64, "adm").astype(float)
    drafted = center_crop(decode_image(data, "x", draft_size=128), 64, "adm").astype(float)
    loaded = load_image(data, "x", 64).numpy().transpose(1, 2, 0).astype(float)
    assert np.abs(drafted - full).mean() > 4 and np.abs(loaded - full).mean() < 2.5


def test_palette_images_with_transparency_decode_without_a_warning():
    image = Image.new("P", (20, 20))
    image.putpalette([v for c in range(256) for v in (c, 255 - c, c // 2)])
    image.putdata([i % 8 for i in range(400)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=bytes([0, 128, 255, 64, 10, 200, 255, 0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoded = decode_image(buffer.getvalue(), "p.png")
    assert decoded.mode == "RGB" and decoded.getpixel((1, 0)) == (1, 254, 0)


def test_large_images_decode_without_a_decompression_bomb_warning(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 12 x 12 warns (above 200 Pillow refuses)
    data = _encoded(_noise(12, 12), "PNG")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_image(data, "big.png").size == (12, 12)


def test_chw_keeps_rows_and_columns():
    array = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)  # (H, W, C), not square
    out = to_chw_uint8(array)
    assert out.shape == (3, 2, 3) and out[2, 1, 0] == array[1, 0, 2] and out.is_contiguous()
    assert to_chw_uint8(array[:, :, 0]).shape == (1, 2, 3)


def test_digits_split_into_fixed_disjoint_parts_in_minus_one_to_one():
    x, y, hx, hy = load_digits_split()
    assert x.shape == (1500, 1, 8, 8) and hx.shape == (297, 1, 8, 8) and x.dtype == torch.float32
    assert (len(y), len(hy)) == (1500, 297) and y.dtype == torch.int64 and set(hy.tolist()) == set(range(10))
    assert x.min() == -1 and x.max() == 1  # scikit-learn's 0..16 grey levels
    everything = {tuple(row.tolist()) for row in torch.cat([x, hx]).flatten(1)}
    held = {tuple(row.tolist()) for row in hx.flatten(1)}
    assert len(everything - held) >= 1400 and not held - everything
    assert torch.equal(load_digits_split()[2], hx) and not torch.equal(load_digits_split(seed=1)[2], hx)


def test_digits_module_trains_on_the_training_part_and_holds_out_the_rest():
    dm = DigitsDataModule(split_seed=1)
    _, _, held, _ = load_digits_split(297, seed=1)
    assert len(dm.build_train_dataset()) == 1500
    assert torch.equal(torch.stack([x for x, _ in dm.build_held_out_dataset()]), held)
    for kwargs in ({"image_size": 16}, {"channels": 3}):
        with pytest.raises(ValueError, match="data.image_size must be 8 and data.channels 1"):
            DigitsDataModule(**kwargs)


def test_synthetic_images_are_smooth_seeded_blobs_in_minus_one_to_one():
    dataset = SyntheticImages(8, 16, 3, num_classes=5, seed=2)
    images = torch.stack([dataset[i][0] for i in range(8)])
    assert images.shape == (8, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert images.min() < -0.5 and images.max() > 0.5  # the whole range, not [0, 1]
    assert images[0, 0, 0].unique().numel() > 4  # interpolated, not 4 x 4 blocks
    assert torch.equal(dataset[3][0], SyntheticImages(8, 16, 3, 5, seed=2)[3][0])
    assert not torch.equal(dataset[3][0], SyntheticImages(8, 16, 3, 5, seed=0)[3][0])
    assert {dataset[i][1] for i in range(8)} <= set(range(5)) and len({dataset[i][1] for i in range(8)}) > 1
    assert SyntheticImages(2, 4, 1, num_classes=None)[1][1] == 0


def test_synthetic_module_draws_with_its_seed_and_counts_its_length():
    dm = SyntheticDataModule(length=10, batch_size=2, image_size=8, seed=3)
    assert dm.count_train_images(4) == 10
    assert torch.equal(dm.build_train_dataset()[1][0], SyntheticImages(10, 8, 3, None, seed=3)[1][0])
