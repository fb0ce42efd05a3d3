"""What the commands share: the device option, integer options and the folder they write into are
refused by name before any work; integer options of training (eval.every, ...) by the same check."""

import os

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from act_lightning.checks import check_count
from act_lightning.commands import check_out_folder, resolve_device
from act_lightning.launch import CheckRunFolder, LaunchLog
from act_lightning.train import check_config
from tests.conftest import compose


def test_device_names_what_torch_does_not_know_and_cuda_this_machine_lacks(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N; got 'gpu'"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(
            ValueError, match=f"device={spec}: this machine has no CUDA device; use device=cpu"
        ):
            resolve_device(spec)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(
        ValueError, match=r"device=cuda:2: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"
    ):
        resolve_device("cuda:2")


@pytest.mark.parametrize("value", ["abc", 0, 1.5, True, None])
def test_a_count_must_be_an_integer_at_least_its_minimum(value):
    with pytest.raises(ValueError, match=f"num_samples must be an integer >= 1, got {value!r}"):
        check_count(value, "num_samples")
    assert check_count(1, "num_samples") == 1
    with pytest.raises(ValueError, match="num_samples must be an integer >= 2, got 1"):
        check_count(1, "num_samples", 2)


def test_an_out_folder_must_be_a_writable_folder_or_below_one(tmp_path):
    assert check_out_folder(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"  # nothing created
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(
        NotADirectoryError, match=f"out={tmp_path / 'file' / 'x'}: {tmp_path / 'file'} is not a"
    ):
        check_out_folder(tmp_path / "file" / "x")
    with pytest.raises(NotADirectoryError, match="output's folder="):
        check_out_folder(tmp_path / "file", "output's folder")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(PermissionError, match=f"out={locked / 'x'}: cannot write into {locked}"):
            check_out_folder(locked / "x")


@pytest.mark.parametrize(
    "override, key",
    [
        ("eval.every=abc", "eval.every"),
        ("eval.every=1e3", "eval.every"),  # Hydra reads 1e3 as a float
        ("eval.batch_size=0", "eval.batch_size"),
        ("callbacks.checkpoint.every_n_iterations=x", "callbacks.checkpoint.every_n_iterations"),
        ("guard.max_bad_iterations=2.5", "guard.max_bad_iterations"),
    ],
)
def test_training_refuses_a_count_that_is_no_integer_by_its_key(override, key, tmp_path):
    """In the order train() meets them: its own checks, then the callbacks."""

    cfg = compose(["debug=smoke", override], run_dir=str(tmp_path))
    with pytest.raises(Exception, match=f"{key} must be an integer >= 1, got"):
        check_config(cfg)
        for callback in cfg.callbacks.values():
            if callback is not None:
                instantiate(callback)


def test_a_run_or_sweep_folder_that_cannot_be_written_stops_hydra_with_status_2(tmp_path, capsys):
    """act_lightning.launch.CheckRunFolder, Hydra's callback: the key of the launch's kind is checked."""

    (tmp_path / "file").write_text("x")
    config = OmegaConf.create(
        {"hydra": {"run": {"dir": str(tmp_path / "run")}, "sweep": {"dir": str(tmp_path / "file" / "sweep")}}}
    )
    CheckRunFolder().on_run_start(config)
    with pytest.raises(SystemExit) as stopped:
        CheckRunFolder().on_multirun_start(config)
    assert stopped.value.code == 2
    assert capsys.readouterr().err == (
        f"error: hydra.sweep.dir={tmp_path / 'file' / 'sweep'}: {tmp_path / 'file'} is not a folder\n"
    )
    handler = LaunchLog(str(tmp_path / "run" / ".hydra" / "launches" / "x" / "train.log"))  # its folder made
    handler.close()
    assert (tmp_path / "run" / ".hydra" / "launches" / "x" / "train.log").is_file()
