"""CIFAR-10 DataModule over small files in the official python-batch format (no network)."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import pickletools
import shlex
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from act_lightning.data import CIFAR10DataModule, DataError, cifar10
from act_lightning.data.cifar10 import load_cifar10_train, read_batch
from tests.helpers_data import CIFAR_FOLDER, listing, py2_pickle, shards, smooth_images, write_cifar10

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def _dm(root, **kwargs) -> CIFAR10DataModule:
    options = dict(batch_size=4, download=False, verify=False, num_workers=0, pin_memory=False, seed=0)
    return CIFAR10DataModule(root=str(root), **(options | kwargs))


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar10")
    write_cifar10(root, per_batch=8)
    return root


def test_reads_the_python_batches_through_torchvision(cifar_root):
    images, labels = load_cifar10_train(cifar_root)
    assert images.shape == (40, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.min() >= 0 and labels.max() <= 9


def test_each_row_is_read_as_the_red_then_the_green_then_the_blue_plane(cifar_root):
    """CIFAR-10's rows hold 1024 red values, then 1024 green, then 1024 blue, each plane row-major: the
    images read are those the helper wrote (HWC), channel first."""
    images, _ = load_cifar10_train(cifar_root)
    written = torch.from_numpy(smooth_images(8, 32, 32, seed=0)).permute(0, 3, 1, 2)  # data_batch_1
    assert torch.equal(images[:8], written)
    assert not torch.equal(written[:, 0], written[:, 1])  # the planes differ, so an order mistake shows


@pytest.mark.parametrize("in_memory", [False, True])
def test_train_batch_is_two_halves_in_range(cifar_root, in_memory):
    dm = _dm(cifar_root, in_memory=in_memory, num_classes=10)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    half = dm.on_after_batch_transfer(batch, 0)
    assert half.gen.shape == half.disc.shape == (4, 3, 32, 32)
    assert half.gen.dtype == torch.float32 and half.gen.min() >= -1 and half.gen.max() <= 1
    assert half.gen_labels.dtype == torch.int64 and half.gen_labels.max() <= 9
    assert len(dm.train_dataloader()) == 40 // 8


def test_in_memory_matches_the_worker_path_and_uses_no_workers(cifar_root):
    dm = _dm(cifar_root, in_memory=True, hflip=False, num_workers=4)
    assert dm.num_workers == 0
    dm.setup("fit")
    index = next(iter(dm.train_dataloader()))  # the in-memory path samples indices
    assert index.dtype == torch.int64 and index.shape == (8,)
    half = dm.on_after_batch_transfer(index, 0)
    images, _ = load_cifar10_train(cifar_root)
    expected = images[index].float() / 127.5 - 1
    assert torch.allclose(torch.cat([half.gen, half.disc]), expected)


def test_unconditional_labels_are_zero(cifar_root):
    dm = _dm(cifar_root)
    dm.setup("fit")
    _, labels = next(iter(dm.train_dataloader()))
    assert not labels.any()


@pytest.mark.parametrize("in_memory", [False, True])
def test_ranks_see_disjoint_shards_under_lightnings_sampler(cifar_root, in_memory):
    dm = _dm(cifar_root, in_memory=in_memory, hflip=False)
    dm.setup("fit")
    rank0, rank1 = shards(dm)
    assert len(rank0) == len(rank1) == 16  # 40 images / 2 ranks = 20, in whole batches of 8
    assert not set(rank0) & set(rank1)


def test_archive_is_extracted_offline(tmp_path):
    write_cifar10(tmp_path, archive=True)
    dm = _dm(tmp_path, download=True)  # offline: must not try the network when the archive is there
    dm.prepare_data()
    assert (tmp_path / CIFAR_FOLDER / "data_batch_5").is_file()
    dm.setup("fit")
    assert len(dm.train_set) == 40


def test_an_archive_member_outside_its_folder_is_refused_and_nothing_is_written_there(tmp_path):
    """With data.verify=false no checksum vouches for the archive: extraction itself must keep every
    member inside the data folder."""
    root = tmp_path / "data"
    archive = write_cifar10(root, archive=True)
    with tarfile.open(archive, "r:gz") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(archive, "w:gz") as tar:
        for member, content in members:
            tar.addfile(member, io.BytesIO(content))
        escape = tarfile.TarInfo("../outside.txt")
        escape.size = 4
        tar.addfile(escape, io.BytesIO(b"oops"))
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz: refused, it holds .*outside\.txt"):
        _dm(root, verify=False).prepare_data()
    assert not (tmp_path / "outside.txt").exists()
    extracted = sorted(p.name for p in root.iterdir() if p.name != ".prepare.lock")  # (one node at a time)
    assert extracted == ["cifar-10-python.tar.gz"]  # nothing half-extracted


def test_missing_files_say_what_where_and_from_where(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        _dm(tmp_path).prepare_data()
    message = str(err.value)
    assert str(tmp_path / CIFAR_FOLDER / "data_batch_1") in message
    assert str(tmp_path / "cifar-10-python.tar.gz") in message and URL in message
    assert "data.download=true fetches it" in message  # offered where it is off ...


def test_checksums_are_verified_by_default(cifar_root):
    with pytest.raises(DataError, match=r"data_batch_1: checksum mismatch \(md5 .*expected c99cafc1") as err:
        _dm(cifar_root, verify=True).prepare_data()
    # the way out it names is the official file; switching the check off is no way to make a file safe
    assert "extract it again from" in str(err.value) and "use it anyway" not in str(err.value)
    assert "data.verify=false only skips this checksum" in str(err.value)


def test_archive_checksum_is_verified(tmp_path):
    write_cifar10(tmp_path, archive=True)
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz: checksum mismatch"):
        _dm(tmp_path, verify=True).prepare_data()


def test_truncated_archive_is_named(tmp_path):
    archive = write_cifar10(tmp_path, archive=True)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz: not a complete gzip'ed tar archive"):
        _dm(tmp_path).prepare_data()


def test_truncated_batch_is_named(tmp_path):
    folder = write_cifar10(tmp_path)
    batch = folder / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:1000])
    dm = _dm(tmp_path)
    dm.prepare_data()  # without verification the files look complete ...
    with pytest.raises(DataError, match=r"data_batch_3: not a readable CIFAR-10 python batch") as err:
        dm.setup("fit")  # ... until they are read
    # no archive beside the batches: the advice is the download, not extracting an archive that is not there
    said = str(err.value)
    assert f"Delete {folder}: the next run downloads cifar-10-python.tar.gz into {folder.parent}" in said
    (folder.parent / "cifar-10-python.tar.gz").write_bytes(b"")  # with it there: extract it again
    with pytest.raises(DataError, match=rf"Delete {folder} and extract {folder.parent}/cifar-10-python"):
        _dm(tmp_path).setup("fit")


# -- the batches are pickles: read without ever running code ------------------------------------------
def _globals(content: bytes) -> set[str]:
    """The globals a pickle names (GLOBAL opcodes: protocols 0 to 3)."""
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(content) if op.name == "GLOBAL"}


def test_the_test_batches_are_pickled_as_the_official_ones_and_load(cifar_root):
    content = (cifar_root / CIFAR_FOLDER / "data_batch_1").read_bytes()
    # as Python 2's cPickle and numpy 1.x wrote them: protocol 2, Python 2 strings only, three globals
    opcodes = {op.name for op, _, _ in pickletools.genops(content)}
    assert content[:2] == b"\x80\x02" and not opcodes & {"BINUNICODE", "SHORT_BINUNICODE", "BINBYTES"}
    assert _globals(content) == {"numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype"}
    images, labels = read_batch(cifar_root / CIFAR_FOLDER / "data_batch_1")
    assert images.shape == (8, 3072) and images.dtype == np.uint8 and len(labels) == 8


def _resaved(tmp_path, protocol: int) -> tuple[Path, np.ndarray]:
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    batch = {
        b"batch_label": b"training batch 1 of 5",
        b"labels": [3, 9],
        b"data": data,
        b"filenames": [b"a", b"b"],
    }
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    return path, data


@pytest.mark.parametrize("protocol", [3, 4])
def test_a_batch_re_saved_by_python_3_with_protocol_3_or_4_loads(tmp_path, protocol):
    path, data = _resaved(tmp_path, protocol)  # numpy 2 names numpy._core.multiarray._reconstruct here
    images, labels = read_batch(path)
    assert np.array_equal(images, data) and labels.tolist() == [3, 9]


@pytest.mark.parametrize("labels", [[3, 10], [-1, 2]])
def test_labels_outside_the_ten_classes_are_named(tmp_path, labels):
    batch = pickle.loads(_resaved(tmp_path, 4)[0].read_bytes())
    batch[b"labels"] = labels
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=4))
    with pytest.raises(DataError, match=rf"labels must lie in 0..9, found {min(labels)}..{max(labels)}"):
        read_batch(tmp_path / "data_batch_1")


@pytest.mark.parametrize(
    ("labels", "found"),
    [
        ("abc", "a str that is no list of integers"),
        ([3], "a list of integers of 1"),
        ([1.5, 2.5], "a list that is no list of integers"),
        ([1, [2, 3]], "a list that is no list of integers"),  # numpy raised its own ValueError here
        (np.zeros((2, 1), np.int64), "a 2-d int64 array"),
    ],
)
def test_labels_that_are_not_one_integer_per_image_are_named(tmp_path, labels, found):
    batch = pickle.loads(_resaved(tmp_path, 4)[0].read_bytes())
    batch[b"labels"] = labels
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=4))
    with pytest.raises(
        DataError, match=rf"data_batch_1: 2 images but `labels` is {found}; expected 2 integers"
    ):
        read_batch(tmp_path / "data_batch_1")


def test_labels_nested_through_the_pickles_references_are_refused_before_numpy_reads_them(tmp_path):
    # 6 kB of pickle: one list of 100 referenced 100 times, three deep, is 10^6 labels to numpy (a
    # thousand each, 7.5 GB, took numpy 27 s and then a MemoryError); the first non-integer ends it
    labels = [0] * 100
    for _ in range(2):
        labels = [labels] * 100
    content = py2_pickle({b"data": np.zeros((0, 3072), np.uint8), b"labels": labels})
    assert len(content) < 10_000
    (tmp_path / "data_batch_1").write_bytes(content)
    with pytest.raises(DataError, match="0 images but `labels` is a list that is no list of integers"):
        read_batch(tmp_path / "data_batch_1")


@pytest.mark.parametrize(
    ("protocol", "named"),
    [(2, r"_codecs\.encode"), (5, r"numpy\.(_core|core)\.numeric\._frombuffer")],  # names the official lack
)
def test_other_pickle_protocols_are_refused_by_the_global_they_name(tmp_path, protocol, named):
    path, _ = _resaved(tmp_path, protocol)
    with pytest.raises(DataError, match=rf"data_batch_1: refused to unpickle the global `{named}`"):
        read_batch(path)


class _Payload:
    """Unpickled, calls `call(*args)`: what a tampered batch would run."""

    def __init__(self, call, *args) -> None:
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


@pytest.mark.parametrize("attack", ["os.system", "builtins.eval"])
def test_a_tampered_batch_is_refused_by_name_and_runs_nothing_even_unverified(tmp_path, attack):
    folder = write_cifar10(tmp_path)
    marker = tmp_path / "ran"
    if attack == "os.system":
        payload, protocol = _Payload(os.system, f"touch {shlex.quote(str(marker))}"), 2
        named = f"{os.system.__module__}.system"  # posix.system
    else:
        payload, protocol = _Payload(builtins.eval, f"open({str(marker)!r}, 'w').close()"), 4
        named = "builtins.eval"
    batch = pickle.loads((folder / "data_batch_3").read_bytes(), encoding="bytes")
    batch[b"filenames"][0] = payload  # inside an otherwise official batch
    content = py2_pickle(batch) if protocol == 2 else pickle.dumps(batch, protocol=protocol)
    (folder / "data_batch_3").write_bytes(content)

    dm = _dm(tmp_path, verify=False)  # data.verify=false: no checksum stands in the way
    dm.prepare_data()
    with pytest.raises(DataError, match=rf"data_batch_3: refused to unpickle the global `{named}`") as err:
        dm.setup("fit")
    assert "could run code" in str(err.value) and not marker.exists()

    pickle.loads(content, encoding="bytes")  # the control: a plain unpickler runs the payload
    assert marker.exists()


def test_a_batch_that_calls_numpy_ndarray_for_its_array_is_refused(tmp_path):
    # numpy.ndarray((N, 3072), uint8) allocates N x 3072 bytes of uninitialised memory from a few bytes of
    # pickle (3 GB from 2 MB once); a batch of 10 such images loaded, whatever memory held, as images
    folder = write_cifar10(tmp_path)
    batch = pickle.loads((folder / "data_batch_2").read_bytes(), encoding="bytes")
    batch[b"data"] = _Payload(np.ndarray, (10, 3072), np.dtype(np.uint8))
    batch[b"labels"] = [0] * 10
    (folder / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=4))
    with pytest.raises(DataError, match=r"data_batch_2: not a readable CIFAR-10 python batch \(TypeError"):
        read_batch(folder / "data_batch_2")
    assert pickle.loads((folder / "data_batch_2").read_bytes())[b"data"].shape == (10, 3072)  # the control


class _StatefulDType:
    """Pickles as numpy.dtype(name, False, True) given `state`, as numpy's own dtype pickles itself."""

    def __init__(self, name, state) -> None:
        self.name, self.state = name, state

    def __reduce__(self):
        return np.dtype, (self.name, False, True), self.state


class _Array:
    """Pickles as numpy's reconstructor writes an array: its state (1, shape, dtype, False, bytes)."""

    def __init__(self, shape, dtype, raw) -> None:
        self.state = (1, shape, dtype, False, raw)

    def __reduce__(self):
        return np.empty(0).__reduce__()[0], (np.ndarray, (0,), b"b"), self.state


PLAIN = (3, "<", None, None, None, -1, -1, 0)  # numpy's state of '<i8'


@pytest.mark.parametrize(
    ("labels", "said"),
    [
        # numpy's own dtype took this state: a field 1 GiB past an 8-byte item, read out of bounds when
        # numpy turned the labels into an array (the process ended with SIGSEGV, no file named)
        (
            _Array(
                (2,),
                _StatefulDType("V8", (3, "|", None, ("a",), {"a": ("<u8", 1 << 30)}, 8, 1, 16)),
                bytes(16),
            ),
            r"numpy.dtype\('V8'\): a batch's arrays hold integers only",
        ),
        (
            _Array(
                (2,),
                _StatefulDType("i8", (3, "|", None, ("a",), {"a": ("<u8", 1 << 30)}, 8, 1, 16)),
                bytes(16),
            ),
            "numpy.dtype state .*: not a plain integer type's",
        ),
        (
            _Array((2,), _StatefulDType("i8", PLAIN), bytes(8)),
            r"numpy array of shape \(2,\): 8 bytes do not fill it",
        ),
        (_Array((1 << 40,), _StatefulDType("i8", PLAIN), bytes(8)), "bytes do not fill it"),
    ],
)
def test_an_array_whose_type_or_bytes_are_not_a_plain_integer_arrays_is_refused(tmp_path, labels, said):
    content = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": labels}, protocol=3)
    (tmp_path / "data_batch_1").write_bytes(content)
    with pytest.raises(DataError, match=rf"data_batch_1: not a readable CIFAR-10 python batch .*{said}"):
        read_batch(tmp_path / "data_batch_1")


def test_integer_label_arrays_of_either_byte_order_load(tmp_path):
    for order in "<>":
        labels = _Array(
            (2,),
            _StatefulDType("i4", (3, order, None, None, None, -1, -1, 0)),
            np.array([3, 9], f"{order}i4").tobytes(),
        )
        content = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": labels}, protocol=3)
        (tmp_path / "data_batch_1").write_bytes(content)
        assert read_batch(tmp_path / "data_batch_1")[1].tolist() == [3, 9]


def test_batches_read_without_prepare_data_are_checked_against_the_release_first(cifar_root):
    # evaluate's reference images come from the data module's reference set, with no prepare_data before
    with pytest.raises(DataError, match=r"data_batch_1: checksum mismatch"):
        _dm(cifar_root, verify=True).build_reference_dataset()
    assert len(_dm(cifar_root, verify=False).build_reference_dataset()) == 5 * 8


def test_a_root_that_is_the_batches_folder_itself_names_the_folder_above_and_downloads_nothing(cifar_root):
    folder = cifar_root / CIFAR_FOLDER
    for dm in (_dm(folder, download=True), _dm(folder, download=False)):
        for step in (dm.check_source, dm.prepare_data):
            with pytest.raises(FileNotFoundError) as err:
                step()
            assert f"data.root={folder} holds the batches themselves (data_batch_1, ...)" in str(err.value)
            assert f"data.root={cifar_root} for {folder}" in str(err.value)
    assert not (folder / CIFAR_FOLDER).exists()


def test_wrong_sizes_are_refused():
    with pytest.raises(ValueError, match="data.image_size must be 32 and data.channels 3, got 64 and 3"):
        CIFAR10DataModule(root="x", image_size=64)
    with pytest.raises(ValueError, match="data.image_size must be 32 and data.channels 3, got 32 and 1"):
        CIFAR10DataModule(root="x", channels=1)
    with pytest.raises(ValueError, match="num_classes must be null"):
        CIFAR10DataModule(root="x", num_classes=100)


# -- start-up checks: cheap, and they create nothing -------------------------------------------------
def test_check_source_accepts_the_batches_or_the_archive(cifar_root, tmp_path):
    before = listing(cifar_root)
    _dm(cifar_root).check_source()
    write_cifar10(tmp_path, archive=True)
    _dm(tmp_path).check_source()
    assert listing(cifar_root) == before and listing(tmp_path) == {"cifar-10-python.tar.gz"}  # not extracted


def test_check_source_on_a_missing_root_names_it_and_creates_nothing(tmp_path):
    root = tmp_path / "mistyped" / "cifar10"
    with pytest.raises(FileNotFoundError) as err:
        _dm(root, download=False).check_source()
    message = str(err.value)
    assert str(root / CIFAR_FOLDER / "data_batch_1") in message
    assert f"data.root={root}" in message and URL in message
    assert not (tmp_path / "mistyped").exists()


def test_check_source_with_download_needs_a_writable_place_for_it(tmp_path, monkeypatch):
    root = tmp_path / "new" / "cifar10"
    _dm(root, download=True).check_source()  # tmp_path, its nearest existing ancestor, is writable
    assert not (tmp_path / "new").exists()

    (tmp_path / "a-file").write_text("")
    under_a_file = tmp_path / "a-file" / "cifar10"
    with pytest.raises(
        NotADirectoryError, match=rf"archive into {under_a_file}, but {tmp_path / 'a-file'} is"
    ):
        _dm(under_a_file, download=True).check_source()

    monkeypatch.setattr(os, "access", lambda path, mode: False)  # tests run as root: chmod would not do
    with pytest.raises(PermissionError, match=rf"but {tmp_path} is not writable: check data\.root") as err:
        _dm(root, download=True).check_source()
    assert str(root / CIFAR_FOLDER / "data_batch_1") in str(err.value) and URL in str(err.value)
    assert listing(tmp_path) == {"a-file"}


def _offline(monkeypatch) -> list[str]:
    """Every URL torchvision tries fails as it would offline; returns the URLs tried."""
    tried = []

    def urlopen(request, *args, **kwargs):
        tried.append(getattr(request, "full_url", request))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return tried


def test_a_failed_download_leaves_no_folder_behind(tmp_path, monkeypatch):
    tried = _offline(monkeypatch)
    root = tmp_path / "mistyped" / "deeper" / "cifar10"
    with pytest.raises(FileNotFoundError, match=r"The download failed: URLError") as err:
        _dm(root, download=True).prepare_data()
    assert tried and URL in str(err.value)  # torchvision did try, through the patched urlopen ...
    assert listing(tmp_path) == set()  # ... and the folders it made for the archive are gone


def test_a_stalled_download_times_out_and_is_cleaned_up(tmp_path, monkeypatch):
    """A server (here a proxy on loopback) that accepts the connection and never answers: torchvision's
    urlopen has no timeout and the download hung for ever; it now fails after DOWNLOAD_TIMEOUT seconds
    without progress, says so and leaves nothing behind. No packet leaves this machine."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    held = []
    threading.Thread(target=lambda: held.append(server.accept()), daemon=True).start()
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.setattr(cifar10, "DOWNLOAD_TIMEOUT", 0.5)
    root = tmp_path / "cifar10"
    before = socket.getdefaulttimeout()
    try:
        with pytest.raises(FileNotFoundError, match=r"The download failed: .*timed out") as err:
            _dm(root, download=True).prepare_data()
    finally:
        server.close()
    assert held and URL in str(err.value)  # the request reached the stalled server, and gave up
    assert listing(tmp_path) == set() and socket.getdefaulttimeout() == before


def test_a_failed_download_into_an_existing_root_leaves_it_as_it_was(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")

    def partial_download(url, root, filename, md5=None):
        Path(root, filename).write_bytes(b"\x1f\x8b half an archive")
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(cifar10, "download_url", partial_download)
    with pytest.raises(FileNotFoundError, match="The download failed: ConnectionResetError"):
        _dm(tmp_path, download=True).prepare_data()
    assert listing(tmp_path) == {"notes.txt"}
    # the batches' folder as a link to storage not mounted now: the user's, kept
    (tmp_path / CIFAR_FOLDER).symlink_to(tmp_path / "unmounted" / CIFAR_FOLDER)
    with pytest.raises(FileNotFoundError, match="The download failed: ConnectionResetError"):
        _dm(tmp_path, download=True).prepare_data()
    assert (tmp_path / CIFAR_FOLDER).is_symlink() and listing(tmp_path) == {"notes.txt", CIFAR_FOLDER}


def test_a_corrupt_download_is_removed(tmp_path, monkeypatch):
    def truncated_download(url, root, filename, md5=None):
        archive = write_cifar10(tmp_path / "src", archive=True)
        Path(root, filename).write_bytes(archive.read_bytes()[:2000])

    monkeypatch.setattr(cifar10, "download_url", truncated_download)
    root = tmp_path / "cifar10"
    with pytest.raises(FileNotFoundError, match="The download failed: DataError: .*not a complete gzip"):
        _dm(root, download=True).prepare_data()
    assert not root.exists()


def test_a_download_is_extracted(tmp_path, monkeypatch):
    def download(url, root, filename, md5=None):
        assert url == URL
        os.makedirs(root, exist_ok=True)  # as torchvision does
        archive = write_cifar10(Path(root) / "src", archive=True)
        os.replace(archive, Path(root, filename))
        (Path(root) / "src").rmdir()

    monkeypatch.setattr(cifar10, "download_url", download)
    root = tmp_path / "cifar10"
    dm = _dm(root, download=True)
    dm.prepare_data()
    assert listing(root) == {"cifar-10-python.tar.gz", CIFAR_FOLDER, ".prepare.lock"} | {
        f"{CIFAR_FOLDER}/{name}"
        for name in ("batches.meta", "test_batch", *(f"data_batch_{i}" for i in range(1, 6)))
    }
    dm.setup("fit")
    assert len(dm.train_set) == 40


def test_a_second_node_waits_for_the_first_ones_download_and_uses_it(tmp_path, monkeypatch):
    """Lightning prepares the data on local rank 0 of every node: two nodes on one shared file system
    downloaded into the same partial archive and extracted into the same folder at once."""
    import threading

    from act_lightning.data import storage

    downloads = []
    monkeypatch.setattr(cifar10, "download_url", lambda *a, **k: downloads.append(a))
    root = tmp_path / "cifar10"
    second = threading.Thread(target=lambda: _dm(root, download=True).prepare_data())
    with storage.one_at_a_time(root):  # the first node is downloading
        second.start()
        second.join(timeout=2)
        assert second.is_alive()  # the second waits
        write_cifar10(root)
    second.join(timeout=60)
    assert not second.is_alive() and downloads == []  # it found the batches and fetched nothing
    dm = _dm(root)
    dm.setup("fit")
    assert len(dm.train_set) == 40


def test_two_nodes_whose_downloads_fail_leave_nothing_and_keep_another_jobs_files(tmp_path, monkeypatch):
    # the second node waits while the first downloads; the first fails and removes the folders it made,
    # then the second makes them again and fails too: it removes what it made, not what it found. A job
    # that wrote into a folder made for the download (data/ created by it) keeps its files.
    import threading
    import time

    root = tmp_path / "scratch" / "cifar10"
    other_job = tmp_path / "scratch" / "imagenet64" / "train_images.npy"
    failures = []

    def failing_download(url, root_, filename, md5=None):
        Path(root_, filename).write_bytes(b"\x1f\x8b half an archive")
        if threading.current_thread().name == "first":
            time.sleep(1.0)  # the second node starts meanwhile, and waits
        raise ConnectionResetError("connection reset by peer")

    def node():
        try:
            _dm(root, download=True).prepare_data()
        except FileNotFoundError as err:
            failures.append(str(err))

    monkeypatch.setattr(cifar10, "download_url", failing_download)
    first = threading.Thread(target=node, name="first")
    first.start()
    time.sleep(0.3)
    second = threading.Thread(target=node, name="second")
    second.start()
    first.join(timeout=60)
    second.join(timeout=60)
    assert len(failures) == 2 and all("The download failed: ConnectionResetError" in f for f in failures)
    assert listing(tmp_path) == set()

    def download_beside_another_job(url, root_, filename, md5=None):
        other_job.parent.mkdir(parents=True)
        other_job.write_bytes(b"another job's array")
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(cifar10, "download_url", download_beside_another_job)
    with pytest.raises(FileNotFoundError, match="The download failed"):
        _dm(root, download=True).prepare_data()
    assert listing(tmp_path) == {"scratch", "scratch/imagenet64", "scratch/imagenet64/train_images.npy"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_in_memory_set_lives_on_the_gpu(cifar_root):
    dm = _dm(cifar_root, in_memory=True, hflip=False)
    dm.setup("fit")
    index = next(iter(dm.train_dataloader())).cuda()
    half = dm.on_after_batch_transfer(index, 0)
    assert half.gen.is_cuda and dm._on_device[0].is_cuda and dm._on_device[0].shape == (40, 3, 32, 32)
    images, _ = load_cifar10_train(cifar_root)
    expected = images[index.cpu()].float() / 127.5 - 1
    assert torch.allclose(torch.cat([half.gen, half.disc]).cpu(), expected, atol=1e-6)


def test_batches_not_checked_against_the_release_have_a_reference_fingerprint(tmp_path):
    """With data.verify=false the batches may be a user's own, replaced at the same count: the cached FID
    statistics were read back for other images. Checked against the MD5s, they are the release: None."""
    write_cifar10(tmp_path, seed=0)
    first = _dm(tmp_path).reference_fingerprint()
    assert first is not None and _dm(tmp_path, verify=True).reference_fingerprint() is None
    assert _dm(tmp_path).reference_fingerprint() == first  # as long as the files stay
    batch = tmp_path / CIFAR_FOLDER / "data_batch_3"
    stat = batch.stat()
    os.utime(batch, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # rewritten, same size
    assert _dm(tmp_path).reference_fingerprint() != first


def test_a_batch_re_saved_with_a_fortran_ordered_array_reads_its_values(tmp_path):
    """numpy's own reconstructor read it; the library's arrays must too (refused as corrupt once)."""
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    batch = {b"data": np.asfortranarray(data), b"labels": np.asfortranarray(np.array([3, 9]))}
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=4))
    images, labels = read_batch(tmp_path / "data_batch_1")
    assert np.array_equal(images, data) and images.flags.c_contiguous and images.flags.writeable
    assert labels.tolist() == [3, 9]
