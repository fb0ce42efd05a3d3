"""data=folder: a folder tree of png / jpg / webp images, optional labels from sub-folders, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from act_lightning.data import DataError, FolderDataModule
from tests.helpers_data import listing, shards, write_image_folder


def _dm(root, **kwargs) -> FolderDataModule:
    options = dict(batch_size=2, image_size=16, num_workers=0, pin_memory=False, persistent_workers=False)
    return FolderDataModule(root=str(root), **(options | kwargs))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"), classes=("cats", "dogs"), per_class=5)


def test_unconditional_batches_from_any_tree(folder):
    dm = _dm(folder, num_workers=2)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 10
    half = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert half.gen.shape == (2, 3, 16, 16) and half.gen.min() >= -1 and half.gen.max() <= 1
    assert not torch.cat([half.gen_labels, half.disc_labels]).any()


def test_labels_from_sub_folders(folder):
    dm = _dm(folder, num_classes=2, hflip=False)
    dm.setup("fit")
    assert dm.class_names == ["cats", "dogs"]
    images, labels = next(iter(dm.reference_dataloader(batch_size=10)))  # in file order: cats, then dogs
    assert labels.tolist() == [0] * 5 + [1] * 5
    assert images.dtype == torch.float32 and images.shape == (10, 3, 16, 16)


def test_grey_images(folder):
    dm = _dm(folder, channels=1, image_size=8)
    dm.setup("fit")
    assert dm.train_set[0][0].shape == (1, 8, 8)


def test_ranks_see_disjoint_shards(folder):
    dm = _dm(folder, hflip=False)
    dm.setup("fit")
    rank0, rank1 = shards(dm)
    assert len(rank0) == len(rank1) == 4 and not set(rank0) & set(rank1)


def test_empty_folder_says_so(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=rf"data.root={tmp_path} holds no images: .*found 1 \.txt"):
        _dm(tmp_path).setup("fit")


def test_missing_folder_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does-not-exist is not a folder"):
        _dm(tmp_path / "does-not-exist").prepare_data()


def test_class_count_must_match_the_sub_folders(folder):
    with pytest.raises(
        DataError, match=r"data.num_classes=3, but .* has 2 class sub-folders with images \(cats, dogs\)"
    ):
        _dm(folder, num_classes=3).setup("fit")


def test_loose_images_cannot_be_labelled(tmp_path):
    write_image_folder(tmp_path / "a", classes=("x",), per_class=2)
    (tmp_path / "loose.png").write_bytes((tmp_path / "a" / "x" / "img_0.png").read_bytes())
    with pytest.raises(DataError, match=r"1 images sit directly in it \(e\.g\. loose\.png\)"):
        _dm(tmp_path, num_classes=1).setup("fit")


def test_a_file_that_is_not_an_image_is_named_before_training(folder, tmp_path):
    write_image_folder(tmp_path, classes=("a",), per_class=4)
    (tmp_path / "a" / "broken.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match=r"a/broken\.jpg: not an image that can be decoded"):
        _dm(tmp_path).prepare_data()


def test_a_truncated_image_is_named_when_read(tmp_path):
    write_image_folder(tmp_path, classes=("a",), per_class=4)
    path = tmp_path / "a" / "img_1.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[:-5000])  # the header survives, the data does not
    dm = _dm(tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    index = [dm.train_set.path(i) for i in range(len(dm.train_set))].index(str(path))
    with pytest.raises(DataError, match=r"a/img_1\.jpg: the image does not decode"):
        dm.train_set[index]


def test_wrong_channels_are_refused():
    with pytest.raises(ValueError, match=r"data.channels must be 3 \(RGB\) or 1 \(grey\), got 4"):
        FolderDataModule(root="x", channels=4)


# -- start-up checks: cheap, and they create nothing -------------------------------------------------
def test_check_source_accepts_a_tree_with_images(folder):
    before = listing(folder)
    _dm(folder, num_classes=2).check_source()
    assert listing(folder) == before


def test_check_source_on_a_missing_root_names_it_and_creates_nothing(tmp_path):
    root = tmp_path / "mistyped" / "images"
    with pytest.raises(FileNotFoundError, match=rf"data.root={root} is not a folder"):
        _dm(root).check_source()
    assert not (tmp_path / "mistyped").exists()


def test_check_source_on_a_folder_without_images_says_what_it_found(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_text("no images here")
    (tmp_path / ".hidden.png").write_bytes(b"")  # hidden files are not training images
    with pytest.raises(FileNotFoundError, match=rf"data.root={tmp_path} holds no images: .*found 1 \.txt"):
        _dm(tmp_path).check_source()
