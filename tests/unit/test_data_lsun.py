"""LSUN: an LSUN-style LMDB holding webp and jpeg values, its prepared form, and bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from act_lightning.data import DataError, LSUNDataModule, lsun, storage
from act_lightning.data.images import load_image
from act_lightning.data.lsun import LMDBImages, list_keys
from act_lightning.prepare import main as prepare_main
from tests.helpers_data import encode, listing, shards, write_lsun_lmdb

SIZE = 32  # the pipeline is size-agnostic; small images keep the tests fast (the CLI test runs 256)


def _dm(root, **kwargs) -> LSUNDataModule:
    options = dict(batch_size=2, image_size=SIZE, num_workers=0, pin_memory=False, persistent_workers=False)
    return LSUNDataModule(root=str(root), **(options | kwargs))


@pytest.fixture(scope="module")
def lsun_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lsun")
    write_lsun_lmdb(root / "cat", n=8)  # as the official cat.zip unzips: root/cat/data.mdb
    return root


def test_reads_webp_and_jpeg_values(lsun_root):
    keys = list_keys(lsun_root / "cat")
    assert len(keys) == 8
    dataset = LMDBImages(lsun_root / "cat", keys, 256)
    for i in range(len(dataset)):
        image, label = dataset[i]
        assert image.shape == (3, 256, 256) and image.dtype == torch.uint8 and label == 0


def test_train_batches_from_workers_each_opening_the_lmdb(lsun_root):
    dm = _dm(lsun_root, num_workers=2)
    dm.prepare_data()
    dm.setup("fit")
    assert not any(path == str(lsun_root / "cat") for _, path in lsun._ENVS)  # none for workers to inherit
    batches = list(dm.train_dataloader())
    assert len(batches) == 2
    half = dm.on_after_batch_transfer(batches[0], 0)
    assert half.gen.shape == (2, 3, SIZE, SIZE) and half.gen.min() >= -1 and half.gen.max() <= 1
    assert not half.gen_labels.any()


def test_ranks_see_disjoint_shards(lsun_root):
    dm = _dm(lsun_root, hflip=False)
    dm.setup("fit")
    rank0, rank1 = shards(dm)
    assert len(rank0) == len(rank1) == 4 and not set(rank0) & set(rank1)


def test_prepared_form_matches_the_lmdb_pipeline(lsun_root, tmp_path):
    dst = tmp_path / "prepared"
    args = ["lsun_cat256", str(lsun_root), str(dst), "--image-size", str(SIZE), "--workers", "0", "-q"]
    assert prepare_main(args) == 0
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 8 and manifest["image_size"] == SIZE
    images = np.load(dst / "train_images.npy")
    reference = LMDBImages(lsun_root / "cat", list_keys(lsun_root / "cat"), SIZE)
    assert all(np.array_equal(images[i], reference[i][0].numpy()) for i in range(8))
    dm = _dm(dst)
    dm.prepare_data()
    dm.setup("fit")
    assert type(dm.train_set).__name__ == "PreparedArrays"
    half = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert half.gen.shape == (2, 3, SIZE, SIZE)
    # the prepared form's checksums identify its images (cached reference statistics); the LMDB is read as
    # the official release it is
    assert dm.reference_fingerprint() == storage.manifest_digest(manifest, "train")
    assert _dm(lsun_root).reference_fingerprint() is None


def test_prepared_at_another_size_falls_back_to_the_lmdb(lsun_root, tmp_path):
    root = tmp_path / "both"
    write_lsun_lmdb(root / "cat", n=4)
    assert (
        prepare_main(["lsun_cat256", str(root), str(root), "--image-size", "16", "--workers", "0", "-q"]) == 0
    )
    dm = _dm(root)
    dm.setup("fit")
    assert isinstance(dm.train_set, LMDBImages)


def test_prepare_in_parallel_with_max_images(lsun_root, tmp_path, caplog):
    args = [
        "lsun_cat256",
        str(lsun_root / "cat"),
        str(tmp_path),
        "--image-size",
        "16",
        "--workers",
        "2",
        "--max-images",
        "5",
        "-q",
    ]
    assert prepare_main(args) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 5 and manifest["max_images"] == 5
    with caplog.at_level("WARNING", logger="act_lightning.data.lsun"):
        _dm(tmp_path, image_size=16).prepare_data()
    assert "prepared with --max-images 5: training on its 5 images, a subset of the category" in caplog.text


def test_missing_lmdb_names_the_files_where_and_where_from(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        _dm(tmp_path).prepare_data()
    message = str(err.value)
    for expected in (
        str(tmp_path / "cat"),
        "data.mdb",
        "http://dl.yf.io/lsun/objects/cat.zip",
        "https://github.com/fyu/lsun",
        "python -m act_lightning.prepare lsun_cat256",
    ):
        assert expected in message


def test_the_arrays_of_a_killed_preparation_are_named_as_unfinished(tmp_path):
    (tmp_path / "train_images.npy").write_bytes(b"")  # what a kill -9 leaves: arrays, no manifest (last)
    with pytest.raises(FileNotFoundError, match="train_images.npy but no manifest.json: a preparation into"):
        _dm(tmp_path).prepare_data()
    with pytest.raises(FileNotFoundError, match="did not finish"):
        _dm(tmp_path).check_source()


def test_undecodable_value_names_the_key(tmp_path):
    write_lsun_lmdb(tmp_path / "cat", n=3, extra={b"ffff-broken": b"RIFF\x00\x00junk"})
    dm = _dm(tmp_path)
    dm.setup("fit")
    index = [dm.train_set.keys[i] for i in range(len(dm.train_set))].index(b"ffff-broken")
    with pytest.raises(DataError, match=r"cat/data\.mdb key 'ffff-broken': the image does not decode") as err:
        dm.train_set[index]
    # met in training, in the data's fixed order (a resume meets it again): how to leave such images out
    fix = f"python -m act_lightning.prepare lsun_cat256 --skip-broken {tmp_path / 'cat'} DST, then train"
    assert fix in str(err.value) and str(err.value).count("--skip-broken") == 1
    from act_lightning.commands import refusal

    lsun.close_lmdb(tmp_path / "cat")  # workers open their own (as the data module leaves them to)
    with pytest.raises(DataError) as caught:  # from a DataLoader worker, as a run with workers meets it
        next(iter(torch.utils.data.DataLoader(torch.utils.data.Subset(dm.train_set, [index]), num_workers=1)))
    assert str(caught.value).startswith("Caught DataError in DataLoader worker process 0.")
    assert str(refusal(caught.value)) == str(err.value)  # the line a run says: the worker's message alone
    with pytest.raises(
        DataError, match=r"key 'ffff-broken': the image does not decode.*--skip-broken"
    ) as err:
        prepare_lsun_quiet(tmp_path, tmp_path / "p")
    assert str(err.value).count("--skip-broken") == 1
    assert not (tmp_path / "p").exists()  # no half-written array without a manifest is left behind
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    with pytest.raises(DataError, match=r"the image does not decode"):
        prepare_lsun_quiet(tmp_path, tmp_path / "mine")  # into a folder of the user's: only ours removed
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    assert prepare_lsun_quiet(tmp_path, tmp_path / "p", "--skip-broken") == 0
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 3 and "ffff-broken" in manifest["skipped"][0]


def prepare_lsun_quiet(src, dst, *extra) -> int:
    from act_lightning.data.lsun import prepare_lsun

    if extra:
        return prepare_main(
            ["lsun_cat256", str(src), str(dst), "--image-size", "16", "--workers", "0", "-q", *extra]
        )
    return prepare_lsun(src, dst, image_size=16, progress=False)


def test_not_an_lmdb_is_named(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "data.mdb").write_bytes(b"\x00" * 10000)
    with pytest.raises(DataError, match=r"cat/data\.mdb: not a readable LMDB"):
        _dm(tmp_path).setup("fit")


def test_an_lmdb_cut_short_is_named_where_a_read_past_its_end_killed_the_process(tmp_path):
    """An interrupted unzip or copy leaves data.mdb shorter than the database it holds: its pages are mapped
    whole, and the first read past the end was a bus error (the process dead, no message), in the data
    module and in prepare alike."""
    write_lsun_lmdb(tmp_path / "cat", n=8)
    path = tmp_path / "cat" / "data.mdb"
    whole = path.stat().st_size
    os.truncate(path, whole // 2)
    cut = rf"cat/data\.mdb: {whole // 2:,} bytes, but the database it holds needs {whole:,}: the file was"
    with pytest.raises(DataError, match=cut):
        _dm(tmp_path).setup("fit")
    assert (
        prepare_main(["lsun_cat256", "-q", "--workers", "0", str(tmp_path / "cat"), str(tmp_path / "out")])
        == 1
    )


def test_empty_lmdb_is_named(tmp_path):
    write_lsun_lmdb(tmp_path / "cat", n=0)
    with pytest.raises(DataError, match=r"cat/data\.mdb: the LMDB holds no images"):
        _dm(tmp_path).setup("fit")


def test_class_labels_and_odd_channels_are_refused():
    with pytest.raises(
        ValueError, match="LSUN cat has no class labels: data.num_classes must be null, got 10"
    ):
        LSUNDataModule(root="x", num_classes=10)
    with pytest.raises(ValueError, match=r"data.channels must be 3 \(RGB\) or 1 \(grey\), got 2"):
        LSUNDataModule(root="x", channels=2)


# -- start-up checks: cheap, and they create nothing -------------------------------------------------
def test_check_source_accepts_the_lmdb_without_opening_it(tmp_path):
    write_lsun_lmdb(tmp_path / "cat", n=2)
    before = listing(tmp_path)
    _dm(tmp_path).check_source()
    assert listing(tmp_path) == before
    assert not any(path == str(tmp_path / "cat") for _, path in lsun._ENVS)


def test_check_source_checks_the_prepared_form(lsun_root, tmp_path):
    dst = tmp_path / "prepared"
    args = ["lsun_cat256", str(lsun_root), str(dst), "--image-size", str(SIZE), "--workers", "0", "-q"]
    assert prepare_main(args) == 0
    before = listing(dst)
    _dm(dst).check_source()
    assert listing(dst) == before
    (dst / "train_images.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"train_images\.npy is missing"):
        _dm(dst).check_source()
    with pytest.raises(DataError, match=r"prepared at 32 px .* data.image_size=64"):
        _dm(dst, image_size=64).check_source()  # no LMDB to fall back on
    # the advice fits what differs: the size (prepare again), the channels (data.channels), or both
    said = r"data.channels=1; set data.channels=3$"
    with pytest.raises(DataError, match=said):
        _dm(dst, channels=1).check_source()
    said = r"set data.channels=3, and prepare again with --image-size 64, into another folder$"
    with pytest.raises(DataError, match=said):
        _dm(dst, image_size=64, channels=1).check_source()


def test_check_source_on_a_missing_root_names_it_and_creates_nothing(tmp_path):
    root = tmp_path / "mistyped" / "lsun"
    with pytest.raises(FileNotFoundError) as err:
        _dm(root).check_source()
    message = str(err.value)
    assert str(root / "cat") in message and "http://dl.yf.io/lsun/objects/cat.zip" in message
    assert not (tmp_path / "mistyped").exists()


def test_prepare_converts_the_category_it_is_given(tmp_path):
    root = tmp_path / "lsun"
    write_lsun_lmdb(root / "bedroom", n=3)  # the unzipped official archive of another category
    args = ["lsun_cat256", str(root), str(tmp_path / "out"), "--category", "bedroom", "--image-size", "16"]
    assert prepare_main([*args, "--workers", "0", "-q"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["category"] == "bedroom" and manifest["splits"]["train"]["count"] == 3
    from act_lightning.prepare import build_parser

    defaults = build_parser().parse_args(["lsun_cat256", "src", "dst"])
    assert (defaults.category, defaults.image_size, defaults.max_images) == ("cat", 256, None)


def test_finds_the_lmdb_under_the_scene_categories_naming(tmp_path):
    write_lsun_lmdb(tmp_path / "bedroom_train_lmdb", n=2)
    assert lsun.find_lmdb(tmp_path, "bedroom") == tmp_path / "bedroom_train_lmdb"
    assert lsun.find_lmdb(tmp_path, "cat") is None
    dm = _dm(tmp_path, category="bedroom")
    dm.setup("fit")
    assert len(dm.train_set) == 2


def test_a_listed_key_without_a_value_is_named(lsun_root):
    dataset = LMDBImages(lsun_root / "cat", storage.PackedBytes([b"gone"]), SIZE)
    with pytest.raises(DataError, match=r"cat/data\.mdb key 'gone': the key is listed but has no value"):
        dataset[0]


def test_lmdb_images_are_box_resized_and_centre_cropped(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)  # BOX and BICUBIC differ
    write_lsun_lmdb(tmp_path / "cat", n=0, extra={b"noise": encode(noise, "PNG")})
    dataset = LMDBImages(tmp_path / "cat", list_keys(tmp_path / "cat"), SIZE)
    value, source = dataset.read(0)
    assert torch.equal(dataset[0][0], load_image(value, source, SIZE, method="box"))
    assert not torch.equal(dataset[0][0], load_image(value, source, SIZE, method="adm"))


def test_prepare_records_the_crop_and_takes_max_images_beyond_the_count(lsun_root, tmp_path):
    manifest = lsun.prepare_lsun(lsun_root, tmp_path, image_size=16, max_images=100, progress=False)
    assert manifest["splits"]["train"]["count"] == 8 and manifest["crop"] == "box"
    assert manifest["max_images"] is None  # all 8: no subset to warn about
    assert np.load(tmp_path / "train_images.npy").shape == (8, 3, 16, 16)


def test_prepare_decodes_past_the_first_chunk(tmp_path):
    write_lsun_lmdb(tmp_path / "cat", n=65)  # one more than a chunk of 64
    manifest = lsun.prepare_lsun(tmp_path, tmp_path / "p", image_size=8, progress=False)
    assert manifest["splits"]["train"]["count"] == 65
    images = np.load(tmp_path / "p" / "train_images.npy")
    assert images.shape == (65, 3, 8, 8) and images[64].any()


def test_prepare_refuses_a_disk_too_small_before_writing(lsun_root, tmp_path, monkeypatch):
    need = 8 * 3 * 16 * 16
    usage = storage.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: usage._replace(free=need - 1))
    with pytest.raises(OSError, match=r"prepared form of 8 images at 16x16 needs 0.0 MiB, only 0.0 MiB"):
        lsun.prepare_lsun(lsun_root, tmp_path / "p", image_size=16, progress=False)
    assert not (tmp_path / "p" / "train_images.npy").exists()
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: usage._replace(free=need))
    assert lsun.prepare_lsun(lsun_root, tmp_path / "p", image_size=16, progress=False)["splits"]


def test_four_channels_are_refused():
    with pytest.raises(ValueError, match=r"data.channels must be 3 \(RGB\) or 1 \(grey\), got 4"):
        LSUNDataModule(root="x", channels=4)


def test_check_source_checks_every_prepared_file_is_readable(lsun_root, tmp_path, monkeypatch):
    dst = tmp_path / "prepared"
    lsun.prepare_lsun(lsun_root, dst, image_size=SIZE, progress=False)

    def unreadable(path):
        if path.name == "train_images.npy":
            raise PermissionError(f"{path} cannot be read")

    monkeypatch.setattr(lsun, "check_readable", unreadable)
    with pytest.raises(PermissionError, match=r"train_images\.npy cannot be read"):
        _dm(dst).check_source()


def test_prepare_data_hashes_the_prepared_form_unless_verify_is_off(lsun_root, tmp_path):
    dst = tmp_path / "prepared"
    lsun.prepare_lsun(lsun_root, dst, image_size=SIZE, progress=False)
    path = dst / "train_images.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    # the same size: only the modification time tells, which a coarse clock may not have moved since the
    # prepared form was recorded (milliseconds ago)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(DataError, match=r"train_images\.npy: checksum mismatch"):
        _dm(dst).prepare_data()
    _dm(dst, verify=False).prepare_data()


def test_a_prepared_array_of_another_shape_than_its_manifest_is_named(lsun_root, tmp_path):
    dst = tmp_path / "prepared"
    lsun.prepare_lsun(lsun_root, dst, image_size=16, progress=False)
    manifest = json.loads((dst / "manifest.json").read_text())
    (dst / "manifest.json").write_text(json.dumps(manifest | {"image_size": SIZE}))
    with pytest.raises(
        DataError, match=rf"train_images\.npy: images of shape \(3, 16, 16\), expected \(3, {SIZE}"
    ):
        _dm(dst).setup("fit")


def test_prepared_with_other_channels_falls_back_to_the_lmdb(tmp_path):
    write_lsun_lmdb(tmp_path / "cat", n=2)
    lsun.prepare_lsun(tmp_path, tmp_path, image_size=SIZE, progress=False)
    dm = _dm(tmp_path, channels=1)
    dm.setup("fit")
    assert isinstance(dm.train_set, LMDBImages) and dm.train_set[0][0].shape == (1, SIZE, SIZE)


def test_setup_fails_at_once_when_the_first_value_is_no_image(tmp_path):
    write_lsun_lmdb(tmp_path / "cat", n=2, extra={b"0000-broken": b"junk"})  # sorts first
    with pytest.raises(DataError, match=r"key '0000-broken': the image does not decode"):
        _dm(tmp_path).setup("fit")


def test_defaults_of_the_lsun_data_module():
    dm = LSUNDataModule(root="x")
    assert (dm.batch_size, dm.image_size, dm.channels, dm.category) == (80, 256, 3, "cat")
