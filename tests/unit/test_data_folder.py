"""data=folder: a folder tree of png / jpg / webp images, optional labels from sub-folders, bad input."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from act_lightning.data import DataError, FolderDataModule
from act_lightning.data import folder as folder_module
from act_lightning.data.images import load_image
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


def test_hidden_folders_are_skipped_and_the_tree_is_walked_in_sorted_order(tmp_path):
    names = ["f", "e", "d", "c", "b", "a"]  # created in reverse order: a walk in listing order is unsorted
    for name in names:
        write_image_folder(tmp_path, classes=(name,), per_class=1)
    write_image_folder(tmp_path, classes=(".thumbnails",), per_class=2)
    dm = _dm(tmp_path)
    dm.setup("fit")
    paths = [dm.train_set.path(i) for i in range(len(dm.train_set))]
    assert paths == [str(tmp_path / name / "img_0.png") for name in sorted(names)]
    assert dm.count_train_images(100) == 6


def test_suffixes_are_matched_in_any_case(tmp_path, caplog):
    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "SHOUTING.JPG", format="JPEG")
    dm = _dm(tmp_path)
    dm.check_source()
    dm.setup("fit")
    assert len(dm.train_set) == 1 and dm.count_train_images(10) == 1
    assert not caplog.records  # nothing else there, nothing to say
    # files of other kinds beside the images were passed over in silence (a .gif, .bmp or .tiff: not read)
    Image.new("RGB", (20, 20)).save(tmp_path / "a.gif", format="GIF")
    Image.new("RGB", (20, 20)).save(tmp_path / "b.bmp", format="BMP")
    with caplog.at_level(logging.WARNING, logger="act_lightning.data.folder"):
        _dm(tmp_path).setup("fit")
    assert "1 images (.png, .jpg, .jpeg, .webp); 2 other files are not read (1 .gif, 1 .bmp)" in caplog.text


def test_no_images_message_counts_files_without_a_suffix_and_several_suffixes(tmp_path):
    for name in ("README", "LICENSE", "a.txt", "b.txt", "c.txt", "d.csv"):
        (tmp_path / name).write_text("x")
    for check in (lambda dm: dm.setup("fit"), lambda dm: dm.check_source()):
        with pytest.raises(FileNotFoundError, match=r"found 3 \.txt, 2 \(no suffix\), 1 \.csv$"):
            check(_dm(tmp_path))


def test_check_source_checks_the_root_and_its_first_image_are_readable(folder, monkeypatch):
    for unreadable in (folder, folder / "cats" / "img_0.png"):

        def check(path, unreadable=unreadable):
            if path == unreadable:
                raise PermissionError(f"{path} cannot be read")

        monkeypatch.setattr(folder_module, "check_readable", check)
        with pytest.raises(PermissionError, match=rf"{unreadable} cannot be read"):
            _dm(folder).check_source()


def test_fewer_classes_than_sub_folders_are_refused(folder):
    with pytest.raises(DataError, match=r"data.num_classes=1, but .* has 2 class sub-folders"):
        _dm(folder, num_classes=1).setup("fit")


def test_count_train_images_counts_images_only_and_stops_at_enough(folder, tmp_path):
    assert _dm(folder).count_train_images(3) == 3
    assert _dm(folder).count_train_images(100) == 10
    write_image_folder(tmp_path, classes=("a",), per_class=2)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    assert _dm(tmp_path).count_train_images(100) == 2


def test_folder_images_use_the_adm_crop(folder):
    dm = _dm(folder)
    dm.setup("fit")
    for i in range(3):
        path = dm.train_set.path(i)
        data = Path(path).read_bytes()
        assert torch.equal(dm.train_set[i][0], load_image(data, path, 16, method="adm"))
        assert not torch.equal(dm.train_set[i][0], load_image(data, path, 16, method="box"))


def test_a_class_count_mismatch_shows_at_most_ten_class_names(tmp_path):
    names = [f"class_{i:02d}" for i in range(12)]
    for name in names:
        write_image_folder(tmp_path, classes=(name,), per_class=1)
    with pytest.raises(
        DataError, match=r"has 12 class sub-folders with images \(class_00, .*, class_09, \.\.\.\)"
    ):
        _dm(tmp_path, num_classes=3).setup("fit")


def test_defaults_of_the_folder_data_module_and_the_jpeg_suffix(tmp_path):
    dm = FolderDataModule(root=str(tmp_path))
    assert (dm.batch_size, dm.image_size, dm.channels, dm.verify) == (64, 64, 3, True)
    Image.new("RGB", (20, 20), (0, 255, 0)).save(tmp_path / "photo.jpeg", format="JPEG")
    assert _dm(tmp_path).count_train_images(10) == 1


def test_a_link_back_up_the_tree_is_not_followed_round_and_round(tmp_path):
    """`x/up -> ..` made os.walk(followlinks=True) list x's image again under x/up/x/up/... (41 times, until
    paths were too long); a link to a folder elsewhere is still followed."""
    from act_lightning.data.folder import scan_images

    write_image_folder(tmp_path / "root", classes=("x",), per_class=1)
    write_image_folder(tmp_path / "other", classes=("y",), per_class=1)
    (tmp_path / "root" / "x" / "up").symlink_to("..")
    (tmp_path / "root" / "x" / "linked").symlink_to(tmp_path / "other" / "y")
    images, _ = scan_images(tmp_path / "root")
    assert [str(p.relative_to(tmp_path / "root")) for p in images] == ["x/img_0.png", "x/linked/img_0.png"]


def test_a_16_bit_grey_image_is_scaled_to_8_bits_not_clipped_to_white():
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")  # 16-bit grey PNG (mode I;16)
    image = load_image(buffer.getvalue(), "ramp.png", size=64, channels=1)
    assert image.dtype == torch.uint8
    torch.testing.assert_close(image[0, 0], torch.from_numpy((ramp[0] >> 8).astype(np.uint8)), rtol=0, atol=1)
    assert int(image.min()) == 0 and (image == 255).float().mean() < 0.05  # was: 99% white


def test_a_class_folder_without_images_is_refused_not_dropped(tmp_path):
    """Every sub-folder is a class (torchvision's ImageFolder): an empty one, or one of files that are not
    read, was left out, and each class after it took the index before its own without a word."""
    write_image_folder(tmp_path, classes=("apple", "mango"), per_class=2)
    (tmp_path / "banana").mkdir()
    (tmp_path / ".cache").mkdir()  # hidden: no class
    with pytest.raises(DataError, match=r"takes each sub-folder of .* as a class, but banana holds no image"):
        _dm(tmp_path, num_classes=2).setup("fit")
    (tmp_path / "banana" / "a.bmp").write_bytes(b"BM")
    with pytest.raises(DataError, match=r"but banana holds no image \(\.png"):
        _dm(tmp_path, num_classes=3).setup("fit")
    dm = _dm(tmp_path, num_classes=None)  # unconditional: the folders are no classes
    dm.setup("fit")
    assert dm.label_names() is None
    (tmp_path / "banana" / "a.bmp").unlink()
    (tmp_path / "banana").rmdir()
    dm = _dm(tmp_path, num_classes=2)
    dm.setup("fit")
    assert dm.label_names() == ["apple", "mango"]


def test_the_reference_fingerprint_changes_when_an_image_is_replaced_by_another(tmp_path):
    # cached FID statistics (eval.reference_cache) of a folder were read back after its images had been
    # replaced by others, the same count: the run scored against the old images' statistics
    root = write_image_folder(tmp_path / "images", per_class=3)
    first = _dm(root).reference_fingerprint()
    assert _dm(root).reference_fingerprint() == first  # the same images: the same digest
    write_image_folder(root, per_class=3, seed=1)  # the same names and count, other images
    assert _dm(root).reference_fingerprint() != first
