"""The package as pip builds it (`pip install .`, `pip install git+...`): the wheel holds every module and
the commands' Hydra configs, and the commands run from it outside any checkout, with a user's own configs
beside the shipped ones (`--config-dir`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import act_lightning
from tests.conftest import CONF, ROOT

pytestmark = pytest.mark.slow

SOURCES = ("pyproject.toml", "README.md", "LICENSE", "src", "conf")  # what the build reads: an sdist


def _build(kind: str, source: Path, out: Path) -> Path:
    """pip's build of `source` into `out` without build isolation (that would download setuptools):
    the setuptools of this environment, which `.[dev]` requires recent enough."""
    if kind == "wheel":
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
        result = subprocess.run([*cmd, "-q", "-w", str(out), str(source)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "warn" not in result.stderr.lower(), result.stderr[-3000:]
        return next(out.glob("*.whl"))
    code = f"from setuptools import build_meta as b; print(b.build_sdist({str(out)!r}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel that `pip install` of an sdist builds (PyPI's path; a checkout's is the same build),
    from a copy of the sources, so that the build's own folders stay out of the checkout."""
    tmp = tmp_path_factory.mktemp("packaging")
    copy = tmp / "checkout"
    copy.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
            )
        else:
            shutil.copy2(ROOT / name, copy / name)
    sdist = _build("sdist", copy, tmp / "sdist")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    (unpacked,) = (tmp / "unpacked").iterdir()
    return _build("wheel", unpacked, tmp / "wheel")


def _relative(files, root: Path, suffix: str) -> set[str]:
    return {
        str(Path(f).relative_to(root))
        for f in files
        if str(f).endswith(suffix) and "__pycache__" not in str(f)
    }


def test_the_wheel_holds_every_module_and_every_config(wheel):
    assert wheel.name.startswith(f"act_lightning-{act_lightning.__version__}-")  # one version, the module's
    names = zipfile.ZipFile(wheel).namelist()
    package = ROOT / "src" / "act_lightning"
    modules = _relative(package.rglob("*.py"), package, ".py")
    assert {n.removeprefix("act_lightning/") for n in names if n.endswith(".py")} == modules
    configs = _relative(CONF.rglob("*.yaml"), CONF, ".yaml")
    assert {n.removeprefix("act_lightning/conf/") for n in names if n.endswith(".yaml")} == configs
    assert len(configs) > 50 and "train.yaml" in configs and "experiment/cifar10.yaml" in configs
    version = act_lightning.__version__
    assert f"act_lightning-{version}.dist-info/licenses/LICENSE" in names  # MIT: the text travels with it


def test_commands_run_from_the_installed_wheel_with_a_users_own_configs(wheel, tmp_path):
    """What `pip install` puts in site-packages, on the path of a new interpreter started outside the
    checkout: the configs are the wheel's own, and `--config-dir` adds a user's experiment to them (README,
    "Installed as a package")."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "work"
    (work / "my_conf" / "experiment").mkdir(parents=True)
    (work / "my_conf" / "experiment" / "my_experiment.yaml").write_text(
        "# @package _global_\ndefaults: [cifar10]\nexperiment_name: my_experiment\n"
        "model:\n  schedule:\n    gan_ratio: 0.5\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    code = "import act_lightning.commands as c; print(c.__file__); print(c.CONFIG_DIR)"
    where = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True)
    assert where.returncode == 0, where.stderr[-3000:]
    module, config_dir = where.stdout.split()
    assert Path(module).is_relative_to(site) and Path(config_dir) == site / "act_lightning" / "conf"

    command = "python -m act_lightning.train --config-dir my_conf experiment=my_experiment"
    args = [*command.split()[1:], "debug=smoke", "data=synthetic", f"hydra.run.dir={work / 'run'}"]
    result = subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    hparams = (work / "run" / "hparams.yaml").read_text()
    assert "experiment_name: my_experiment" in hparams and "gan_ratio: 0.5" in hparams
    assert (work / "run" / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["my_conf", "run"]


def test_import_act_lightning_reaches_the_submodules_the_readme_names():
    """`act_lightning.checkpoints.load_model(path)`, `act_lightning.seeds.image_noise(...)` after a bare
    `import act_lightning`, in a fresh interpreter (each raised AttributeError); a name that is no
    submodule stays an AttributeError."""
    code = (
        "import act_lightning\n"
        "print(act_lightning.checkpoints.load_model.__name__, act_lightning.seeds.image_noise.__name__)\n"
        "try:\n    act_lightning.no_such_module\nexcept AttributeError as err:\n    print(err)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [
        "load_model image_noise",
        "module 'act_lightning' has no attribute 'no_such_module'",
    ]
