"""act_lightning.checkpoints: one safe reader; every refusal names the key and the file."""

from __future__ import annotations

import errno
import io
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from act_lightning.callbacks import AtomicCheckpointIO, LastCheckpoint
from act_lightning.checkpoints import (
    UnreadableCheckpoint,
    checkpoint_iteration,
    human_bytes,
    load_checkpoint,
    load_model,
    out_of_space,
    read_checkpoint,
    tensor_bytes,
)
from tests.conftest import compose


class Pickled:  # an object the safe loader refuses
    pass


def test_a_missing_file_is_named_by_its_key(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=f"ckpt_path={tmp_path / 'nope.ckpt'}: no such checkpoint file"
    ):
        read_checkpoint(tmp_path / "nope.ckpt", "ckpt_path")


def test_train_reads_memory_mapped_and_refuses_a_checkpoint_without_an_iteration(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"iteration": torch.tensor(7), "w": torch.ones(3)}}, good)
    checkpoint = read_checkpoint(good, "ckpt_path", mmap=True, check=checkpoint_iteration)
    assert checkpoint_iteration(checkpoint) == 7 and torch.equal(checkpoint["state_dict"]["w"], torch.ones(3))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match=r"ckpt_path=.*foreign.ckpt: not a readable checkpoint of "):
        read_checkpoint(foreign, "ckpt_path", mmap=True, check=checkpoint_iteration)


def test_the_safe_loader_refuses_pickled_objects_with_the_callers_advice(tmp_path):
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "object": Pickled()}, path)
    with pytest.raises(
        ValueError,
        match=r"ckpt=.*pickled.ckpt: not a readable checkpoint of act_lightning.train \(Unpickling",
    ):
        read_checkpoint(path, "ckpt")
    with pytest.raises(ValueError, match=r"CKPT=.*pickled.ckpt: refused \(UnpicklingError\), see \{docs\}$"):
        read_checkpoint(path, "CKPT", unreadable="refused ({kind}), see {{docs}}")


def test_load_checkpoint_wants_a_training_config_and_finite_weights(tmp_path):
    path = tmp_path / "a.ckpt"
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a checkpoint written by act_lightning.train"):
        load_checkpoint(path)
    torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match=r"ckpt=.*a.ckpt: holds no training config"):
        load_checkpoint(path)
    # one of the paper's released files, not converted yet (compiled: its keys hold `_orig_mod.`)
    torch.save({"state_dict": {"model._orig_mod.unet.conv_in.weight": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match=r"reference code, .*convert_reference .*a.ckpt OUT.ckpt, then"):
        load_checkpoint(path)
    torch.save({"state_dict": {"w": torch.tensor([float("nan")])}, "act_config": {"seed": 1}}, path)
    with pytest.raises(ValueError, match=r"non-finite weights in w: the run diverged"):
        load_checkpoint(path)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "act_config": {"seed": 1}}, path)
    checkpoint, run = load_checkpoint(path)
    assert run.seed == 1 and torch.equal(checkpoint["state_dict"]["w"], torch.zeros(1))
    # a diverged discriminator, which no command reads: the generators still sample
    state = {"w": torch.zeros(1), "discriminator.conv_in.weight": torch.tensor([float("nan")])}
    torch.save({"state_dict": state, "act_config": {"seed": 1}}, path)
    assert load_checkpoint(path)[1].seed == 1


def test_a_checkpoint_from_before_the_schedule_and_speed_groups_still_builds_its_networks(tmp_path):
    # act-lightning 0.1 kept the schedule's and the speed options' keys directly under `model`
    cfg = OmegaConf.to_container(
        compose(
            [
                "debug=smoke",
                "data=synthetic",
                "model.schedule.sigma_max=20",
                "model.speed.channels_last=false",
            ]
        ),
        resolve=True,
    )
    model = instantiate(cfg["model"])
    old = {k: v for k, v in cfg.items() if k != "model"}
    old["model"] = {k: v for k, v in cfg["model"].items() if k not in ("schedule", "speed")}
    for group in ("schedule", "speed"):
        old["model"].update({k: v for k, v in cfg["model"][group].items() if k != "_target_"})
    assert "gan_ratio" in old["model"] and "compile" in old["model"]
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("distance.")}
    torch.save({"state_dict": state, "act_config": old}, tmp_path / "old.ckpt")

    loaded, run, _ = load_model(tmp_path / "old.ckpt")
    assert run.model.schedule.sigma_max == 20 and "gan_ratio" not in run.model
    assert loaded.schedule.sigma_max == 20 and loaded.schedule.bins_max == model.schedule.bins_max
    z = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded.sample(z), model.eval().sample(z))


def test_a_checkpoint_of_a_run_with_the_gpu_speed_options_builds_eager(tmp_path):
    # its compile_r1, compile_augment, flex_attention and compile_mode were kept under the forced
    # compile=false, a set SpeedOptions refuses: sample, evaluate, export and edit could not open the run
    gpu = ["model.speed.compile=true", "model.speed.compile_mode=reduce-overhead"]
    gpu += [
        "model.speed.flex_attention=true",
        "model.speed.compile_r1=true",
        "model.speed.compile_augment=true",
    ]
    cfg = OmegaConf.to_container(compose(["debug=smoke", "data=synthetic", *gpu]), resolve=True)
    model = instantiate(compose(["debug=smoke", "data=synthetic", "model.speed.channels_last=false"]).model)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("distance.")}
    torch.save({"state_dict": state, "act_config": cfg}, tmp_path / "gpu.ckpt")
    loaded, run, _ = load_model(tmp_path / "gpu.ckpt")
    assert run.model.speed.flex_attention and not loaded.speed.compile and not loaded.speed.flex_attention
    z = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded.sample(z), model.eval().sample(z))


def _damaged_files(tmp_path) -> dict:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"iteration": torch.tensor(3), "w": torch.zeros(1000)}}, good)
    data = good.read_bytes()
    files = {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "random": bytes(range(7, 256)) * 20,
        "json": b'{"ckpt": "not really"}',
        "random pickle": b"\x80\x02\xff\xfe" * 50,
        "npz": _npz_bytes(),  # `sample`'s samples.npz given as ckpt: a zip, but no torch archive
    }
    for name, content in files.items():
        (tmp_path / f"{name}.ckpt").write_bytes(content)
    return {name: tmp_path / f"{name}.ckpt" for name in files}


def _npz_bytes() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, arr_0=np.zeros((2, 4, 4, 3), np.uint8), arr_1=np.zeros(2, np.int64))
    return buffer.getvalue()


@pytest.mark.parametrize("mmap", [False, True])
def test_empty_damaged_and_foreign_files_are_named_as_such_without_torchs_unsafe_advice(tmp_path, mmap):
    expected = {
        "empty": "empty (a copy or a save that did not finish)",
        "truncated": "damaged (truncated or corrupted",
        "random": "not a checkpoint (torch.save writes a zip archive; this file starts with b'\\x07",
        "json": 'not a checkpoint (torch.save writes a zip archive; this file starts with b\'{"ckpt"',
        "random pickle": "damaged (truncated or corrupted",
        "npz": "not a checkpoint (a numpy .npz of arrays (arr_0, arr_1))",
    }
    for name, path in _damaged_files(tmp_path).items():
        with pytest.raises(UnreadableCheckpoint) as refused:
            read_checkpoint(path, "ckpt", mmap=mmap, unreadable="holds pickled Python objects ({kind})")
        message = str(refused.value)
        assert message.startswith(f"ckpt={path}: {expected[name]}"), (name, message)
        assert "weights_only" not in message and "pickled" not in message, (name, message)
        assert refused.value.__cause__ is None and refused.value.__suppress_context__, name  # no torch text


def test_pickled_objects_are_named_without_torchs_unsafe_advice(tmp_path):
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "object": Pickled()}, path)
    with pytest.raises(UnreadableCheckpoint) as refused:
        read_checkpoint(path, "ckpt")
    assert "pickled Python objects besides tensors (tests.unit.test_checkpoints.Pickled)" in str(
        refused.value
    )
    assert "weights_only" not in str(refused.value)


@pytest.mark.parametrize("keep, kept", [(True, [2, 4, 6, 8]), (2, [6, 8]), (1, [8]), (0, []), (False, [])])
def test_keep_snapshots_keeps_all_the_newest_n_or_none(tmp_path, keep, kept):
    def save(path, weights_only):
        Path(path).write_bytes(b"state")

    trainer = SimpleNamespace(loggers=[], save_checkpoint=save, is_global_zero=True)
    callback = LastCheckpoint(str(tmp_path), every_n_iterations=2, keep_snapshots=keep)
    for iteration in (2, 4, 6, 8):
        callback._save(trainer, iteration)
    callback._commit(trainer)
    assert sorted(p.name for p in tmp_path.glob("iter_*.ckpt")) == [f"iter_{k:07d}.ckpt" for k in kept]
    assert (tmp_path / "last.ckpt").is_file()


@pytest.mark.parametrize("bad", [-1, 1.5, "two"])
def test_keep_snapshots_refuses_what_is_no_count(tmp_path, bad):
    with pytest.raises(ValueError, match="callbacks.checkpoint.keep_snapshots must be true"):
        LastCheckpoint(str(tmp_path), keep_snapshots=bad)


def test_the_full_disk_message_counts_the_checkpoints_bytes_and_recognises_a_quota():
    """What a save that ran out of space reports: the tensors' bytes (each element's size), in units of
    1000, and whether the error, or one it arose from, is a full disk or an exhausted quota."""
    tree = {
        "a": torch.zeros(3),
        "b": [torch.zeros(3, dtype=torch.float16), (torch.zeros(1, dtype=torch.int64),)],
    }
    assert tensor_bytes({**tree, "step": 7, "name": "x"}) == 3 * 4 + 3 * 2 + 8
    assert [human_bytes(n) for n in (999, 1010, 1500, 2.5e6, 3.3e9, 4e12)] == [
        "999 bytes",
        "1.0 KB",
        "1.5 KB",
        "2.5 MB",
        "3.3 GB",
        "4000.0 GB",
    ]
    for code in (errno.ENOSPC, errno.EDQUOT):
        try:
            try:
                raise OSError(code, "the disk")
            except OSError as cause:
                raise RuntimeError("torch.save: unexpected pos") from cause
        except RuntimeError as err:
            assert out_of_space(err)
    assert not out_of_space(OSError(errno.EACCES, "denied")) and not out_of_space(None)


def test_checkpoints_are_read_with_the_safe_loader_onto_the_cpu_and_stale_saves_removed(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.ones(2)}, tmp_path / "a.ckpt")
    assert torch.equal(io.load_checkpoint(tmp_path / "a.ckpt")["w"], torch.ones(2))
    torch.save({"object": Pickled()}, tmp_path / "pickled.ckpt")
    with pytest.raises(pickle.UnpicklingError):
        io.load_checkpoint(tmp_path / "pickled.ckpt")
    stale = tmp_path / ".last.ckpt.abcd1234.tmp"
    stale.write_bytes(b"half a checkpoint")
    callback = LastCheckpoint(str(tmp_path))
    callback.setup(SimpleNamespace(is_global_zero=False), None, "fit")  # another rank: not its folder
    callback.setup(SimpleNamespace(is_global_zero=True), None, "validate")
    assert stale.exists()
    callback.setup(SimpleNamespace(is_global_zero=True), None, "fit")
    assert not stale.exists() and (tmp_path / "a.ckpt").exists()


def test_the_cuda_generator_saved_and_restored_is_the_one_of_the_device_each_rank_trains_on(monkeypatch):
    """Rank 0 saved every visible device's state, of which it drew only on its own: a rank training on
    device 1 was given device 1's untouched state back (other dropout masks after a resume), and a resume
    on fewer devices failed to set states for devices that were not there."""
    from act_lightning.checkpoints import prepare_training_checkpoint, restore_rng

    current, other = torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": current)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [current, other])
    checkpoint = {"state_dict": {}}
    prepare_training_checkpoint(checkpoint, None, None, None)
    assert checkpoint["act_rng"]["cuda"] == [current]
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("every device set"))
    cpu = torch.get_rng_state()
    restore_rng({"cpu": cpu, "cuda": [current, other, other, other]})  # an older checkpoint's four devices
    assert restored == [current]
