"""act_lightning.resume: which differences between a launch's config and its checkpoint's refuse a resume,
and how they are named."""

from __future__ import annotations

import os
from functools import partial

import pytest
import torch
from omegaconf import OmegaConf

from act_lightning.resume import (
    ABSENT,
    GLOBAL_BATCH,
    MAY_CHANGE,
    check_resume,
    compare,
    covered,
    differences,
    global_batch,
    has_key,
    referenced,
    refused,
    set_foreach,
    set_learning_rates,
    what_to_do,
    world_size,
)
from tests.conftest import compose

BASE = ["debug=smoke", "data=synthetic"]


def _configs(overrides: list[str], run_dir: str = "/tmp/act-run") -> tuple[dict, dict]:
    cfg = compose([*BASE, *overrides], run_dir=run_dir)
    return OmegaConf.to_container(cfg, resolve=True), OmegaConf.to_container(cfg, resolve=False)


def _check(saved: list[str], launch: list[str], **checkpoint) -> dict:
    old, _ = _configs(saved)
    new, raw = _configs(launch, run_dir="/tmp/act-other")
    checkpoint = {"act_config": old, **checkpoint}
    return check_resume(checkpoint, new, raw, "resume=auto found last.ckpt (iteration 423)", "start anew")


def test_a_changed_training_key_is_refused_with_both_values_and_the_switch_that_allows_it():
    with pytest.raises(ValueError) as refused:
        _check(["model.schedule.gan_ratio=0.3"], ["model.schedule.gan_ratio=0.5"])
    assert str(refused.value).startswith(
        "resume=auto found last.ckpt (iteration 423) was trained with another config: "
        "model.schedule.gan_ratio=0.3 (now 0.5). "
    )
    assert "resume_changes=[model.schedule.gan_ratio]" in str(refused.value)
    allowed = ["model.schedule.gan_ratio=0.5", "resume_changes=[model.schedule.gan_ratio]"]
    assert _check(["model.schedule.gan_ratio=0.3"], allowed) == {"model.schedule.gan_ratio": [0.3, 0.5]}


def test_iterations_and_the_seed_are_named_once_not_with_every_key_that_repeats_them():
    with pytest.raises(ValueError, match=r"another config: iterations=2000 \(now 300\)\. ") as refused:
        _check(["iterations=2000"], ["iterations=300"])
    assert "model.iterations" not in str(refused.value)  # ${iterations}: the same change
    with pytest.raises(ValueError, match=r"another config: seed=0 \(now 3\)\. ") as refused:
        _check([], ["seed=3"])
    assert "model.seed" not in str(refused.value) and "data.seed" not in str(refused.value)
    assert _check(["iterations=300"], ["iterations=600", "resume_changes=[iterations]"]) == {
        "iterations": [300, 600]
    }


def test_observation_and_placement_may_change():
    changed = [
        "logger=tensorboard",
        "threads=1",
        "stop_after=5",
        "eval.every=2",
        "eval.batch_size=4",
        "callbacks.checkpoint.every_n_iterations=1",
        "callbacks.checkpoint.keep_snapshots=true",
        "callbacks.samples.num_samples=9",
        "guard.max_bad_iterations=3",
        "trainer.log_every_n_steps=7",
        "model.speed.channels_last=false",
        "model.speed.gradient_checkpointing=true",
        "model.speed.lpips_checkpointing=true",
        "model.optimizer.foreach=false",  # how the update runs: set_foreach puts the launch's in
        "model.d_optimizer.foreach=false",
        "data.num_workers=2",
        "model.lpips_weights=/weights/vgg16.pth",
    ]
    assert _check([], changed) == {}  # run_dir differs too (/tmp/act-run -> /tmp/act-other)


def test_what_the_evaluation_measures_and_how_the_run_computes_may_not():
    for override in (
        "eval.num_samples=16",
        "eval.reference=/elsewhere/stats.npz",  # another ruler: the history and best compare values
        "eval.features=inception",
        "eval.quantize=truncate",
        "trainer.precision=bf16-mixed",
        "model.speed.bf16_target=true",  # the speed options that change the numerics (LPIPS's: below)
        "tf32=false",
        "model.distance=l2",
    ):
        with pytest.raises(ValueError, match=f"another config: {override.split('=')[0]}="):
            _check([], [override])


def test_devices_may_change_when_the_global_batch_stays():
    assert world_size({"devices": 3, "num_nodes": 2}) == 6
    assert world_size({"devices": "0,1", "accelerator": "gpu"}) == 2
    assert world_size({"devices": [0, 1, 2]}) == 3
    assert world_size({"devices": "auto", "accelerator": "cpu"}) == 1
    old, _ = _configs(["data.batch_size=4"])
    two, raw = _configs(["trainer.devices=2", "trainer.accelerator=cpu", "data.global_batch_size=4"])
    assert global_batch(old, 1) == 4 and global_batch(two, 2) == 4
    assert compare(old, two, raw, weights_only=False, saved_world=1) == {}
    doubled, raw = _configs(["trainer.devices=2", "trainer.accelerator=cpu", "data.batch_size=4"])
    assert compare(old, doubled, raw, weights_only=False, saved_world=1) == {GLOBAL_BATCH: (4, 8)}
    with pytest.raises(ValueError, match=r"the global batch of 4 images per half-batch \(now 8; "):
        _check(["data.batch_size=4"], ["trainer.devices=2", "trainer.accelerator=cpu", "data.batch_size=4"])


def test_another_experiment_is_named_without_offering_resume_changes_for_it():
    with pytest.raises(ValueError) as refused:
        _check([], ["experiment=cifar10"])
    message = str(refused.value)
    assert "model.generator.block_out_channels=" in message and "more" in message
    assert "resume_changes" not in message and message.endswith("or start anew")


def test_resume_changes_names_unknown_keys_and_refuses_keys_no_resume_can_change():
    with pytest.raises(ValueError, match="resume_changes lists model.schedule.gan_rato: not a key"):
        _check([], ["resume_changes=[model.schedule.gan_rato]"])
    bare = (
        r"resume_changes is a list of names in brackets, e.g. resume_changes=\[iterations\]; got 'iterations'"
    )
    with pytest.raises(ValueError, match=bare):  # Hydra reads a bare word as a string, not a list
        _check([], ["iterations=8", "resume_changes=iterations"])
    _check([], ["iterations=8", "resume_changes=[iterations]"])
    # the restored optimiser state keeps its own betas (and moments); the weights their shapes
    for change in ("model.optimizer.betas=[0.9,0.99]", "model.generator.channel_divisor=4"):
        key = change.split("=")[0]
        with pytest.raises(ValueError, match=f"{key} cannot change on resume .*: resume with the checkpoint"):
            _check([], [change, f"resume_changes=[{key}]"])
    # but the learning rates can, when named (set_learning_rates puts them into the restored state)
    model = _configs([])[0]["model"]  # the smoke runs' rates (2e-4)
    with pytest.raises(ValueError, match=r"model.optimizer.lr=0.0002 \(now 1e-05\).*resume_changes=\[model"):
        _check([], ["model.optimizer.lr=1e-5"])
    lower = ["model.optimizer.lr=1e-5", "model.d_optimizer.lr=2e-5"]
    assert _check([], [*lower, "resume_changes=[model.optimizer.lr,model.d_optimizer.lr]"]) == {
        "model.d_optimizer.lr": [model["d_optimizer"]["lr"], 2e-5],
        "model.optimizer.lr": [model["optimizer"]["lr"], 1e-5],
    }


def test_a_weights_only_checkpoint_must_match_the_networks_only():
    assert _check([], ["model.schedule.gan_ratio=0.1", "iterations=99"], act_weights_only=True) == {}
    with pytest.raises(
        ValueError, match=r"holds networks of another shape: model.generator.channel_divisor=8"
    ):
        _check([], ["model.generator.channel_divisor=4"], act_weights_only=True)


def test_a_weights_only_checkpoint_compares_the_discriminator_only_when_it_trains():
    """A run without the discriminator (gan_ratio 0) builds none, so a weights-only checkpoint's
    discriminator of another shape is no obstacle; with it, it is refused by name."""
    other = "model.discriminator.channel_divisor=4"
    assert _check([], ["model.schedule.gan_ratio=0", other], act_weights_only=True) == {}
    with pytest.raises(ValueError, match="holds networks of another shape: model.discriminator.channel"):
        _check([], [other], act_weights_only=True)


def test_the_devices_of_the_runs_last_launch_give_its_global_batch():
    """The run's history keeps each launch's world size: the last launch's (one device of 4 images)
    is the global batch a launch on one device continues, not the first launch's (two devices)."""
    one = ["data.batch_size=4"]
    history = [{"world_size": 2}, {"world_size": 1}]
    assert _check(one, one, act_history=history) == {}
    with pytest.raises(ValueError, match=r"the global batch of 8 images per half-batch \(now 4; "):
        _check(one, one, act_history=history[:1])


def test_keys_the_checkpoint_predates_take_the_launchs_values():
    old, _ = _configs([])
    del old["model"]["schedule"]["loss_weighting"]  # written before the option existed
    new, raw = _configs(["model.schedule.loss_weighting=ict"])
    assert compare(old, new, raw, weights_only=False, saved_world=None) == {}
    assert differences({"a": {"b": 1}}, {"a": None}) == {"a": ({"b": 1}, None)}


def test_a_key_the_command_line_adds_is_compared_as_a_change_not_taken_as_predated():
    """`+data.limit=3` on a continuation: the checkpoint's config lacks the key because the launch adds it,
    not because an earlier version wrote it; it trained on without a word (and rewrote the run's config)."""
    old, _ = _configs([])
    launch = ["+data.limit=3", "+trainer.limit_train_batches=3"]
    new, raw = _configs(launch)
    checkpoint = {"act_config": old}
    with pytest.raises(ValueError) as refused:
        check_resume(checkpoint, new, raw, "last.ckpt", "start anew", overrides=launch)
    assert (
        "another config: data.limit=<not set> (now 3), trainer.limit_train_batches=<not set> (now 3)"
        in str(refused.value)
    )
    assert check_resume(checkpoint, new, raw, "last.ckpt", "start anew", overrides=[]) == {}  # predated
    allowed = [*launch, "resume_changes=[data.limit,trainer.limit_train_batches]"]
    new, raw = _configs(allowed)
    changes = check_resume(checkpoint, new, raw, "last.ckpt", "start anew", overrides=allowed)
    assert changes == {
        "data.limit": [None, 3],
        "trainer.limit_train_batches": [None, 3],
    }  # kept as plain data


def test_refused_values_are_written_as_the_command_line_writes_them():
    changes = {"tf32": (True, False), "data.num_classes": (None, 10), "data.root": ("x", "y")}
    assert refused(changes) == "tf32=true (now false), data.num_classes=null (now 10), data.root=x (now y)"


def test_every_key_that_may_change_exists_in_the_config():
    config = OmegaConf.to_container(compose(["experiment=cifar10", "logger=wandb"]))
    assert [key for key in MAY_CHANGE if not has_key(config, key)] == []


def test_the_advice_offers_resume_changes_for_up_to_six_keys_and_its_own_config_beyond():
    six = {f"model.k{i}": (0, 1) for i in range(6)}
    advice = what_to_do(six, [], "start anew")
    assert advice.startswith("Resume with the checkpoint's values, change them deliberately with ")
    assert "resume_changes=[model.k0,model.k1,model.k2,model.k3,model.k4,model.k5]" in advice
    assert (
        what_to_do({**six, "model.k6": (0, 1)}, [], "start anew")
        == "Resume it with its own config, or start anew"
    )
    fixed = what_to_do(six, ["model.generator.channels"], "start anew")
    assert fixed.startswith("model.generator.channels cannot change on resume")


def test_how_the_model_is_sampled_where_data_come_from_and_the_nodes_may_change():
    assert _check([], ["two_step_tau=0.5"]) == {}
    old, _ = _configs([])
    new, raw = _configs([])
    old["data"]["download"], new["data"]["download"] = False, True  # a data set that downloads
    assert compare(old, new, raw, weights_only=False, saved_world=1) == {}
    # another number of nodes keeps the global batch that data.global_batch_size names
    nodes = ["trainer.num_nodes=2", "trainer.accelerator=cpu", "data.global_batch_size=4"]
    assert _check(["data.global_batch_size=4"], nodes) == {}


def test_a_weights_only_checkpoint_must_match_the_number_of_classes():
    with pytest.raises(
        ValueError, match=r"holds networks of another shape: data.num_classes=null \(now 10\)"
    ):
        _check([], ["data.num_classes=10"], act_weights_only=True)


def test_a_key_only_one_side_has_is_a_difference_and_is_shown_as_not_set():
    assert differences({"a": 1, "b": 2}, {"b": 2}) == {"a": (1, ABSENT)}
    assert differences({"b": 2}, {"b": 2, "c": 3}) == {"c": (ABSENT, 3)}
    assert refused({"a": (1, ABSENT)}) == "a=1 (now <not set>)"


def test_a_pattern_covers_its_own_key_and_those_under_it_not_a_longer_name():
    assert covered("model.speed", ["model.speed"]) and covered("model.speed.bf16_lpips", ["model.speed"])
    assert not covered("model.speedup", ["model.speed"])
    assert not covered("model", ["model.speed"])


def test_devices_named_by_strings_and_invalid_counts():
    assert world_size({"devices": "2", "accelerator": "cpu"}) == 2
    assert world_size({"devices": "-1", "accelerator": "cpu"}) == world_size(
        {"devices": -1, "accelerator": "cpu"}
    )
    assert world_size({"devices": -1, "accelerator": "cpu", "num_nodes": 2}) == 2 * os.cpu_count()
    assert world_size({"devices": 0, "accelerator": "cpu"}) is None
    assert world_size({"devices": "x", "accelerator": "cpu"}) is None


def test_values_are_shown_as_json_and_cut_after_sixty_characters():
    assert refused({"k": ([1, "a", True], {"b": None})}) == 'k=[1, "a", true] (now {"b": null})'
    long = "x" * 70
    assert refused({"k": (long, "y")}) == f"k={'x' * 57}... (now y)"
    assert refused({"k": ("x" * 60, "y")}) == f"k={'x' * 60} (now y)"


def test_a_key_under_an_interpolated_node_repeats_the_key_under_its_target():
    raw = {"callbacks": {"eval": "${eval}"}, "model": {"iterations": "${iterations}", "lr": 1}}
    assert referenced(raw, "callbacks.eval.every") == "eval.every"
    assert referenced(raw, "model.iterations") == "iterations"
    assert referenced(raw, "model.lr") is None and referenced(raw, "model.other") is None


def test_a_repeating_key_that_differs_on_its_own_is_still_refused():
    """model.iterations (${iterations} in the launch) set apart in the checkpoint's run: only its
    own difference names it, not a difference of iterations."""
    old, _ = _configs(["model.iterations=500"])
    new, raw = _configs([])
    assert old["iterations"] == new["iterations"] != 500
    assert compare(old, new, raw, weights_only=False, saved_world=1) == {
        "model.iterations": (500, new["iterations"])
    }


def test_an_unknown_global_batch_of_either_run_is_not_compared():
    old, _ = _configs([])
    new, raw = _configs([])
    del old["data"]["batch_size"]  # written before the key existed: its global batch is unknown
    assert global_batch(old, 1) is None
    assert compare(old, new, raw, weights_only=False, saved_world=1) == {}


def test_resume_changes_may_name_a_key_only_the_launch_has_and_a_key_allows_those_under_it():
    old, _ = _configs([])
    del old["model"]["schedule"]["loss_weighting"]
    new, raw = _configs(["resume_changes=[model.schedule.loss_weighting]"])
    assert check_resume({"act_config": old}, new, raw, "ckpt", "start anew") == {}
    # a key allows every key under it, and each such change is returned
    changes = ["model.schedule.gan_ratio=0.5", "resume_changes=[model.schedule]"]
    assert _check(["model.schedule.gan_ratio=0.3"], changes) == {"model.schedule.gan_ratio": [0.3, 0.5]}


def test_a_checkpoint_not_written_by_training_has_nothing_to_compare():
    new, raw = _configs(["seed=3"])
    assert check_resume({"state_dict": {}}, new, raw, "ckpt_path=x.ckpt", "start anew") == {}


def test_the_global_batch_may_be_allowed_by_name_where_no_data_config_has_the_key():
    old, _ = _configs(["data.batch_size=4"])
    new, raw = _configs(["data.batch_size=8", "resume_changes=[data.global_batch_size]"])
    del old["data"]["global_batch_size"], new["data"]["global_batch_size"]  # a data module without it
    assert check_resume({"act_config": old}, new, raw, "ckpt", "start anew") == {GLOBAL_BATCH: [4, 8]}


def test_lpips_precision_is_compared_only_where_the_loss_has_lpips():
    lpips, huber = ["model.distance=lpips"], ["model.distance=pseudo_huber"]
    assert _check(huber, [*huber, "model.speed.bf16_lpips=true"]) == {}  # it changes nothing there
    with pytest.raises(ValueError, match="another config: model.speed.bf16_lpips=false"):
        _check(lpips, [*lpips, "model.speed.bf16_lpips=true"])
    with pytest.raises(ValueError, match="model.distance=pseudo_huber"):  # to LPIPS: both are named
        _check(huber, [*lpips, "model.speed.bf16_lpips=true"])


def test_a_change_of_r1_interval_is_said_to_change_the_discriminators_beta2():
    with pytest.raises(ValueError, match=r"betas follows model.r1_interval: lazy R1 corrects D's beta2"):
        _check([], ["model.r1_interval=4", "resume_changes=[model.r1_interval]"])


def test_inception_weights_may_move_but_not_turn_random_or_real():
    moved = _check(
        ["eval.inception_weights=/a/pt_inception.pth"], ["eval.inception_weights=/b/pt_inception.pth"]
    )
    assert moved == {}  # the same network elsewhere
    for saved, launch in (("random", "/b/pt_inception.pth"), ("/a/pt_inception.pth", "random")):
        with pytest.raises(ValueError, match="another config: eval.inception_weights="):
            _check([f"eval.inception_weights={saved}"], [f"eval.inception_weights={launch}"])


def test_set_foreach_puts_the_launchs_into_restored_optimisers():
    g, d = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    saved = [torch.optim.RAdam(net.parameters(), lr=1e-4, foreach=False) for net in (g, d)]
    for optimizer in saved:
        optimizer.step()
    launch = [partial(torch.optim.RAdam, lr=1e-4, foreach=True)] * 2
    restored = [make(net.parameters()) for make, net in zip(launch, (g, d))]
    for new, old in zip(restored, saved):
        new.load_state_dict(old.state_dict())
    assert [o.param_groups[0]["foreach"] for o in restored] == [False, False]  # the saved run's came back
    set_foreach(restored, launch, [g, d])
    assert [o.param_groups[0]["foreach"] for o in restored] == [True, True]
    set_foreach(restored[0], launch, [g, d])  # G's alone (gan_ratio 0), as optimizers() gives it
    assert restored[0].param_groups[0]["foreach"] is True


def test_set_learning_rates_puts_the_launchs_rates_into_restored_state_at_the_warm_ups_factor(caplog):
    net = torch.nn.Linear(2, 2)
    ramp = lambda k: min(1.0, (k + 1) / 10)  # noqa: E731  the module's warm-up, over 10 iterations

    def build(lr: float):
        optimizer = torch.optim.RAdam(net.parameters(), lr=lr)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, ramp)

    optimizer, scheduler = build(1e-3)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    # the continuation builds them at its own rate, then the checkpoint's state brings back 1e-3
    restored, warmup = build(1e-4)
    restored.load_state_dict(optimizer.state_dict())
    warmup.load_state_dict(scheduler.state_dict())
    assert restored.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.4)
    make = partial(torch.optim.RAdam, lr=1e-4)
    with caplog.at_level("INFO", logger="act_lightning.resume"):
        assert set_learning_rates(restored, warmup, [make], [net]) == [(1e-3, 1e-4)]
    # which rate: G's and D's were both logged as "learning rate"
    assert "model.optimizer.lr 0.001 (the checkpoint's) is now 0.0001 (the launch's)" in caplog.text
    assert restored.param_groups[0]["lr"] == pytest.approx(1e-4 * 0.4) == warmup.get_last_lr()[0]
    warmup.step()  # on along the warm-up, from the new base
    assert restored.param_groups[0]["lr"] == pytest.approx(1e-4 * 0.5)
    assert set_learning_rates([restored], [warmup], [make], [net]) == []  # already the launch's
    assert restored.param_groups[0]["lr"] == pytest.approx(1e-4 * 0.5)
