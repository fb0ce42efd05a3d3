"""Every experiment composes and instantiates; configuration errors fail early, naming the key."""

import logging
import os
import re

import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from act_lightning.commands import refusal
from act_lightning.consistency import karras_sigmas
from act_lightning.launch import RankZeroConsole
from act_lightning.resolvers import (
    LAUNCH_ENV,
    RANKS,
    in_folder,
    launch_log,
    launch_name,
    launch_record,
    lazy_regularisation_beta2,
)
from act_lightning.train import check_config
from tests.conftest import CONF, EXPERIMENTS, ROOT, compose


def test_the_four_experiments_exist():
    assert set(EXPERIMENTS) >= {"quickstart", "cifar10", "imagenet64", "lsun_cat256"}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates_in_smoke_size(experiment, tmp_path):
    cfg = compose([f"experiment={experiment}", "debug=smoke", "data=synthetic"], run_dir=str(tmp_path))
    check_config(cfg)
    model = instantiate(cfg.model)
    dm = instantiate(cfg.data)
    assert model.generator is not None
    assert dm.image_size == cfg.data.image_size
    for c in [*cfg.callbacks.values(), cfg.eval, cfg.guard]:
        if c is not None:
            instantiate(c)
    for c in cfg.logger.values():
        instantiate(c, **({"offline": True} if "Wandb" in c._target_ else {}))
    instantiate(cfg.trainer, logger=False)
    dm.setup("fit")
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch.gen.shape == (
        cfg.data.batch_size,
        cfg.data.channels,
        cfg.data.image_size,
        cfg.data.image_size,
    )
    labels = batch.gen_labels if cfg.data.num_classes else None
    x = batch.gen
    out = model.denoise(model.generator, x, torch.full((x.shape[0],), 1.0), labels)
    assert out.shape == x.shape


@pytest.mark.parametrize("experiment", ["cifar10", "imagenet64", "lsun_cat256"])
def test_paper_experiments_carry_the_reference_defaults(experiment, tmp_path):
    cfg = compose([f"experiment={experiment}"], run_dir=str(tmp_path))
    table = {
        "cifar10": dict(
            batch=80,
            K=300_000,
            lr=1e-4,
            bins_max=150,
            mu0=0.9,
            gan_ratio=0.3,
            mid=None,
            thr=1e4,
            precision="32-true",
        ),
        "imagenet64": dict(
            batch=320,
            K=400_000,
            lr=5e-5,
            bins_max=200,
            mu0=0.95,
            gan_ratio=0.6,
            mid=0.2,
            thr=1e7,
            precision="16-mixed",
        ),
        "lsun_cat256": dict(
            batch=640,
            K=800_000,
            lr=5e-5,
            bins_max=150,
            mu0=0.95,
            gan_ratio=0.6,
            mid=0.2,
            thr=1e9,
            precision="16-mixed",
        ),
    }[experiment]
    m = cfg.model
    # the global half-batch is the reference's on any device count that shares it (CIFAR-10: 80 on one GPU;
    # ImageNet 64: 320 on one GPU, in micro-batches of 160 that fit 80 GB; LSUN Cat: 8 GPUs x 80)
    datamodule = instantiate(cfg.data)
    for world in (1, 2, 4, 8):
        per_device, micro_batches = datamodule.batch_layout(world)
        assert per_device * world == table["batch"], world
        assert per_device == micro_batches * min(per_device, cfg.data.batch_size)
    assert cfg.iterations == table["K"]
    assert m.optimizer.lr == table["lr"] and m.d_optimizer.lr == table["lr"]
    assert m.optimizer._target_ == m.d_optimizer._target_ == "torch.optim.RAdam"
    assert list(m.optimizer.betas) == [0.0, 0.99]
    assert m.d_optimizer.betas[1] == pytest.approx(0.99 * 16 / 17)  # the reference's value
    schedule = m.schedule
    assert (schedule.bins_min, schedule.bins_max, schedule.mu0, schedule.gan_ratio) == (
        2,
        table["bins_max"],
        table["mu0"],
        table["gan_ratio"],
    )
    assert schedule.mid_weight == table["mid"]
    assert (m.r1_gamma, m.r1_interval, m.r1_threshold, m.ada_length) == (10.0, 16, table["thr"], 5e5)
    assert m.distance == "lpips" and cfg.trainer.precision == table["precision"]
    assert cfg.model.iterations == table["K"]
    assert cfg.data.hflip  # the reference flips half the images of every data set


@pytest.mark.parametrize(
    "experiment, level",
    [
        ("cifar10", 0.821),  # iCT's, and ECT's --mid_t
        ("cifar10_ict", 0.821),
        ("cifar10_ect", 0.821),
        ("imagenet64", (106, 201)),  # openai/consistency_models' CT: --ts 0,106,200 --steps 201
        ("lsun_cat256", (62, 151)),  # its CT on LSUN Cat 256: --ts 0,62,150 --steps 151
    ],
)
def test_each_experiments_two_step_level_is_its_closest_sources(experiment, level, tmp_path):
    """The ACT reference has no multistep sampler: each experiment's 2-step level is the level its closest
    source samples with, where every experiment took openai/consistency_models' distilled ImageNet 64 one."""
    cfg = compose([f"experiment={experiment}"], run_dir=str(tmp_path))
    if isinstance(level, tuple):  # index i of the source's N Karras levels from sigma_max down
        index, count = level
        level = karras_sigmas(count, 0.002, 80.0, 7.0).flip(0)[index].item()
    assert cfg.two_step_tau == pytest.approx(level, abs=5e-5)


def test_quickstart_is_the_default():
    cfg = compose([])
    assert cfg.experiment_name == "quickstart"
    assert cfg.data._target_.endswith("DigitsDataModule")


def test_unknown_experiment_lists_the_choices():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["experiment=cifar100"])
    message = str(err.value)
    assert "experiment" in message and "cifar100" in message


def test_class_conditional_network_without_labels_is_refused(tmp_path):
    cfg = compose(
        [
            "experiment=imagenet64",
            "debug=smoke",
            "data=synthetic",
            "data.num_classes=null",
            "model.generator.num_class_embeds=1000",
        ],
        run_dir=str(tmp_path),
    )
    with pytest.raises(ValueError, match="model.generator.num_class_embeds=1000"):
        check_config(cfg)


@pytest.mark.parametrize("experiment", ["cifar10", "lsun_cat256", "quickstart"])
def test_labels_make_every_experiments_networks_class_conditional_and_unused_labels_are_refused(
    experiment, tmp_path
):
    """data.num_classes=K (README: a folder's K sub-folders) gives the generator and the discriminator a
    class embedding of K, as ImageNet 64's have; a generator told to ignore the labels is refused by name,
    where it trained unconditionally while the run sampled and recorded labels."""
    labelled = [f"experiment={experiment}", "debug=smoke", "data=synthetic", "data.num_classes=5"]
    cfg = compose(labelled, run_dir=str(tmp_path))
    check_config(cfg)
    assert cfg.model.generator.num_class_embeds == cfg.model.discriminator.num_class_embeds == 5
    model = instantiate(cfg.model)
    assert model.generator.unet.config.num_class_embeds == 5 and model.hparams.num_classes == 5
    assert compose(labelled[:-1], run_dir=str(tmp_path)).model.generator.num_class_embeds is None
    ignored = compose([*labelled, "model.generator.num_class_embeds=null"], run_dir=str(tmp_path))
    with pytest.raises(
        ValueError, match=r"data.num_classes=5 gives every image a label, but model.generator"
    ):
        check_config(ignored)
    for net in ("generator", "discriminator"):  # fewer embeddings than classes: an IndexError in the UNet
        fewer = compose([*labelled, f"model.{net}.num_class_embeds=2"], run_dir=str(tmp_path))
        with pytest.raises(
            ValueError, match=rf"model.{net}.num_class_embeds=2 is fewer than data.num_classes=5"
        ):
            check_config(fewer)


def test_image_size_the_network_cannot_downsample(tmp_path):
    cfg = compose(
        ["experiment=cifar10", "debug=smoke", "data=synthetic", "data.image_size=36"], run_dir=str(tmp_path)
    )
    with pytest.raises(Exception, match="image_size"):
        instantiate(cfg.model)


def test_mismatched_network_and_data_sizes(tmp_path):
    cfg = compose(["debug=smoke", "model.generator.image_size=16"], run_dir=str(tmp_path))
    with pytest.raises(ValueError, match="model.generator.image_size=16 differs from data.image_size=8"):
        check_config(cfg)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "model.discriminator.image_size=16",
            "model.discriminator.image_size=16 differs from data.image_size=8",
        ),
        ("model.generator.in_channels=3", "model.generator.in_channels=3 differs from data.channels=1"),
        (
            "model.discriminator.in_channels=3",
            "model.discriminator.in_channels=3 differs from data.channels=1",
        ),
    ],
)
def test_the_discriminator_and_the_channels_must_match_the_data_too(override, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        check_config(compose(["debug=smoke", override], run_dir=str(tmp_path)))


def test_grey_images_with_cifar10s_generator_are_told_the_two_overrides_that_fit_it(tmp_path):
    """CIFAR-10's generator predicts 6 channels and uses 3 (the released checkpoint's layout): grey images
    (data.channels=1) need its out_channels and used_channels, and the error gives both."""
    grey = ["experiment=cifar10", "debug=smoke", "data=synthetic", "data.channels=1"]
    with pytest.raises(Exception) as refused:
        instantiate(compose(grey, run_dir=str(tmp_path)).model.generator)
    fix = ["model.generator.out_channels=1", "model.generator.used_channels=null"]
    assert str(refusal(refused.value)).endswith(f"with this network give {' '.join(fix)}")
    assert instantiate(compose([*grey, *fix], run_dir=str(tmp_path)).model.generator).in_channels == 1


@pytest.mark.parametrize(
    "override, message",
    [
        ("resume=sometimes", "resume must be one of auto, never; got 'sometimes'"),
        ("callbacks.checkpoint=null", "callbacks.checkpoint=null: a training run always keeps"),
        ("eval.every=0", "eval.every must be an integer >= 1, got 0"),  # before the grid callback reads it
    ],
)
def test_the_resume_mode_the_checkpoint_callback_and_the_evaluation_interval_are_checked_first(
    override, message, tmp_path
):
    with pytest.raises(ValueError, match=message):
        check_config(compose(["debug=smoke", override], run_dir=str(tmp_path)))


@pytest.mark.parametrize(
    "override, instead",
    [
        ("trainer.max_steps=10", "iterations=N (ACT iterations; Lightning counts two steps each)"),
        ("trainer.max_epochs=1", "iterations=N"),
        ("+trainer.max_time=00:01:00:00", "stop_after=N"),
    ],
)
def test_lightnings_own_run_lengths_are_refused_for_iterations_and_stop_after(override, instead, tmp_path):
    """A stop of Lightning's ended the run after a fraction of its iterations (max_steps counts two a
    piece), without its final evaluation, in a folder that no relaunch continued."""
    key, value = override.lstrip("+").split("=")
    with pytest.raises(
        ValueError, match=re.escape(f"{key}={value}: the run's length is not Lightning's; use {instead}")
    ):
        check_config(compose(["debug=smoke", override], run_dir=str(tmp_path)))
    check_config(
        compose(["debug=smoke", "trainer.max_steps=null", "trainer.max_epochs=-1"], run_dir=str(tmp_path))
    )


@pytest.mark.parametrize("precision", ["bf16-true", "16-true", "64-true", "fp8"])
def test_precisions_that_cast_the_weights_are_refused_by_key_before_the_run_starts(precision, tmp_path):
    """They failed with a dtype error at the first pass, after the run folder was written."""
    refused = compose(["debug=smoke", f"trainer.precision={precision}"], run_dir=str(tmp_path))
    with pytest.raises(ValueError, match=rf"trainer.precision={precision}: this library trains in 32-true"):
        check_config(refused)
    for fine in ("32-true", "16-mixed", "bf16-mixed"):
        check_config(compose(["debug=smoke", f"trainer.precision={fine}"], run_dir=str(tmp_path)))


@pytest.mark.parametrize("tau", ["0.002", "20.0", "true"])  # debug=smoke: sigma_max=20
def test_two_step_tau_lies_strictly_between_the_schedules_levels_and_is_a_number(tau, tmp_path):
    with pytest.raises(ValueError, match=rf"two_step_tau={tau.title() if tau == 'true' else tau}: "):
        check_config(compose(["debug=smoke", f"two_step_tau={tau}"], run_dir=str(tmp_path)))
    check_config(compose(["debug=smoke", "two_step_tau=19.9"], run_dir=str(tmp_path)))


@pytest.mark.parametrize("seed", ["abc", "-1", "4294967296", "true", "1.5"])
def test_a_seed_numpy_and_torch_cannot_take_is_refused_by_name(seed, tmp_path):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 4294967295\]"):
        check_config(compose(["debug=smoke", f"seed={seed}"], run_dir=str(tmp_path)))
    check_config(compose(["debug=smoke", "seed=4294967295"], run_dir=str(tmp_path)))


@pytest.mark.parametrize(
    "override", ["data.batch_size=abc", "data.batch_size=7", "data.global_batch_size=2.0"]
)
def test_a_batch_size_is_refused_by_name_before_the_resume_check_reads_it(override, tmp_path):
    with pytest.raises(ValueError, match=rf"{override.split('=')[0]} must be a positive even number"):
        check_config(compose(["debug=smoke", override], run_dir=str(tmp_path)))


def test_a_sigma_max_below_sigma_min_is_refused_as_the_schedules_error_not_two_step_taus(tmp_path):
    """The quickstart's two_step_tau (8.0) lies outside any schedule whose sigma_max is below sigma_min;
    the message must name the schedule's keys, which are what is wrong."""
    cfg = compose(["debug=smoke", "model.schedule.sigma_max=0.001"], run_dir=str(tmp_path))
    check_config(cfg)
    with pytest.raises(Exception, match=r"need 0 < model.schedule.sigma_min < model.schedule.sigma_max"):
        instantiate(cfg.model)


@pytest.mark.parametrize(
    "experiment, reference",
    [
        ("cifar10", "train"),
        ("imagenet64", "VIRTUAL_imagenet64_labeled.npz"),
        ("lsun_cat256", "VIRTUAL_lsun_cat256.npz"),
    ],
)
def test_paper_experiments_track_fid_against_the_published_references(experiment, reference, tmp_path):
    cfg = compose([f"experiment={experiment}"], run_dir=str(tmp_path))
    ev = cfg.eval
    assert (ev.features, ev.key, ev.every, ev.num_samples) == ("inception", "val/fid", 5000, 10000)
    assert ev.reference == "train" if reference == "train" else ev.reference.endswith(f"/{reference}")
    assert ev.inception_weights is None  # the real network: from the hub cache or eval.inception_weights
    assert ev._target_.endswith("FrechetEvaluation") and ev.quantize == "round"
    assert cfg.callbacks.samples.every_n_iterations == ev.every  # a grid at each evaluation
    assert cfg.callbacks.checkpoint.keep_snapshots == 2  # a checkpoint from before a divergence
    assert "WandbLogger" in cfg.logger.wandb._target_ and cfg.logger.csv is not None


def test_quickstart_uses_its_own_features_with_the_same_machinery():
    cfg = compose([])
    assert cfg.eval.features == "digits" and cfg.eval.key == "val/fd"
    assert cfg.eval._target_.endswith("FrechetEvaluation") and cfg.eval.every == 200


# -- every file in conf/ is composed and instantiated by some case below ---------------------------------

GROUP_CASES = {  # config file -> the overrides that select it (with what instantiating it needs)
    "data/cifar10.yaml": ["experiment=cifar10", "data=cifar10"],
    "data/digits.yaml": ["data=digits"],
    "data/folder.yaml": ["data=folder", "data.root=/nowhere"],
    "data/imagenet64.yaml": ["experiment=imagenet64", "data=imagenet64"],
    "data/lsun_cat256.yaml": ["experiment=lsun_cat256", "data=lsun_cat256"],
    "data/synthetic.yaml": ["data=synthetic"],
    "logger/csv.yaml": ["logger=csv"],
    "logger/tensorboard.yaml": ["logger=tensorboard"],
    "logger/wandb.yaml": ["logger=wandb"],
    "trainer/default.yaml": ["trainer=default"],
    "trainer/cpu.yaml": ["trainer=cpu"],
    "trainer/gpu.yaml": ["trainer=gpu", "trainer.accelerator=cpu"],  # no GPU here: same Trainer on the CPU
    "trainer/ddp.yaml": ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"],
    "callbacks/default.yaml": ["callbacks=default"],
    "debug/smoke.yaml": ["debug=smoke"],
    "model/act.yaml": ["model=act"],
    "hparams_search/optuna.yaml": ["hparams_search=optuna"],
    "perf/baseline.yaml": ["perf=baseline", "trainer.accelerator=cpu"],
    "hydra/launcher/submitit_slurm.yaml": [
        "hydra/launcher=submitit_slurm",
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
    ],
}
COVERED_ELSEWHERE = {  # composed and instantiated by the tests named here
    "train.yaml": "every case here",
    **{
        f"experiment/{e}.yaml": "test_experiment_composes_and_instantiates_in_smoke_size" for e in EXPERIMENTS
    },
    **{
        f"ablation/{p.stem}.yaml": "test_ablations.py (every job of the sweep)"
        for p in CONF.glob("ablation/*.yaml")
    },
    "hydra/launcher/two_local_jobs.yaml": "test_ablations.py (the ablations' launcher; SLURM's instead)",
    **{
        f"variant/{p.stem}.yaml": "test_ablations.py::test_every_variant_sets_what_it_is_named_for"
        for p in CONF.glob("variant/*.yaml")
    },
    **{
        f"model/{kind}/{name}.yaml": "test_experiment_composes_and_instantiates_in_smoke_size, test_networks"
        for kind in ("generator", "discriminator")
        for name in ("cifar10", "digits", "imagenet64", "lsun_cat256")
    },
}


# The other commands' configs: their mandatory options, as the command line gives them. Their tests
# (test_evaluation.py, test_sample.py, test_edit.py, test_export.py) run each command with its config.
COMMAND_CASES = {
    "evaluate.yaml": ["ckpt=run/checkpoints/best.ckpt"],
    "sample.yaml": ["ckpt=run/checkpoints/best.ckpt"],
    "edit.yaml": ["ckpt=run/checkpoints/best.ckpt", "input=images/"],
    "export.yaml": ["ckpt=run/checkpoints/best.ckpt", "out=exported"],
}


def test_every_config_file_is_covered():
    files = {str(p.relative_to(CONF)) for p in CONF.rglob("*.yaml")}
    assert files == set(GROUP_CASES) | set(COMMAND_CASES) | set(COVERED_ELSEWHERE)


@pytest.mark.parametrize("path", sorted(COMMAND_CASES))
def test_command_config_composes_with_its_mandatory_options(path):
    name = path.removesuffix(".yaml")
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = hydra_compose(name, overrides=COMMAND_CASES[path], return_hydra_config=True)
    help_ = cfg.hydra.help
    assert help_.app_name == f"act_lightning.{name}"
    assert help_.template.startswith(f"python -m act_lightning.{name} ") and "$CONFIG" in help_.template
    assert not cfg.hydra.job.chdir  # relative paths are the user's
    assert not [key for key in cfg if OmegaConf.is_missing(cfg, key)]  # the mandatory options: as listed
    assert "model" not in cfg  # the training options are not this command's


@pytest.mark.parametrize("path", sorted(GROUP_CASES))
def test_config_file_composes_and_instantiates(path, tmp_path):
    overrides = [*GROUP_CASES[path], f"run_dir={tmp_path}"]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    if path.startswith("hydra/launcher"):
        launcher = cfg.hydra.launcher
        assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
        assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0  # requeue, with time to save
        instantiate(launcher)
        return
    if path.startswith("hparams_search"):
        sweeper = cfg.hydra.sweeper
        assert sweeper.direction == "minimize" and "model.schedule.gan_ratio" in sweeper.params
        instantiate(sweeper)
        return
    group = path.split("/")[0]
    nodes = {
        "data": [cfg.data],
        "logger": [c for c in cfg.logger.values() if c is not None],
        "trainer": [cfg.trainer],
        "callbacks": [c for c in cfg.callbacks.values() if c is not None],
        "debug": [cfg.model, cfg.data],
        "model": [cfg.model],
        "perf": [cfg.model, cfg.trainer],
    }[group]
    for node in nodes:
        kwargs = {"offline": True} if "Wandb" in node.get("_target_", "") else {}
        assert instantiate(node, **kwargs) is not None
    if group == "trainer":
        assert cfg.trainer.use_distributed_sampler is False  # the data module shards global batches
    if path == "perf/baseline.yaml":  # every speed option off, the reference's DDP strategy
        assert cfg.trainer.strategy == "ddp_find_unused_parameters_true" and cfg.tf32 is False
        off = ("channels_last", "compile", "fast_attention", "foreach_ema", "joint_d_pass", "lazy_augment")
        assert not any(cfg.model.speed[key] for key in off) and cfg.model.speed.sync_logs
        assert not cfg.model.optimizer.foreach and not cfg.model.d_optimizer.foreach
    if path == "trainer/ddp.yaml":
        assert cfg.trainer.strategy == "ddp"  # Lightning's plain DDP: no unused-parameter search


def test_the_diffusion_start_recipes_carry_edms_and_ects_settings(tmp_path):
    """experiment=cifar10_diffusion is EDM's CIFAR-10 recipe, cifar10_ect ECT's run_ecm.sh, cifar10_ect_act
    the same with ACT's CIFAR-10 discriminator (docs/algorithm.md, section 12)."""
    d = compose(["experiment=cifar10_diffusion"], run_dir=str(tmp_path))
    assert (d.model.objective, d.model.schedule.gan_ratio, d.data.batch_size, d.iterations) == (
        "diffusion",
        0.0,
        512,
        390_625,
    )
    assert d.model.optimizer._target_ == "torch.optim.Adam" and d.model.optimizer.lr == 1e-3
    assert (d.model.sampling_ema, d.model.generator.dropout, d.model.heun_steps) == (0.99929, 0.13, 18)
    assert (d.model.schedule.edm_p_mean, d.model.schedule.edm_p_std) == (-1.2, 1.2)
    e = compose(["experiment=cifar10_ect"], run_dir=str(tmp_path))
    s = e.model.schedule
    assert (e.data.batch_size, e.iterations, e.model.optimizer.lr, list(e.model.optimizer.betas)) == (
        128,
        200_000,
        1e-4,
        [0.9, 0.999],
    )
    assert e.model.optimizer._target_ == "torch.optim.RAdam" and e.model.generator.dropout == 0.2
    assert (s.curriculum, s.teacher, s.loss_weighting, s.gan_ratio) == ("ect", "online", "ict", 0.0)
    assert (s.ect_q, s.ect_k, s.ect_b, s.ect_stages, s.p_mean, s.p_std) == (2.0, 8.0, 1.0, 8, -1.1, 2.0)
    assert (e.model.distance, e.model.pseudo_huber_c, e.model.sampling_ema) == ("pseudo_huber", 0.0, 0.9999)
    assert e.model.shared_dropout and e.model.c_noise == d.model.c_noise == "log"  # init_from checks it
    a = compose(["experiment=cifar10_ect_act"], run_dir=str(tmp_path))
    assert (
        a.model.schedule.gan_ratio == 0.3 and a.model.schedule.curriculum == "ect" and a.iterations == 200_000
    )
    # neither ECT nor EDM flips (their --xflip is false by default), where experiment=cifar10 does
    assert not d.data.hflip and not e.data.hflip and not a.data.hflip


def test_cifar10_on_synthetic_data_composes_without_a_data_folder(tmp_path):
    """The reference cache lives beside the data; synthetic images have no folder, so no cache (this used
    to fail with "Interpolation key 'data.root' not found" unless debug=smoke was given too)."""
    synthetic = compose(["experiment=cifar10", "data=synthetic"], run_dir=str(tmp_path))
    assert OmegaConf.to_container(synthetic.eval, resolve=True)["reference_cache"] is None
    real = compose(["experiment=cifar10", "data.root=/data/cifar10"], run_dir=str(tmp_path))
    assert real.eval.reference_cache == "/data/cifar10/fid_stats_inception_32.npz"


@pytest.mark.parametrize(
    "data", [["data=synthetic"], ["data=folder", "data.root=/data/mine"], ["data=cifar10"]]
)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_resolves_on_every_data_source(experiment, data, tmp_path):
    """`experiment=X data=Y` resolves whole, without debug=smoke: the quickstart's eval.subset_size read
    `data.held_out`, which only the digits have ("Interpolation key 'data.held_out' not found")."""
    cfg = OmegaConf.to_container(
        compose([f"experiment={experiment}", *data], run_dir=str(tmp_path)), resolve=True
    )
    if experiment.startswith("quickstart"):
        assert cfg["eval"]["subset_size"] is None  # no held-out set: one set of eval.num_samples
        assert compose([f"experiment={experiment}"]).eval.subset_size == 297  # the digits' held-out count


def test_adas_quarter_turns_are_one_documented_override_away(tmp_path):
    """docs/algorithm.md: `+model.augment.rotate90_turns=[0,1,2,3]` (model.augment is null by default)."""
    model = instantiate(
        compose(["debug=smoke", "+model.augment.rotate90_turns=[0,1,2,3]"], run_dir=str(tmp_path)).model
    )
    assert model.augment_pipe.rotate90_turns == (0, 1, 2, 3)
    default = instantiate(compose(["debug=smoke"], run_dir=str(tmp_path)).model)
    assert default.augment_pipe.rotate90_turns == (0, 3)


def test_the_resolvers_name_the_launch_once_per_process_tree_and_cache_beside_the_data(monkeypatch):
    assert lazy_regularisation_beta2(0.99, 16) == pytest.approx(0.99 * 16 / 17)
    assert in_folder(None, "stats.npz") is None and in_folder("/data", "stats.npz") == "/data/stats.npz"
    monkeypatch.delenv(LAUNCH_ENV, raising=False)
    name = launch_name()
    assert os.environ[LAUNCH_ENV] == f"{name}@{os.getpid()}" and launch_name() == name
    monkeypatch.setenv(LAUNCH_ENV, f"2026-01-01_10-00-00_000001@{os.getppid()}")  # a DDP process's parent
    assert launch_name() == "2026-01-01_10-00-00_000001"
    monkeypatch.setenv(LAUNCH_ENV, "2026-01-01_10-00-00_000001@1")  # inherited from another launch
    assert launch_name() != "2026-01-01_10-00-00_000001"
    monkeypatch.setenv(LAUNCH_ENV, f"@{os.getpid()}")  # no name
    assert launch_name() != ""


@pytest.mark.parametrize(
    ("ranks", "recorded", "console"),
    [
        ({}, True, True),  # a launch on its own
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}, True, True),  # SLURM's task 0
        ({"SLURM_PROCID": "3", "SLURM_NTASKS": "8"}, False, True),  # another task: its own console only
        ({"RANK": "0", "SLURM_PROCID": "3"}, True, True),  # torchrun inside a SLURM step: its RANK first
        ({"RANK": "2", "LOCAL_RANK": "0"}, False, True),  # a torchrun worker of another node
        ({"NODE_RANK": "1"}, False, True),  # the command started on a second node by hand
        # a DDP process the launch started: the launch's record, and rank 0's console (warnings only)
        ({"LOCAL_RANK": "1", "parent": True}, True, False),
    ],
)
def test_a_launch_keeps_one_record_whatever_starts_its_other_ranks(monkeypatch, ranks, recorded, console):
    for key in (*RANKS, "NODE_RANK", "SLURM_NTASKS", LAUNCH_ENV):
        monkeypatch.delenv(key, raising=False)
    for key, value in ranks.items():
        if key == "parent":
            monkeypatch.setenv(LAUNCH_ENV, f"2026-01-01_10-00-00_000001@{os.getppid()}")
        else:
            monkeypatch.setenv(key, value)
    record = launch_record()
    assert (record is not None) == recorded
    if recorded:
        assert record == f".hydra/launches/{launch_name()}"
        assert launch_log("/runs/a", "train") == f"/runs/a/{record}/train.log"
    else:
        assert launch_log("/runs/a", "train") == os.devnull and LAUNCH_ENV not in os.environ
    if ranks.get("parent"):
        assert record == ".hydra/launches/2026-01-01_10-00-00_000001"
    # Hydra's console handler: rank 0's lines are not printed again by the processes it started
    rank_zero_console = RankZeroConsole()
    info, warning = (
        logging.LogRecord("act", level, __file__, 1, "m", None, None)
        for level in (logging.INFO, logging.WARNING)
    )
    assert rank_zero_console.filter(info) == console and rank_zero_console.filter(warning)
    # the run folder's lock is the first process's alone (a second node's by NODE_RANK took it too)
    from act_lightning.resolvers import is_first_process

    assert is_first_process() == (not ranks or ranks.get("SLURM_PROCID") == "0" or ranks.get("RANK") == "0")


# -- what the README and docs/ name --------------------------------------------------------------------

DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
_SECTIONS = "model|data|trainer|logger|callbacks|eval|guard|paths|hydra"
DOC_KEY = re.compile(rf"(?<![\w./-])(\+?)((?:{_SECTIONS})(?:\.[A-Za-z0-9_]+)+)")
DOC_CHOICE = re.compile(
    r"(?<![\w./-])\+?(experiment|variant|data|model/generator|model/discriminator|trainer|perf|ablation|logger"
    r"|callbacks|debug|hparams_search|hydra/launcher)=([A-Za-z0-9_,]+)"
)
NOT_CONFIG_KEYS = {
    "model.compile": "the old name, which the README says Hydra refuses",
    "model.gan_ratio": "the old name, which the README says Hydra refuses",
    "model.unet": "a key of the reference code's checkpoints",
    "model._discriminator": "a key of the reference code's checkpoints",
    "model.safetensors": "a file export writes",
    "data.HalfBatch": "a class",
    "trainer.global_step": "Lightning's attribute",
    "hydra.yaml": "the file Hydra writes into .hydra/",
}
NOT_SHIPPED_CHOICES = {
    ("experiment", "my_experiment"): "a user's own, in a folder of theirs (README: --config-dir)",
    ("hydra/launcher", "joblib"): "hydra-joblib-launcher's own (the plugin's, in Hydra's config store)",
    ("hydra/launcher", "basic"): "Hydra's own one-job-at-a-time launcher (in its config store)",
}


def _documented(pattern: re.Pattern) -> dict[tuple, set[str]]:
    found: dict[tuple, set[str]] = {}
    for doc in DOCS:
        for match in pattern.finditer(doc.read_text()):
            found.setdefault(match.groups(), set()).add(doc.name)
    return found


def test_every_config_key_the_readme_and_docs_name_exists(tmp_path):
    """A key renamed in conf/ but not in the text would send a user to an override Hydra refuses."""
    overrides = [f"run_dir={tmp_path}", "hydra/launcher=submitit_slurm", "hparams_search=optuna"]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        configs = [
            hydra_compose(
                "train", overrides=[*overrides, f"experiment={experiment}"], return_hydra_config=True
            )
            for experiment in EXPERIMENTS
        ]  # and the joblib launcher's keys, through the ablations' option of it
        local = [f"run_dir={tmp_path}", "hydra/launcher=two_local_jobs"]
        configs.append(hydra_compose("train", overrides=local, return_hydra_config=True))
    found = _documented(DOC_KEY)
    assert len(found) > 80  # the pattern still finds what the text names

    def exists(key: str) -> bool:
        return any(
            OmegaConf.select(cfg, key, default=KeyError, throw_on_missing=False) is not KeyError
            for cfg in configs
        )

    missing = {
        key: sorted(docs)
        for (plus, key), docs in found.items()
        if key not in NOT_CONFIG_KEYS and not exists(key.rpartition(".")[0] if plus else key)
    }
    assert not missing, f"named in the text but in no composed config: {missing}"
    assert not [key for key in NOT_CONFIG_KEYS if exists(key)]  # an exception that has become a key


def test_every_config_choice_the_readme_and_docs_name_exists():
    found = _documented(DOC_CHOICE)
    assert len(found) > 25
    missing = {
        f"{group}={choice}": sorted(docs)
        for (group, choices), docs in found.items()
        for choice in choices.split(",")
        if not choice.isupper()  # a placeholder, DIR
        and (group, choice) not in NOT_SHIPPED_CHOICES
        and not (CONF / group / f"{choice}.yaml").exists()
    }
    assert not missing, f"named in the text but no config file: {missing}"
