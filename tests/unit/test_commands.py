"""What the commands share: the device option, integer options and the folder they write into are
refused by name before any work; integer options of training (eval.every, ...) by the same check."""

import os

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import MissingMandatoryValue, OmegaConf

from act_lightning.checks import check_count
from act_lightning.commands import (
    CONFIG_DIR,
    REFUSED,
    check_net,
    check_out_folder,
    refuse,
    resolve_device,
    write_npz,
)
from act_lightning.launch import CheckRunFolder, LaunchLog
from act_lightning.train import check_config
from tests.conftest import compose, refusal, run_cli


def test_device_names_what_torch_does_not_know_and_cuda_this_machine_lacks(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N; got 'gpu'"):
        resolve_device("gpu")
    # devices torch knows but this library does not run on (torch's own error came as a traceback)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for spec in ("mps", "meta", "xla"):
        with pytest.raises(ValueError, match=f"device={spec}: not a device here; device must be auto, cpu"):
            resolve_device(spec)
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
    # out=fid.npz made a folder of that name with samples.npz inside
    with pytest.raises(ValueError, match=r"out=.*fid.npz: out is the folder the results go into, not a file"):
        check_out_folder(tmp_path / "fid.npz")
    (tmp_path / "a.png").mkdir()
    assert check_out_folder(tmp_path / "a.png") == tmp_path / "a.png"  # a folder so named is a folder


def test_an_out_folder_that_holds_an_earlier_result_is_refused_unless_overwrite(tmp_path):
    (tmp_path / "samples.npz").write_bytes(b"a 50k draw")
    with pytest.raises(
        ValueError, match=r"already holds samples.npz of an earlier call: give another out=, or ov"
    ):
        check_out_folder(tmp_path, result="samples.npz", overwrite=False)
    assert check_out_folder(tmp_path, result="samples.npz", overwrite=True) == tmp_path
    assert check_out_folder(tmp_path, result="result.npz", overwrite=False) == tmp_path
    with pytest.raises(ValueError, match="overwrite must be true or false; got 'no'"):
        check_out_folder(tmp_path, result="samples.npz", overwrite="no")
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


def test_training_on_a_gpu_where_torch_sees_none_is_refused_by_key(monkeypatch, tmp_path):
    """trainer=gpu (or trainer.accelerator=cuda) without a GPU: refused naming trainer.accelerator, before
    Lightning's "No supported gpu backend found!" (which names no key); cpu and auto pass."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for override in ("trainer=gpu", "trainer.accelerator=cuda"):
        accelerator = override.split("=")[1]
        with pytest.raises(ValueError, match=rf"^trainer.accelerator={accelerator}: torch sees no GPU here"):
            check_config(compose([override], run_dir=str(tmp_path)))  # debug=smoke sets the CPU
    for fine in ("trainer.accelerator=cpu", "trainer.accelerator=auto"):
        check_config(compose([fine], run_dir=str(tmp_path)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_config(compose(["trainer=gpu"], run_dir=str(tmp_path)))


def test_an_apple_gpu_where_torch_sees_none_is_refused_by_key(monkeypatch, tmp_path):
    """trainer.accelerator=mps off a Mac: refused naming the key, where Lightning's message named its
    MPSAccelerator class."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^trainer.accelerator=mps: torch sees no Apple GPU here"):
        check_config(compose(["trainer.accelerator=mps"], run_dir=str(tmp_path)))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    check_config(compose(["trainer.accelerator=mps"], run_dir=str(tmp_path)))


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.devices=0", "trainer.devices=0"),
        ("trainer.devices=-2", "trainer.devices=-2"),
        ("trainer.devices=two", "trainer.devices=two"),
        ("trainer.devices=[]", r"trainer.devices=\[\]"),
        ("trainer.devices=[0,-1]", r"trainer.devices=\[0, -1\]"),
        ("trainer.num_nodes=0", "trainer.num_nodes=0"),
        ("trainer.num_nodes=1.5", "trainer.num_nodes=1.5"),
    ],
)
def test_device_and_node_counts_lightning_refuses_are_refused_by_key(override, key, tmp_path):
    """Counts Lightning refuses once the run folder is written, in messages naming Trainer(devices=0) or
    num_nodes, are refused by key first; the forms it takes pass."""
    with pytest.raises(ValueError, match=rf"^{key}: the "):
        check_config(compose([override], run_dir=str(tmp_path)))
    for fine in ("auto", "-1", "[0,1]", "'0,1'"):
        check_config(compose(["trainer.accelerator=cpu", f"trainer.devices={fine}"], run_dir=str(tmp_path)))


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


def test_a_count_may_have_an_upper_bound_named_in_the_message():
    assert check_count(5, "k", 1, 5) == 5 and check_count(-3, "k", None, 0) == -3
    with pytest.raises(ValueError, match=r"^k must be an integer in \[1, 5\], got 6$"):
        check_count(6, "k", 1, 5)
    with pytest.raises(ValueError, match=r"^k must be an integer <= 0, got 1$"):
        check_count(1, "k", None, 0)
    with pytest.raises(ValueError, match=r"^k must be an integer, got 'x'$"):
        check_count("x", "k", None)


def test_net_is_target_or_generator():
    check_net("target")
    check_net("generator")
    with pytest.raises(ValueError, match="net must be target or generator, got 'online'"):
        check_net("online")


def test_a_device_of_the_wrong_type_is_refused_by_name():
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N; got None"):
        resolve_device(None)


def test_a_key_the_class_does_not_take_is_named_with_where_it_lives(capsys, monkeypatch, tmp_path):
    """`+model.gan_ratio=0` (what Hydra suggests when model.gan_ratio is not in the config) reached
    ACTModule as a keyword it does not take, and the message named neither the key nor model.schedule."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    cases = (
        ("model", "gan_ratio", "model.gan_ratio is not a key of model: it is model.schedule.gan_ratio ("),
        ("model", "compile", "model.compile is not a key of model: it is model.speed.compile ("),
        ("data", "held", "data.held is not a key of data (T.__init__() got an unexpected keyword argument"),
    )
    for node, name, said in cases:
        err = InstantiationException(f"Error in call to target 'T':\nTypeError(...)\nfull_key: {node}")
        err.__cause__ = TypeError(f"T.__init__() got an unexpected keyword argument '{name}'")
        with pytest.raises(SystemExit):
            refuse(err)
        assert capsys.readouterr().err.startswith(f"error: {said}")
    result = run_cli(["debug=smoke", "data=synthetic", "+model.gan_ratio=0"], tmp_path / "run")  # the command
    assert refusal(result).startswith("error: model.gan_ratio is not a key of model: it is model.schedule.")


def test_refuse_prints_the_cause_in_one_line_and_exits_2(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    inner = ValueError("data.root must be set")
    middle = InstantiationException("Error in call to target 'x'")
    middle.__cause__ = inner
    outer = InstantiationException("Error in call to target 'y'")
    outer.__cause__ = middle
    with pytest.raises(SystemExit) as exit_:
        refuse(outer)
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == "error: data.root must be set\n" and captured.out == ""
    with pytest.raises(SystemExit):
        refuse(_missing("checkpoint"))
    assert capsys.readouterr().err == (
        "error: checkpoint is required: give checkpoint=... (--help lists the options)\n"
    )
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(InstantiationException):
        refuse(outer)


def _missing(key: str) -> Exception:
    try:
        getattr(OmegaConf.create({key: "???"}), key)
    except MissingMandatoryValue as err:
        return err
    raise AssertionError("no MissingMandatoryValue")


def test_refused_errors_include_every_bad_path_kind():
    for err in (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
        assert issubclass(err, REFUSED)


def test_write_npz_writes_the_arrays_atomically(tmp_path):
    write_npz(tmp_path / "s.npz", images=np.arange(6, dtype=np.uint8).reshape(2, 3), labels=np.array([1, 2]))
    with np.load(tmp_path / "s.npz") as npz:
        assert npz["images"].tolist() == [[0, 1, 2], [3, 4, 5]] and npz["labels"].tolist() == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]  # no temporary file left
    assert (CONFIG_DIR / "train.yaml").is_file() and (CONFIG_DIR / "sample.yaml").is_file()


def test_write_npz_leaves_the_previous_file_whole_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "s.npz"
    write_npz(path, images=np.zeros(3))

    def failing(file, **arrays):
        if isinstance(file, (str, os.PathLike)):
            file = open(file, "wb")  # noqa: SIM115 - a stand-in that fails halfway
        file.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "savez", failing)
    with pytest.raises(OSError, match="No space left"):
        write_npz(path, images=np.ones(3))
    monkeypatch.undo()
    with np.load(path) as npz:
        assert npz["images"].tolist() == [0.0, 0.0, 0.0]


def test_list_options_given_as_a_bare_word_are_refused_with_the_brackets_they_need(tmp_path):
    """`samplers=1-step`, `metrics=fid` or `eval.metrics=fid`: Hydra reads a bare word as a string, which
    was taken letter by letter ("1, -, s, t, e, p not in taus"); each is refused by its key, with an
    example. The bracketed lists pass."""
    from act_lightning.callbacks import FrechetEvaluation
    from act_lightning.evaluate import check_options
    from act_lightning.metrics.extra import check_metrics

    evaluate = OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "evaluate.yaml"), {"samplers": "1-step"})
    with pytest.raises(
        ValueError, match=r"^samplers is a list of names in brackets, e.g. samplers=\[1-step\]"
    ):
        check_options(evaluate)
    check_options(OmegaConf.merge(evaluate, {"samplers": ["1-step"]}))
    with pytest.raises(
        ValueError, match=r"^metrics is a list of names in brackets, e.g. metrics=\[fid,kid\]"
    ):
        check_metrics("fid", "inception")
    assert check_metrics(OmegaConf.create(["fid", "kid"]), "inception") == ["fid", "kid"]
    said = r"^eval.metrics is a list of names in brackets, e.g. eval.metrics=\[fid,kid\]; got 'fid'"
    with pytest.raises(ValueError, match=said):
        FrechetEvaluation(run_dir=str(tmp_path), features="digits", metrics="fid")


def test_the_digits_features_are_refused_for_images_other_than_8x8_grey(tmp_path):
    """They failed in the classifier's first convolution, a traceback at start-up's first evaluation."""
    colour = [
        "data=synthetic",
        "data.channels=3",
        "model.generator.out_channels=3",
        "model.generator.used_channels=null",
    ]
    with pytest.raises(ValueError, match="eval.features=digits measures 8x8 grey images .* data.channels=3"):
        check_config(compose(colour, run_dir=str(tmp_path)))
    check_config(compose([*colour, "eval.features=inception"], run_dir=str(tmp_path)))
    check_config(compose(["data=synthetic"], run_dir=str(tmp_path)))  # the quickstart's shape: fine


def test_under_torchrun_the_devices_and_nodes_must_make_its_world_size(monkeypatch):
    """With trainer.devices=1 (debug=smoke's) each of torchrun's workers trained a run of its own into the
    same folder, overwriting the others' files, with exit status 0."""
    from act_lightning.train import check_torchrun_world_size

    check_torchrun_world_size({"devices": 1})  # not under torchrun: nothing to compare
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        ValueError, match=r"torchrun started 2 workers, and trainer.devices=1 x trainer.num_nodes=1"
    ):
        check_torchrun_world_size({"devices": 1, "num_nodes": 1})
    check_torchrun_world_size({"devices": 2, "num_nodes": 1})
    check_torchrun_world_size({"devices": [0], "num_nodes": 2})
    check_torchrun_world_size({"devices": "auto"})  # Lightning's own check
    with pytest.raises(ValueError, match="trainer.devices=4 x trainer.num_nodes=1 make 4"):
        check_torchrun_world_size({"devices": "4"})
