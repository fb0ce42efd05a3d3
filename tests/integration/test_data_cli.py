"""Each data source through the training CLI, on small files in its official format (no network):
`python -m act_lightning.train experiment=<e> debug=smoke data.root=<tmp>`."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from hydra.utils import get_class, instantiate

from act_lightning.prepare import main as prepare_main
from tests.conftest import compose, run_cli
from tests.helpers_data import write_cifar10, write_image_folder, write_imagenet64, write_lsun_lmdb
from tests.helpers_training import THIN


@pytest.fixture(scope="module")
def data_roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("data")
    write_cifar10(base / "cifar10", per_batch=4)
    write_imagenet64(base / "imagenet64_official", per_file=2)
    assert (
        prepare_main(["imagenet64", str(base / "imagenet64_official"), str(base / "imagenet64"), "-q"]) == 0
    )
    write_lsun_lmdb(base / "lsun_cat256" / "cat", n=8)  # 256x256 on CPU is the expensive one: keep it tiny
    write_image_folder(base / "folder", classes=("a", "b"), per_class=4)
    return {
        "cifar10": base / "cifar10",
        "imagenet64": base / "imagenet64",
        "lsun_cat256": base / "lsun_cat256",
        "folder": base / "folder",
    }


CASES = {
    "cifar10": ["experiment=cifar10", "data.verify=false"],  # the tests' batches are not the official files
    "imagenet64": ["experiment=imagenet64"],  # the prepared form
    "lsun_cat256": ["experiment=lsun_cat256"],  # the LMDB, webp and jpeg values
    "folder": ["experiment=cifar10", "data=folder"],  # your own images, at the experiment's 32x32
}


def constructor_arguments(cls: type) -> set[str]:
    """The named arguments `cls(...)` accepts: those of its `__init__` and, while an `__init__` forwards
    `**kwargs`, those of the next `__init__` up the MRO (so a DataModule that passes the shared arguments
    on to `ImageDataModule` is held to them as well)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = list(inspect.signature(klass.__init__).parameters.values())[1:]  # without self
        names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def test_constructor_arguments_follow_kwargs_up_the_mro():
    class Base:
        def __init__(self, *, root=None, batch_size: int) -> None: ...

    class Source(Base):
        def __init__(self, root, *, verify=True, **kwargs) -> None: ...

    class Closed(Base):
        def __init__(self, root, *args) -> None: ...  # forwards no keyword arguments

    assert constructor_arguments(Source) == {"root", "verify", "batch_size"}
    assert constructor_arguments(Closed) == {"root"}


@pytest.mark.parametrize("source", list(CASES))
def test_data_configs_instantiate_with_the_experiments_shapes(source, tmp_path):
    cfg = compose([*CASES[source], f"data.root={tmp_path}"], run_dir=str(tmp_path / "run"))
    # config keys equal constructor arguments: a key no constructor takes, or an argument the config
    # leaves out, fails here
    assert set(cfg.data) - {"_target_"} == constructor_arguments(get_class(cfg.data._target_))
    dm = instantiate(cfg.data)  # touches no file
    assert (dm.image_size, dm.channels, dm.num_classes) == (
        cfg.data.image_size,
        cfg.data.channels,
        cfg.data.num_classes,
    )
    assert dm.root == str(tmp_path) and dm.batch_size == cfg.data.batch_size


def test_data_root_defaults_under_the_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ACT_DATA_DIR", str(tmp_path))
    cfg = compose(["experiment=imagenet64"], run_dir=str(tmp_path / "run"))
    assert cfg.data.root == f"{tmp_path}/imagenet64"


@pytest.mark.slow
@pytest.mark.parametrize("source", list(CASES))
def test_smoke_run_on_each_data_source(source, data_roots, tmp_path):
    run = tmp_path / "run"
    # the data path end to end, with the evaluation; LPIPS' full-width VGG runs in test_cli's smoke runs
    cheap = ["model.distance=pseudo_huber"]
    if source == "lsun_cat256":  # the 256x256 networks thinner: 10 s, not 16 s, in the suite
        cheap += THIN
    result = run_cli([*CASES[source], "debug=smoke", f"data.root={data_roots[source]}", *cheap], run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_missing_data_stops_the_cli_with_the_files_to_fetch(tmp_path):
    result = run_cli(
        ["experiment=cifar10", "debug=smoke", f"data.root={tmp_path}", "data.download=false"],
        tmp_path / "run",
    )
    assert result.returncode != 0
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in result.stderr
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in result.stderr


@pytest.mark.parametrize(
    "option, value, low",
    [("--image-size", "0", 1), ("--max-images", "-3", 1), ("--max-images", "0", 1), ("--workers", "-1", 0)],
)
def test_prepare_refuses_a_count_out_of_range_by_its_option(option, value, low, tmp_path, capsys):
    """They were numpy's and Pillow's messages ("negative dimensions are not allowed"), or, for
    --max-images 0, an empty prepared set and exit status 0."""
    with pytest.raises(SystemExit) as stop:
        prepare_main(["lsun_cat256", str(tmp_path / "src"), str(tmp_path / "dst"), option, value])
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and said.endswith(
        f"argument {option}: must be an integer >= {low}, got '{value}'"
    )
    assert not (tmp_path / "dst").exists()


def test_prepare_without_a_data_set_names_the_ones_it_takes(capsys):
    """argparse said "the following arguments are required: source", which reads as the SRC folder."""
    with pytest.raises(SystemExit) as stop:
        prepare_main([])
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and said.endswith("required: {imagenet64,lsun_cat256,verify}")
