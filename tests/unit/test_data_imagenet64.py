"""ImageNet 64x64: conversion of the official .npz batches, the prepared form, and every bad input."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from act_lightning.data import DataError, ImageNet64DataModule, storage
from act_lightning.data.imagenet64 import TRAIN_FILES, count_images, find_official_files, prepare_imagenet64
from act_lightning.prepare import main as prepare_main
from tests.helpers_data import listing, shards, write_imagenet64


def _dm(root, **kwargs) -> ImageNet64DataModule:
    options = dict(batch_size=4, num_workers=0, pin_memory=False, persistent_workers=False)
    return ImageNet64DataModule(root=str(root), **(options | kwargs))


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("imagenet64_official")
    write_imagenet64(src, per_file=4)
    return src


@pytest.fixture(scope="module")
def prepared(official, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("imagenet64_prepared")
    assert prepare_main(["imagenet64", str(official), str(dst), "--quiet"]) == 0
    return dst


def test_prepare_writes_arrays_labels_and_a_manifest(official, prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 40 and manifest["splits"]["val"]["count"] == 4
    images = np.load(prepared / "train_images.npy", mmap_mode="r")
    labels = np.load(prepared / "train_labels.npy")
    assert images.shape == (40, 3, 64, 64) and images.dtype == np.uint8
    with np.load(official / "train_data_batch_1.npz") as npz:
        assert np.array_equal(images[:4].reshape(4, -1), npz["data"])  # channel-major rows, unchanged
        assert np.array_equal(labels[:4], npz["labels"] - 1)  # 1..1000 -> 0..999
    assert set(manifest["files"]) == {f"{s}_{k}.npy" for s in ("train", "val") for k in ("images", "labels")}


def test_train_batch_from_workers(prepared):
    dm = _dm(prepared, num_workers=2, persistent_workers=True)
    dm.prepare_data()
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 40 // 8
    half = dm.on_after_batch_transfer(batches[0], 0)
    assert half.gen.shape == (4, 3, 64, 64) and half.gen.dtype == torch.float32
    assert half.gen.min() >= -1 and half.gen.max() <= 1
    assert (
        half.gen_labels.dtype == torch.int64 and 0 <= half.gen_labels.min() and half.gen_labels.max() < 1000
    )
    labels = torch.cat([b[1] for b in batches])
    assert labels.unique().numel() > 1


def test_unconditional_ignores_labels_and_val_split_is_readable(prepared):
    dm = _dm(prepared, num_classes=None)
    dm.setup("fit")
    assert not next(iter(dm.train_dataloader()))[1].any()
    assert len(dm.build_val_dataset()) == 4


def test_ranks_see_disjoint_shards(prepared):
    dm = _dm(prepared, hflip=False)
    dm.setup("fit")
    rank0, rank1 = shards(dm)
    assert len(rank0) == len(rank1) == 16 and not set(rank0) & set(rank1)


def test_official_files_in_root_are_converted_on_first_use(tmp_path):
    write_imagenet64(tmp_path, per_file=2, val=False)
    dm = _dm(tmp_path)
    dm.prepare_data()
    assert (tmp_path / "manifest.json").is_file()
    dm.setup("fit")
    assert len(dm.train_set) == 20


def test_missing_data_names_the_files_where_and_where_from(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        _dm(tmp_path).prepare_data()
    message = str(err.value)
    for expected in (
        "train_data_batch_1.npz",
        "train_data_batch_10.npz",
        "val_data.npz",
        str(tmp_path),
        "https://image-net.org/download-images.php",
        "python -m act_lightning.prepare imagenet64",
    ):
        assert expected in message


def test_missing_batches_are_listed(tmp_path):
    write_imagenet64(tmp_path, per_file=2)
    (tmp_path / "train_data_batch_7.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"train_data_batch_7\.npz not found under"):
        prepare_imagenet64(tmp_path, tmp_path / "out", progress=False)


def _broken(tmp_path, name="train_data_batch_2.npz", **arrays) -> Path:
    src = tmp_path / "src"
    write_imagenet64(src, per_file=2)
    if arrays:
        np.savez(src / name, **arrays)
    return src


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        (
            {"data": np.zeros((2, 3072), np.uint8), "labels": np.ones(2, np.int64)},
            r"batch_2\.npz: `data` should be uint8 of shape \(N, 12288\).*found uint8 of shape \(2, 3072\)",
        ),
        (
            {"data": np.zeros((2, 12288), np.float32), "labels": np.ones(2, np.int64)},
            r"train_data_batch_2\.npz: `data` should be uint8 .* found float32",
        ),
        (
            {"data": np.zeros((2, 12288), np.uint8), "labels": np.array([0, 5])},
            r"train_data_batch_2\.npz: labels must lie in 1\.\.1000 .* found 0\.\.5",
        ),
        (
            {"data": np.zeros((2, 12288), np.uint8), "labels": np.array([1, 1001])},
            r"labels must lie in 1\.\.1000 .* found 1\.\.1001",
        ),
        (
            {"data": np.zeros((2, 12288), np.uint8), "labels": np.ones(3, np.int64)},
            r"train_data_batch_2\.npz: `labels` should be 2 integers",
        ),
        ({"data": np.zeros((2, 12288), np.uint8)}, r"train_data_batch_2\.npz: no array `labels`"),
        (
            {"data": np.zeros((2, 12288), np.uint8), "labels": np.array([{"a": 1}, None], dtype=object)},
            r"train_data_batch_2\.npz: `labels` should be 2 integers 1\.\.1000.*found object",
        ),
    ],
)
def test_malformed_official_files_are_named(tmp_path, arrays, match):
    src = _broken(tmp_path, **arrays)
    with pytest.raises(DataError, match=match):
        prepare_imagenet64(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # batch 1's arrays, written before batch 2 failed, are gone


def test_truncated_npz_is_named(tmp_path):
    src = _broken(tmp_path)
    path = src / "train_data_batch_4.npz"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"train_data_batch_4\.npz: not a valid \.npz archive"):
        prepare_imagenet64(src, tmp_path / "out", progress=False)


def test_prepare_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    assert prepare_main(["imagenet64", str(tmp_path / "nothing"), str(tmp_path / "out"), "-q"]) == 1
    assert "error: ImageNet 64x64: train_data_batch_1.npz" in capsys.readouterr().err


@pytest.fixture
def prepared_copy(prepared, tmp_path) -> Path:
    dst = tmp_path / "prepared"
    dst.mkdir()
    for path in prepared.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    (dst / ".verified.json").unlink()  # a copy: new mtimes, verified afresh
    return dst


def test_checksum_mismatch_is_named(prepared_copy, capsys):
    path = prepared_copy / "train_images.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(
        DataError, match=r"train_images\.npy: checksum mismatch \(sha256 [0-9a-f]{64}, the manifest"
    ) as err:
        _dm(prepared_copy).prepare_data()
    # the command that mends it names the folder and the official files it was prepared from
    source = json.loads((prepared_copy / "manifest.json").read_text())["from"]
    assert f"re-run `python -m act_lightning.prepare` into {prepared_copy} from {source}" in str(err.value)
    assert str(err.value).endswith("(data.verify=false skips this check)")
    _dm(prepared_copy, verify=False).prepare_data()  # data.verify=false skips the hash
    # the verify command itself names no switch of a run's that would skip the check it was asked for
    capsys.readouterr()
    assert prepare_main(["verify", str(prepared_copy), "-q"]) == 1
    said = capsys.readouterr().err
    assert "train_images.npy: checksum mismatch" in said and "data.verify" not in said


def test_truncated_prepared_array_is_named(prepared_copy):
    path = prepared_copy / "train_images.npy"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"train_images\.npy holds \d+ bytes, the manifest records \d+"):
        _dm(prepared_copy, verify=False).prepare_data()


def test_prepared_labels_out_of_range_are_named(prepared_copy):
    labels = np.lib.format.open_memmap(prepared_copy / "train_labels.npy", mode="r+")
    labels[3] = 1000
    labels.flush()
    del labels
    with pytest.raises(DataError, match=r"train_labels\.npy: labels must lie in 0\.\.999, found \d+\.\.1000"):
        _dm(prepared_copy, verify=False).setup("fit")


def test_verified_files_are_not_hashed_again(prepared_copy, monkeypatch):
    from act_lightning.data import storage

    _dm(prepared_copy).prepare_data()  # hashes, then records the files as verified
    calls = []
    monkeypatch.setattr(storage, "sha256_file", lambda *a, **k: calls.append(a) or "")
    _dm(prepared_copy).prepare_data()
    assert calls == []
    assert prepare_main(["verify", str(prepared_copy), "-q"]) == 1  # `verify` re-hashes everything: "" != sha


def test_wrong_sizes_are_refused():
    with pytest.raises(ValueError, match="data.image_size must be 64 and data.channels 3, got 32 and 3"):
        ImageNet64DataModule(root="x", image_size=32)
    with pytest.raises(ValueError, match="data.image_size must be 64 and data.channels 3, got 64 and 1"):
        ImageNet64DataModule(root="x", channels=1)
    with pytest.raises(
        ValueError, match=r"data.num_classes must be 1000 \(class-conditional\) or null, got 10"
    ):
        ImageNet64DataModule(root="x", num_classes=10)
    assert ImageNet64DataModule(root="x", num_classes=None).num_classes is None


# -- start-up checks: cheap, and they create nothing -------------------------------------------------
def test_check_source_accepts_the_prepared_form_without_hashing(prepared_copy, monkeypatch):
    from act_lightning.data import storage

    monkeypatch.setattr(storage, "sha256_file", lambda *a, **k: pytest.fail("check_source hashed a file"))
    before = listing(prepared_copy)
    _dm(prepared_copy).check_source()
    assert listing(prepared_copy) == before  # not even the record of verified files


def test_check_source_names_a_missing_or_truncated_prepared_file(prepared_copy):
    path = prepared_copy / "train_labels.npy"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"train_labels\.npy holds \d+ bytes, the manifest records \d+"):
        _dm(prepared_copy).check_source()
    path.unlink()
    with pytest.raises(FileNotFoundError, match=r"train_labels\.npy is missing: .*manifest\.json lists it"):
        _dm(prepared_copy).check_source()


def test_check_source_accepts_official_files_without_converting_them(tmp_path):
    write_imagenet64(tmp_path, per_file=2)
    before = listing(tmp_path)
    _dm(tmp_path).check_source()
    assert listing(tmp_path) == before  # converted by prepare_data, not here


def test_check_source_names_missing_and_truncated_official_files(tmp_path):
    write_imagenet64(tmp_path, per_file=2)
    path = tmp_path / "train_data_batch_4.npz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match=r"train_data_batch_4\.npz: not a valid \.npz archive"):
        _dm(tmp_path).check_source()
    path.unlink()
    with pytest.raises(FileNotFoundError, match=rf"train_data_batch_4\.npz not found under {tmp_path}"):
        _dm(tmp_path).check_source()


def test_check_source_needs_to_write_the_prepared_form_next_to_official_files(tmp_path, monkeypatch):
    import os

    write_imagenet64(tmp_path, per_file=2)
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # tests run as root: chmod would not do
    with pytest.raises(
        PermissionError, match=rf"data.root={tmp_path} .* is not writable.*prepare imagenet64"
    ):
        _dm(tmp_path).check_source()


def test_check_source_on_a_missing_root_names_it_and_creates_nothing(tmp_path):
    root = tmp_path / "mistyped" / "imagenet64"
    with pytest.raises(FileNotFoundError) as err:
        _dm(root).check_source()
    message = str(err.value)
    assert f"data.root={root}" in message and "https://image-net.org/download-images.php" in message
    assert "train_data_batch_1.npz" in message and "python -m act_lightning.prepare imagenet64" in message
    assert not (tmp_path / "mistyped").exists()


def test_a_verified_file_overwritten_in_place_at_the_same_size_is_hashed_again(prepared_copy):
    _dm(prepared_copy).prepare_data()  # hashes, then records the files as verified
    path = prepared_copy / "train_images.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))  # the same size: only the modification time tells
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(DataError, match=r"train_images\.npy: checksum mismatch"):
        _dm(prepared_copy).prepare_data()


def test_an_unreadable_record_of_verified_files_means_hashing_again(prepared_copy, monkeypatch):
    from act_lightning.data import storage

    (prepared_copy / ".verified.json").write_text("{ half a record")
    hashed = []
    real = storage.sha256_file
    monkeypatch.setattr(storage, "sha256_file", lambda path, **k: hashed.append(path.name) or real(path))
    _dm(prepared_copy).prepare_data()
    assert sorted(hashed) == sorted(json.loads((prepared_copy / "manifest.json").read_text())["files"])
    record = json.loads((prepared_copy / ".verified.json").read_text())  # rewritten whole
    assert sorted(record) == sorted(hashed)


def test_official_files_are_found_in_sub_folders_and_two_of_one_name_are_refused(tmp_path):
    write_imagenet64(tmp_path / "a_part1", per_file=2, val=False)  # the archives unzip into folders
    train, val = find_official_files(tmp_path)
    assert train == [tmp_path / "a_part1" / name for name in TRAIN_FILES] and val is None
    manifest = prepare_imagenet64(tmp_path, tmp_path / "out", progress=False)
    assert manifest["splits"]["train"]["count"] == 20 and "val" not in manifest["splits"]
    with np.load(tmp_path / "a_part1" / "train_data_batch_1.npz") as npz:
        assert np.array_equal(np.load(tmp_path / "out" / "train_images.npy")[:2].reshape(2, -1), npz["data"])
    # a second set of the same names (ImageNet 32's release, a copy) was taken or left by its path's order
    write_imagenet64(tmp_path / "Imagenet32_train_npz", per_file=2, val=False, seed=1)
    first, second = tmp_path / "Imagenet32_train_npz", tmp_path / "a_part1"
    with pytest.raises(FileNotFoundError) as err:
        find_official_files(tmp_path)
    said = str(err.value)
    assert f"2 files called train_data_batch_1.npz under {tmp_path} ({first / TRAIN_FILES[0]}, " in said
    assert f"{second / TRAIN_FILES[0]}); give the folder that holds only the 64x64 release" in said


def test_the_pickled_releases_files_are_named_however_many_copies_there_are(tmp_path):
    """The hint reused the lookup that refuses two files of one name: with ImageNet 32's pickled files
    beside the 64x64 ones it told the user to give a folder of the npz release they did not have."""
    for folder in ("Imagenet64_train_part1", "Imagenet32_train"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "train_data_batch_1").write_bytes(b"pickled")
    with pytest.raises(FileNotFoundError, match=r"is from the pickled release .* does not read"):
        find_official_files(tmp_path)


def test_a_missing_val_file_is_named_when_required(tmp_path):
    write_imagenet64(tmp_path, per_file=2, val=False)
    with pytest.raises(FileNotFoundError, match=r"ImageNet 64x64: val_data\.npz not found under"):
        find_official_files(tmp_path, require_val=True)


def test_data_of_more_than_two_dimensions_is_named(tmp_path):
    src = _broken(tmp_path, data=np.zeros((2, 12288, 1), np.uint8), labels=np.ones(2, np.int64))
    with pytest.raises(DataError, match=r"batch_2\.npz: `data` should be uint8 of shape \(N, 12288\)"):
        prepare_imagenet64(src, tmp_path / "out", progress=False)


def test_check_source_counts_the_labels_from_the_headers(tmp_path):
    src = _broken(tmp_path, data=np.zeros((2, 12288), np.uint8), labels=np.ones(3, np.int64))
    with pytest.raises(DataError, match=r"train_data_batch_2\.npz: `labels` should be 2 integers"):
        _dm(src).check_source()


def test_label_1000_is_the_last_class(tmp_path):
    src = _broken(tmp_path, data=np.zeros((2, 12288), np.uint8), labels=np.array([1, 1000]))
    prepare_imagenet64(src, tmp_path / "out", progress=False)
    assert np.load(tmp_path / "out" / "train_labels.npy")[2:4].tolist() == [0, 999]


def test_arrays_in_npy_format_2_are_read(tmp_path):
    path = tmp_path / "train_data_batch_1.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for key, array in (("data", np.zeros((3, 12288), np.uint8)), ("labels", np.ones(3, np.int64))):
            with archive.open(f"{key}.npy", "w") as f:
                np.lib.format.write_array(f, array, version=(2, 0))
    assert count_images(path) == 3


def test_a_split_without_labels_is_named(prepared_copy):
    manifest = json.loads((prepared_copy / "manifest.json").read_text())
    manifest["splits"]["train"]["labels"] = None
    (prepared_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"manifest\.json: the 'train' split has no labels"):
        _dm(prepared_copy, num_classes=None).build_train_dataset()


def test_the_pickled_release_is_named_and_the_npz_archives_are_asked_for(tmp_path):
    (tmp_path / "train_data_batch_1").write_bytes(b"\x80\x04")  # the release without _npz: pickles
    with pytest.raises(FileNotFoundError) as err:
        prepare_imagenet64(tmp_path, tmp_path / "out", progress=False)
    message = str(err.value)
    assert f"{tmp_path / 'train_data_batch_1'} is from the pickled release" in message
    assert "Imagenet64_train_part1_npz.zip, Imagenet64_train_part2_npz.zip, Imagenet64_val_npz.zip" in message
    assert not (tmp_path / "out").exists()


def test_a_failed_prepare_into_a_prepared_folder_leaves_no_manifest_over_its_half_rewritten_arrays(tmp_path):
    dst = tmp_path / "out"
    prepare_imagenet64(_broken(tmp_path / "a"), dst, progress=False)
    assert (dst / "manifest.json").is_file()
    bad = _broken(
        tmp_path / "b", "train_data_batch_9.npz", data=np.zeros((2, 12288), np.uint8), labels=[0, 1]
    )
    with pytest.raises(DataError, match="labels must lie in 1..1000"):
        prepare_imagenet64(bad, dst, progress=False)
    assert not (dst / "manifest.json").exists()  # the arrays were rewritten up to batch 8: refused as such
    with pytest.raises(Exception, match="manifest"):
        ImageNet64DataModule(root=str(dst), batch_size=2).setup("fit")


def test_the_arrays_of_a_killed_preparation_are_named_as_unfinished(prepared, tmp_path):
    # kill -9 before the manifest (written last): no exception handler removed the arrays
    dst = tmp_path / "killed"
    dst.mkdir()
    for name in ("train_images.npy", "train_labels.npy"):
        (dst / name).write_bytes((prepared / name).read_bytes())
    said = rf"{dst} holds train_images\.npy but no manifest\.json: a preparation into it did not finish"
    for step in (lambda dm: dm.check_source(), lambda dm: dm.prepare_data(), lambda dm: dm.setup("fit")):
        with pytest.raises(FileNotFoundError, match=said):
            step(_dm(dst))
    (dst / "train_images.npy").unlink()  # labels alone: nothing that says a preparation ran
    with pytest.raises(FileNotFoundError) as err:
        _dm(dst).check_source()
    assert "did not finish" not in str(err.value)


def test_prepare_refuses_a_disk_too_small_before_making_its_arrays(tmp_path, monkeypatch):
    """Its arrays are sparse memory maps: a disk that filled up under them killed the process (SIGBUS)
    with no message and left half-written arrays."""
    from act_lightning.data import storage

    src = _broken(tmp_path)  # 10 files of 2 images, and val
    need = 22 * (12288 + 2)
    usage = storage.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: usage._replace(free=need - 1))
    with pytest.raises(OSError, match=r"the prepared form of 22 images needs 0.3 MiB, only 0.3 MiB are free"):
        prepare_imagenet64(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: usage._replace(free=need))
    assert prepare_imagenet64(src, tmp_path / "out", progress=False)["splits"]["train"]["count"] == 20


def test_a_second_node_waits_for_the_first_ones_conversion_and_uses_it(tmp_path, monkeypatch):
    """Lightning prepares the data on local rank 0 of every node: two nodes on one shared file system
    converted into the same files at once (a truncated memory map: SIGBUS)."""
    import threading

    from act_lightning.data import imagenet64, storage

    write_imagenet64(tmp_path, per_file=2)
    conversions = []
    real = imagenet64.prepare_imagenet64
    monkeypatch.setattr(
        imagenet64, "prepare_imagenet64", lambda *a, **k: conversions.append(a) or real(*a, **k)
    )
    second = threading.Thread(target=lambda: _dm(tmp_path).prepare_data())
    with storage.one_at_a_time(tmp_path):  # the first node is converting
        second.start()
        second.join(timeout=2)
        assert second.is_alive()  # the second waits
        real(tmp_path, tmp_path, progress=False)
    second.join(timeout=60)
    assert not second.is_alive() and conversions == []  # it found the manifest and converted nothing
    assert _dm(tmp_path).train_dataloader() is not None


def test_the_folder_stays_the_preparations_until_its_manifest_is_written(official, tmp_path, monkeypatch):
    # hashing the arrays for the manifest takes minutes on the real data: a second preparation started
    # then was accepted, and a check called the folder a killed preparation to run again
    from act_lightning.data import storage

    hashing, sha256_file = [], storage.sha256_file
    monkeypatch.setattr(
        storage,
        "sha256_file",
        lambda path, **kw: hashing.append(storage.writing(path.parent)) or sha256_file(path, **kw),
    )
    prepare_imagenet64(official, tmp_path / "dst", progress=False)
    assert hashing and all(hashing) and not storage.writing(tmp_path / "dst")


def test_the_reference_fingerprint_is_the_train_splits_checksums(prepared):
    # cached reference statistics (eval.reference=train) are computed anew for a set prepared again
    manifest = json.loads((prepared / "manifest.json").read_text())
    fingerprint = _dm(prepared).reference_fingerprint()
    assert fingerprint == storage.manifest_digest(manifest, "train")
    manifest["files"]["val_images.npy"]["sha256"] = "0" * 64  # another split: the same digest
    assert storage.manifest_digest(manifest, "train") == fingerprint
    manifest["files"]["train_images.npy"]["sha256"] = "0" * 64
    assert storage.manifest_digest(manifest, "train") != fingerprint
