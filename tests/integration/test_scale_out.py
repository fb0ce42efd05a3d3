"""Scale-out: Lightning's plain DDP on two CPU processes, the global batch on any number of devices, and
gradient accumulation; each must train what one process with the whole global batch trains."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from act_lightning.data import SyntheticDataModule
from act_lightning.train import train
from tests.conftest import COMMAND_ENV, compose, refusal, run_cli, run_module


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a: dict, b: dict, tol: float, tol_discriminator: float | None = None) -> None:
    """Every tensor equal, to a relative and absolute tolerance `tol` (0: bit for bit); the
    discriminator's to `tol_discriminator` (its R1 gradients are large, so rounding moves it further)."""
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            t = tol_discriminator if key.startswith("discriminator.") and tol_discriminator else tol
            torch.testing.assert_close(a[key], b[key], rtol=t, atol=t, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_plain_ddp_on_two_cpu_processes_trains_what_one_process_with_the_global_batch_trains(tmp_path):
    # The command of the README (Lightning's plain `ddp`: no search for unused parameters), on the digits.
    two, one = tmp_path / "two", tmp_path / "one"
    dump = [
        "+callbacks.rank_state._target_=tests.helpers_ddp.SaveRankState",
        f"+callbacks.rank_state.dirpath={two}",
    ]
    # with flips (off for the digits by default) and the augmentation at p = 1 from iteration 1
    # (r1_threshold 0, ada_length 1): each image's coin and augmentation come from its global position
    augmenting = ["+data.hflip=true", "model.r1_threshold=0", "model.ada_length=1"]
    # one more generated image per Frechet distance than the 297 held-out digits: a warning about the
    # config, which every rank would give alike (below)
    evaluating = ["eval.num_samples=298", "eval.batch_size=150"]  # in batches of 150, not the smoke's 4
    ddp = [
        "debug=smoke",
        *augmenting,
        *evaluating,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        *dump,
    ]
    result = run_cli(ddp, two, own_process=True)  # Lightning starts the command again for rank 1
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = (two / ".hydra" / "launches").iterdir()  # one record: the process it started logs beside it
    logs = {"train.log", "train_ddp_process_1.log"}
    assert {p.name for p in record.iterdir()} == {"config.yaml", "hydra.yaml", "overrides.yaml", *logs}
    # rank 1 prints to rank 0's console, but not rank 0's lines again: its own are in its log
    assert result.stdout.count("launched with") == result.stdout.count("finished at") == 1
    assert "launched with" in (record / "train_ddp_process_1.log").read_text()
    # a warning about the config, which every rank would give alike, is given once: rank 0's
    assert result.stdout.count("the held-out real images (297, data.held_out) are fewer than the") == 1
    rank0, rank1 = _load(two / "rank0.pt"), _load(two / "rank1.pt")
    assert_same_weights(rank0["state_dict"], rank1["state_dict"], tol=0)  # the ranks agree exactly
    ddp = _load(two / "checkpoints" / "last.ckpt")
    assert int(ddp["state_dict"]["iteration"]) == 4

    # One process with the same global batch (2 devices x 2 images per half), in-process.
    single = ["debug=smoke", *augmenting, *evaluating, "data.batch_size=4"]
    summary = train(compose(single, run_dir=str(one)))
    assert summary["finished"]
    single = _load(one / "checkpoints" / "last.ckpt")
    assert float(single["state_dict"]["aug_p"]) == float(ddp["state_dict"]["aug_p"]) == 1  # it augmented
    # Same examples with the same noise: equal up to float rounding (the gradient all-reduce sums in
    # another order than one process's batch reduction)
    assert_same_weights(ddp["state_dict"], single["state_dict"], tol=1e-4)
    # and the losses logged are the global batch's, as one process logs them (they were rank 0's shard's:
    # loss_d 3.1 against 12.4 at iteration 1)
    for key, rel in {"train/loss_ct": 1e-4, "train/loss_adv": 1e-4, "train/loss_d": 1e-3}.items():
        a, b = _logged(two, key), _logged(one, key)
        assert len(a) == len(b) == 4 and a == pytest.approx(b, rel=rel), key
    # The metric (sampled by both ranks, reduced across them) is one process's, at every evaluation.
    a = json.loads((two / "metric_summary.json").read_text())
    b = json.loads((one / "metric_summary.json").read_text())
    assert [h["iteration"] for h in a["history"]] == [h["iteration"] for h in b["history"]] == [0, 4]
    for x, y in zip(a["history"], b["history"]):
        assert x["value"] == pytest.approx(y["value"], rel=1e-4)
    for name in ("real", "noise"):
        assert a["references"][name] == pytest.approx(b["references"][name], rel=1e-6)


def _logged(run_dir, key: str) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


@pytest.mark.parametrize(
    "augmenting",
    [
        [],
        # the augmentation at p = 1 from iteration 1 (r1_threshold 0, ada_length 1): its random numbers are
        # drawn per example of the global batch, not per micro-batch; two iterations, as at the third (an
        # R1 iteration on heavily augmented reals) D's weights jump from ~1 to ~40 and rounding with them
        ["model.r1_threshold=0", "model.ada_length=1", "iterations=2"],
    ],
    ids=["idle", "augmenting"],
)
def test_gradient_accumulation_over_two_micro_batches_equals_one_batch_of_twice_the_size(
    tmp_path, augmenting
):
    common = [
        "debug=smoke",
        "data=synthetic",
        "iterations=3",
        "eval=null",
        "callbacks.samples.every_n_iterations=100",
        *augmenting,
    ]
    train(compose([*common, "data.batch_size=8"], run_dir=str(tmp_path / "whole")))
    train(
        compose([*common, "data.batch_size=4", "data.global_batch_size=8"], run_dir=str(tmp_path / "micro"))
    )
    whole = _load(tmp_path / "whole" / "checkpoints" / "last.ckpt")["state_dict"]
    micro = _load(tmp_path / "micro" / "checkpoints" / "last.ckpt")["state_dict"]
    # The generator moves ~3e-4 in these 3 iterations and agrees to rounding; the discriminator moves
    # ~0.6 under the smoke size's large R1 gradients (double backward), where rounding reaches ~1e-3, as
    # it does in the R1 statistic's average (r1_ema; from r1_threshold=0 it starts at 0, not 1e9, where a
    # float32 hid the difference)
    assert float(whole.pop("r1_ema")) == pytest.approx(float(micro.pop("r1_ema")), rel=1e-3)
    assert_same_weights(whole, micro, tol=1e-6, tol_discriminator=2e-3)
    # D's losses follow D's weights, so they carry the same rounding (1e-3 here, at loss_d ~ 20)
    tolerances = {"train/loss_ct": 1e-4, "train/loss_adv": 1e-4, "train/loss_d": 1e-3, "train/r1": 1e-3}
    for key, rel in tolerances.items():  # R1 saw the same batch too
        a, b = _logged(tmp_path / "whole", key), _logged(tmp_path / "micro", key)
        assert len(a) == len(b) > 0 and a == pytest.approx(b, rel=rel), key
    # and a different global batch trains something else: the comparison above can fail
    train(compose([*common, "data.batch_size=4"], run_dir=str(tmp_path / "half")))
    half = _load(tmp_path / "half" / "checkpoints" / "last.ckpt")["state_dict"]
    for prefix, far in (("generator.", 1e-5), ("discriminator.", 2e-2)):
        assert max((half[k] - whole[k]).abs().max().item() for k in whole if k.startswith(prefix)) > far


@pytest.mark.parametrize(
    "global_batch, micro, devices, per_device, steps",
    [
        (640, 80, 1, 640, 8),
        (640, 80, 2, 320, 4),
        (640, 80, 4, 160, 2),
        (640, 80, 8, 80, 1),
        (64, 80, 2, 32, 1),
    ],
)
def test_the_global_batch_on_any_number_of_devices(global_batch, micro, devices, per_device, steps):
    # LSUN Cat's reference batch (8 GPUs x 80) on 1, 2, 4 or 8 devices
    dm = SyntheticDataModule(batch_size=micro, global_batch_size=global_batch, image_size=8, channels=1)
    assert dm.batch_layout(devices) == (per_device, steps)


def test_a_global_batch_the_devices_cannot_share_is_refused_by_name():
    dm = SyntheticDataModule(batch_size=80, global_batch_size=640, image_size=8, channels=1)
    with pytest.raises(ValueError, match=r"data.global_batch_size=640 .* cannot be shared by 3 devices"):
        dm.batch_layout(3)
    dm = SyntheticDataModule(batch_size=48, global_batch_size=640, image_size=8, channels=1)
    with pytest.raises(ValueError, match=r"micro-batches of data.batch_size=48 do not divide"):
        dm.batch_layout(2)


def test_a_torchrun_worker_without_a_named_run_folder_is_refused(tmp_path):
    # workers a second apart named two folders from their clocks: one left empty, and rank 1 logged
    # "outputs in" it. The README's command names the folder (hydra.run.dir)
    env = {**COMMAND_ENV, "TORCHELASTIC_RUN_ID": "test"}
    result = run_module("train", ["debug=smoke", "data=synthetic", "iterations=1"], cwd=tmp_path, env=env)
    assert "give it with hydra.run.dir=FOLDER (README: torchrun)" in refusal(result)


@pytest.mark.slow
def test_torchrun_starts_each_rank_and_the_console_and_record_are_rank_0s(tmp_path):
    """The README's torchrun command, shortened: two CPU workers (torchrun starts every rank, Lightning
    reads its environment). With --local-ranks-filter 0 the console shows rank 0's lines once, --tee keeps
    every worker's output in --log-dir, and the run folder holds one launch record, rank 0's."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    torchrun = Path(sys.executable).parent / "torchrun"  # the console script torch installs
    args = ["--standalone", "--nproc-per-node", "2", "--local-ranks-filter", "0", "--tee", "3"]
    args += ["--log-dir", str(logs), "-m", "act_lightning.train", "debug=smoke", "data=synthetic"]
    args += ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", f"hydra.run.dir={run}"]
    result = run_module(torchrun, args, env=COMMAND_ENV, own_process=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("launched with") == result.stdout.count("finished at") == 1
    (record,) = (run / ".hydra" / "launches").iterdir()
    assert {p.name for p in record.iterdir()} == {"config.yaml", "hydra.yaml", "overrides.yaml", "train.log"}
    outputs = {p.parent.name: p.read_text() for p in logs.glob("*/attempt_0/*/stdout.log")}
    assert set(outputs) == {"0", "1"} and all("launched with" in text for text in outputs.values())
    assert int(_load(run / "checkpoints" / "last.ckpt")["state_dict"]["iteration"]) == 4
