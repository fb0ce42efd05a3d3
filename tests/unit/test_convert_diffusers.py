"""`python -m act_lightning.convert_diffusers DIR OUT`: a diffusers DDPM (epsilon UNet2DModel +
DDPMScheduler) as init_from's generator, act_lightning.nn.vp.VPEpsilonBackbone (docs/algorithm.md,
section 12). The converted backbone under EDM's preconditioning (sigma_min = 0) must compute the DDPM's
own denoiser x - sigma eps(x / sqrt(1 + sigma^2), t(sigma)), checked against the original UNet."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from hydra.utils import instantiate
from omegaconf import OmegaConf

from act_lightning.convert_diffusers import check_scheduler, check_unet, convert, public, read_json
from act_lightning.init_from import load_init, read_init
from act_lightning.nn.precond import consistency_function
from act_lightning.nn.vp import VPEpsilonBackbone
from act_lightning.train import check_config, train
from tests.conftest import compose, refusal, run_cli, run_module

SD = 0.5


def make_unet(
    channels: int = 3, sample_size: int = 8, out_channels: int | None = None, **extra
) -> UNet2DModel:
    """A small random UNet of google/ddpm-cifar10-32's structure (its time embedding included), its
    weights perturbed so that no layer is left at a trivial initialisation, and its time embedding
    amplified so that eps depends clearly on fractions of a timestep."""
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=out_channels or channels,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        flip_sin_to_cos=False,
        freq_shift=1,
        **extra,
    )
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
        unet.time_embedding.linear_1.weight.mul_(10)
    return unet.eval()


def make_scheduler(cls=DDPMScheduler, **extra):
    return cls(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, **extra)


def save_ddpm(root, unet, scheduler, layout: str = "pipeline"):
    """A diffusers DDPM folder: unet/ + scheduler/ (a pipeline's layout) or both at the top (the Hub's
    google/ddpm-cifar10-32)."""
    top = layout == "top"
    unet.save_pretrained(root if top else root / "unet")
    scheduler.save_pretrained(root if top else root / "scheduler")
    return root


def load_backbone(out, kind: str, sigma_data: float = SD):
    """The converted backbone as Hydra builds it from the file's config, with the run's model keys."""
    checkpoint = torch.load(out, weights_only=True)
    cfg = OmegaConf.create(
        {"model": {"sigma_data": sigma_data, "c_noise": kind}, "g": checkpoint["act_generator"]}
    )
    backbone = instantiate(cfg.g)
    prefix = "generator."
    assert all(k.startswith(prefix + "unet.") for k in checkpoint["state_dict"])
    backbone.load_state_dict({k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items()})
    return backbone.eval(), checkpoint


def table_log_sigmas(scheduler) -> np.ndarray:
    abar = scheduler.alphas_cumprod.double().numpy()
    return 0.5 * np.log((1 - abar) / abar)


def ddpm_denoiser(unet, x: torch.Tensor, sigma: float, t) -> torch.Tensor:
    """The DDPM's own denoiser at EDM's x = y + sigma n: x - sigma eps(x / sqrt(1 + sigma^2), t)."""
    with torch.no_grad():
        eps = unet(x / math.sqrt(1 + sigma**2), t, return_dict=False)[0]
    return x - sigma * eps


def converted_denoiser(backbone, x: torch.Tensor, sigma: float, kind: str, sigma_data: float = SD):
    with torch.no_grad():
        return consistency_function(
            backbone, x, torch.tensor(sigma), sigma_min=0.0, sigma_data=sigma_data, c_noise_kind=kind
        )


def noisy(channels: int, sigma: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(2, channels, 8, 8, generator=g) * 2 - 1
    return y + sigma * torch.randn(2, channels, 8, 8, generator=g)


def assert_denoiser(actual, expected, sigma: float):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * (1 + sigma))


# -- the conversion computes the DDPM's denoiser ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["identity", "log"])
@pytest.mark.parametrize("layout,channels", [("pipeline", 3), ("top", 1)])
def test_the_converted_backbone_is_the_ddpms_denoiser(tmp_path, kind, layout, channels):
    unet, scheduler = make_unet(channels), make_scheduler()
    out = tmp_path / "ddpm.ckpt"
    summary = convert(save_ddpm(tmp_path / "ddpm", unet, scheduler, layout), out)
    assert summary["tensors"] == len(unet.state_dict()) and summary["out"] == str(out)
    backbone, checkpoint = load_backbone(out, kind)
    generator = checkpoint["act_generator"]
    assert generator["_target_"] == "act_lightning.nn.vp.VPEpsilonBackbone"
    assert generator["sigma_data"] == "${model.sigma_data}" and generator["c_noise"] == "${model.c_noise}"
    assert (generator["image_size"], generator["in_channels"]) == (8, channels)  # literal: checked vs data.*
    assert checkpoint["act_converted_from"] == str((tmp_path / "ddpm").resolve())
    (weights,) = (tmp_path / "ddpm").rglob("diffusion_pytorch_model.*")  # which file, by its bytes
    assert checkpoint["act_converted_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert list(backbone.state_dict()) == [f"unet.{k}" for k in unet.state_dict()]  # no buffer saved

    table = table_log_sigmas(scheduler)
    for t in (0, 10, 500, 999):  # on the table: the DDPM's own integer timesteps
        sigma = float(math.exp(table[t]))
        x = noisy(channels, sigma, seed=t)
        expected = ddpm_denoiser(unet, x, sigma, torch.tensor([t, t]))
        assert_denoiser(converted_denoiser(backbone, x, sigma, kind), expected, sigma)

    for sigma in (0.02, 0.7, 3.3, 42.0, 80.0):  # between entries: the index linear in ln sigma
        t = float(np.interp(math.log(sigma), table, np.arange(len(table))))
        assert 0.2 < t - math.floor(t) < 0.8
        x = noisy(channels, sigma, seed=7)
        expected = ddpm_denoiser(unet, x, sigma, torch.tensor([t, t]))
        actual = converted_denoiser(backbone, x, sigma, kind)
        assert_denoiser(actual, expected, sigma)
        # and as eps = (x - D) / sigma, where the timestep shows at every sigma: seen, not rounded
        rounded = ddpm_denoiser(unet, x, sigma, torch.tensor([round(t)] * 2))
        eps, eps_expected, eps_rounded = ((x - d) / sigma for d in (actual, expected, rounded))
        assert (eps - eps_expected).abs().max() < 1e-3 < 1e-2 < (eps_rounded - eps_expected).abs().max()

    # outside the table: its ends (sigma_min 0.002 of the library is below DDPM's sigma_0 = 0.01)
    for sigma, t in ((0.002, 0), (300.0, 999)):
        x = noisy(channels, sigma)
        expected = ddpm_denoiser(unet, x, sigma, torch.tensor([t, t]))
        assert_denoiser(converted_denoiser(backbone, x, sigma, kind), expected, sigma)


@pytest.mark.parametrize(
    "schedule",
    [
        {"beta_schedule": "squaredcos_cap_v2"},
        {"beta_start": 2e-4, "beta_end": 0.03},
        {"variance_type": "learned_range"},
    ],
)
def test_the_schedulers_own_betas_and_a_learned_variance_convert(tmp_path, schedule):
    """The folder's scheduler decides the noise levels (a cosine schedule, other linear betas), and a UNet of
    learned variance (2C outputs: eps, then the variance) converts to the denoiser of its eps."""
    learned = "variance_type" in schedule
    unet = make_unet(1, out_channels=2 if learned else None)
    scheduler = DDPMScheduler(num_train_timesteps=1000, **schedule)
    out = tmp_path / "ddpm.ckpt"
    convert(save_ddpm(tmp_path / "ddpm", unet, scheduler), out)
    backbone, _ = load_backbone(out, "identity")
    table = table_log_sigmas(scheduler)
    for t in (0, 500, 990):

        def ddpm(x, sigma, t=t):
            with torch.no_grad():
                eps = unet(x / math.sqrt(1 + sigma**2), torch.tensor([t, t]), return_dict=False)[0][:, :1]
            return x - sigma * eps

        sigma = float(math.exp(table[t]))
        x = noisy(1, sigma, seed=t)
        assert_denoiser(converted_denoiser(backbone, x, sigma, "identity"), ddpm(x, sigma), sigma)


def test_the_backbone_follows_the_runs_sigma_data_and_ddim_configs_convert(tmp_path):
    # DDIMScheduler has DDPM's betas: the same abar_t, so the same timesteps
    unet = make_unet(1)
    out = tmp_path / "ddim.ckpt"
    convert(save_ddpm(tmp_path / "ddim", unet, make_scheduler(DDIMScheduler)), out)
    backbone, _ = load_backbone(out, "identity", sigma_data=0.3)
    table = table_log_sigmas(make_scheduler())
    sigma = float(math.exp(table[250]))
    x = noisy(1, sigma)
    expected = ddpm_denoiser(unet, x, sigma, torch.tensor([250, 250]))
    assert_denoiser(converted_denoiser(backbone, x, sigma, "identity", sigma_data=0.3), expected, sigma)


def test_the_hubs_old_config_files_convert(tmp_path):
    # google/ddpm-cifar10-32's files were written by diffusers 0.0.4 / 0.1.1: fewer UNet keys than today's,
    # no prediction_type (epsilon), and a scheduler key diffusers has dropped since (tensor_format)
    old_unet = {
        "_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu",
        "attention_head_dim": None, "block_out_channels": [32, 64], "center_input_sample": False,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "downsample_padding": 0,
        "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 1,
        "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 8, "out_channels": 3,
        "sample_size": 8, "time_embedding_type": "positional",
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    }  # fmt: skip
    old_scheduler = {
        "_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02,
        "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000,
        "tensor_format": "pt", "trained_betas": None, "variance_type": "fixed_large",
    }  # fmt: skip
    unet = make_unet(3, downsample_padding=0, attention_head_dim=None)
    folder = save_ddpm(tmp_path / "ddpm-cifar10-32", unet, make_scheduler(), layout="top")
    (folder / "config.json").write_text(json.dumps(old_unet))
    (folder / "scheduler_config.json").write_text(json.dumps(old_scheduler))
    out = tmp_path / "ddpm.ckpt"
    convert(folder, out)
    backbone, checkpoint = load_backbone(out, "log")
    assert checkpoint["act_generator"]["scheduler"]["prediction_type"] == "epsilon"
    assert "tensor_format" not in checkpoint["act_generator"]["scheduler"]
    sigma = float(math.exp(table_log_sigmas(make_scheduler())[300]))
    x = noisy(3, sigma)
    expected = ddpm_denoiser(unet, x, sigma, torch.tensor([300, 300]))
    assert_denoiser(converted_denoiser(backbone, x, sigma, "log"), expected, sigma)


def test_a_bin_file_is_read_with_the_safe_loader(tmp_path):
    unet = make_unet(1)
    folder = tmp_path / "bin"
    unet.save_pretrained(folder / "unet", safe_serialization=False)
    make_scheduler().save_pretrained(folder / "scheduler")
    assert (folder / "unet" / "diffusion_pytorch_model.bin").is_file()
    backbone, _ = load_backbone(convert(folder, tmp_path / "bin.ckpt")["out"], "identity")
    for k, v in unet.state_dict().items():
        torch.testing.assert_close(backbone.unet.state_dict()[k], v, rtol=0, atol=0)


# -- refusals ----------------------------------------------------------------------------------------------


def test_folders_the_backbone_cannot_reproduce_are_refused_by_name(tmp_path):
    unet = make_unet(1)
    v_pred = save_ddpm(tmp_path / "v", unet, make_scheduler(prediction_type="v_prediction"))
    with pytest.raises(
        ValueError, match=r"scheduler_config.json: prediction_type='v_prediction'.*not supported"
    ):
        convert(v_pred, tmp_path / "v.ckpt")
    sample = save_ddpm(tmp_path / "s", unet, make_scheduler(prediction_type="sample"))
    with pytest.raises(ValueError, match="prediction_type='sample', expected 'epsilon'"):
        convert(sample, tmp_path / "s.ckpt")

    empty = tmp_path / "empty"
    make_scheduler().save_pretrained(empty / "scheduler")
    with pytest.raises(FileNotFoundError, match=r"holds no UNet config: expected .*unet/config.json"):
        convert(empty, tmp_path / "e.ckpt")
    no_scheduler = tmp_path / "noscheduler"
    unet.save_pretrained(no_scheduler / "unet")
    with pytest.raises(FileNotFoundError, match="holds no scheduler config"):
        convert(no_scheduler, tmp_path / "n.ckpt")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        convert(tmp_path / "missing", tmp_path / "m.ckpt")

    other = save_ddpm(tmp_path / "other", unet, make_scheduler())
    config = other / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "UNet2DConditionModel"}))
    with pytest.raises(
        ValueError, match="config.json: _class_name is 'UNet2DConditionModel', expected UNet2DModel"
    ):
        convert(other, tmp_path / "o.ckpt")

    fourier = save_ddpm(tmp_path / "fourier", unet, make_scheduler())
    config = fourier / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "time_embedding_type": "fourier"}))
    with pytest.raises(ValueError, match="time_embedding_type='fourier', expected 'positional'"):
        convert(fourier, tmp_path / "f.ckpt")
    # the UNet's config in unet/ is the one read, whatever a config at the top of the folder says
    both = save_ddpm(tmp_path / "both", unet, make_scheduler())
    (both / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    make_scheduler().save_pretrained(both)
    convert(both, tmp_path / "converted" / "both.ckpt")

    labelled = save_ddpm(tmp_path / "labelled", make_unet(1, num_class_embeds=10), make_scheduler())
    with pytest.raises(ValueError, match="num_class_embeds=10, expected null"):
        convert(labelled, tmp_path / "l.ckpt")
    weightless = save_ddpm(tmp_path / "weightless", unet, make_scheduler())
    (weightless / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    expected = r"expected diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin\)"
    with pytest.raises(
        FileNotFoundError, match=rf"weightless/unet: the UNet's weights cannot be read \({expected}"
    ):
        convert(weightless, tmp_path / "w.ckpt")
    assert not list(tmp_path.glob("*.ckpt"))  # nothing written by a refused conversion


def test_an_existing_out_is_replaced_only_with_force(tmp_path):
    folder = save_ddpm(tmp_path / "ddpm", make_unet(1), make_scheduler())
    out = tmp_path / "out.ckpt"
    out.write_bytes(b"precious")
    with pytest.raises(ValueError, match=r"OUT=.*out.ckpt already exists: pass --force"):
        convert(folder, out)
    assert out.read_bytes() == b"precious"
    convert(folder, out, force=True)
    assert "act_generator" in torch.load(out, weights_only=True)
    config = folder / "unet" / "config.json"
    kept = config.read_bytes()
    with pytest.raises(ValueError, match=r"OUT=.*unet/config.json is a file of DIR=.*ddpm, the model being"):
        convert(folder, config, force=True)  # --force once replaced the model's own config with a checkpoint
    with pytest.raises(ValueError, match=r"OUT=.*ddpm is a folder: name the file to write"):
        convert(folder, folder, force=True)
    assert config.read_bytes() == kept


# -- the command -----------------------------------------------------------------------------------------


def run_convert(*args, own_process=False):
    return run_module("convert_diffusers", args, timeout=300, own_process=own_process)


def test_the_command_converts_and_refuses_in_one_line(tmp_path):
    folder = save_ddpm(tmp_path / "ddpm", make_unet(1), make_scheduler(), layout="top")
    out = tmp_path / "out.ckpt"
    # a new interpreter: `python -m act_lightning.convert_diffusers` itself starts (the others in-process)
    result = run_convert(folder, out, own_process=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"written to {out}" in result.stdout and f"init_from={out}" in result.stdout
    assert "act_generator" in torch.load(out, weights_only=True)
    line = refusal(run_convert(tmp_path / "missing", tmp_path / "x.ckpt"))
    assert "DIR=" in line and "missing" in line and "is not a folder" in line
    assert "already exists" in refusal(run_convert(folder, out))


# -- init_from with the library's training --------------------------------------------------------------


@pytest.fixture
def digits_ddpm(tmp_path):
    """A converted 8x8 one-channel DDPM: the quickstart's digits (conf/data/digits.yaml)."""
    unet = make_unet(1)
    out = tmp_path / "digits_ddpm.ckpt"
    convert(save_ddpm(tmp_path / "ddpm", unet, make_scheduler()), out)
    return unet, out


@pytest.mark.parametrize("kind", ["identity", "log"])
def test_init_from_builds_the_converted_generator(cfg_factory, digits_ddpm, kind):
    unet, out = digits_ddpm
    cfg = cfg_factory(["experiment=quickstart", f"init_from={out}", "debug=smoke", f"model.c_noise={kind}"])
    assert (cfg.data.image_size, cfg.data.channels) == (8, 1)
    init = read_init(cfg)
    assert cfg.model.generator._target_ == "act_lightning.nn.vp.VPEpsilonBackbone"  # not the experiment's
    check_config(cfg)
    model = instantiate(cfg.model)
    load_init(model, init)
    backbone, _ = load_backbone(out, kind)
    for net in (model.generator, model.target):
        assert type(net).__name__ == "VPEpsilonBackbone" and net.c_noise == kind and net.sigma_data == SD
        for a, b in zip(net.state_dict().values(), backbone.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    sigma = float(math.exp(table_log_sigmas(make_scheduler())[100]))
    x = noisy(1, sigma)
    expected = ddpm_denoiser(unet, x, sigma, torch.tensor([100, 100]))
    with torch.no_grad():
        actual = consistency_function(
            model.generator.eval(), x, torch.tensor(sigma), sigma_min=0.0, sigma_data=SD, c_noise_kind=kind
        )
    assert_denoiser(actual, expected, sigma)


def test_a_sigma_max_above_the_ddpms_table_is_warned_about(cfg_factory, digits_ddpm, caplog):
    _, out = digits_ddpm
    top = float(math.exp(table_log_sigmas(make_scheduler())[-1]))  # 157 for these linear betas
    base = ["experiment=quickstart", f"init_from={out}", "debug=smoke"]
    with caplog.at_level("WARNING", logger="act_lightning.init_from"):
        read_init(cfg_factory([*base, f"model.schedule.sigma_max={top * 0.99}"]))
        assert not caplog.records  # the run's 0.002 below the table's first 0.01 is not warned about
        read_init(cfg_factory([*base, f"model.schedule.sigma_max={top * 1.01}"]))
    assert len(caplog.records) == 1
    assert f"up to {top:.4g}" in caplog.records[0].getMessage()
    assert f"model.schedule.sigma_max={top * 1.01:g} is above it" in caplog.records[0].getMessage()


def test_init_from_refuses_data_of_another_size_by_name(cfg_factory, digits_ddpm):
    _, out = digits_ddpm
    cfg = cfg_factory(["experiment=quickstart", f"init_from={out}", "debug=smoke", "data.image_size=16"])
    read_init(cfg)
    with pytest.raises(
        ValueError, match="model.generator.image_size=8 differs from data.image_size=16"
    ) as err:
        check_config(cfg)
    # the user set neither key: the file did, and it is named
    assert str(err.value).endswith(f"(init_from={out} is a model of such images: train it on data of theirs)")


def test_the_runs_dropout_applies_to_a_converted_generator(cfg_factory, digits_ddpm):
    _, out = digits_ddpm
    cfg = cfg_factory(
        ["experiment=quickstart", f"init_from={out}", "debug=smoke", "model.generator.dropout=0.2"]
    )
    read_init(cfg)  # the architecture is the DDPM's; dropout is a training setting (ECT's CIFAR-10: 0.2)
    assert (
        cfg.model.generator._target_.endswith("VPEpsilonBackbone") and cfg.model.generator.unet.dropout == 0.2
    )
    assert instantiate(cfg.model.generator).unet.config.dropout == 0.2


def test_labelled_data_with_a_converted_unconditional_model_is_refused_by_name(cfg_factory, digits_ddpm):
    # it trained without a word, and its samples were labelled with classes the generator never saw
    from act_lightning.train import check_config

    _, out = digits_ddpm
    cfg = cfg_factory(["experiment=quickstart", f"init_from={out}", "debug=smoke", "data.num_classes=10"])
    read_init(cfg)
    with pytest.raises(ValueError, match=r"num_classes=10 .* converted unconditional model \(init_from="):
        check_config(cfg)
    cfg.data.num_classes = None
    check_config(cfg)


@pytest.mark.slow
def test_training_starts_from_a_converted_ddpm(digits_ddpm, tmp_path):
    _, out = digits_ddpm
    run_dir = tmp_path / "run"
    args = ["experiment=quickstart", f"init_from={out}", "debug=smoke", "model.curriculum=ect", "threads=1"]
    result = run_cli(args, run_dir)
    assert result.returncode == 0, result.stderr[-5000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_a_run_from_a_converted_ddpm_resumes_after_the_file_has_gone(digits_ddpm, tmp_path):
    # the converted file set model.generator (a VP backbone, not the quickstart's network); the run's
    # history keeps that config, so resume=auto builds the same network without the file
    _, out = digits_ddpm
    args = ["experiment=quickstart", f"init_from={out}", "debug=smoke", "eval=null", "iterations=4"]
    run_dir = tmp_path / "run"
    assert train(compose([*args, "stop_after=2"], run_dir=str(run_dir)))["iteration"] == 2
    out.unlink()
    assert train(compose(args, run_dir=str(run_dir)))["finished"]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert int(last["state_dict"]["iteration"]) == 4
    assert last["act_config"]["model"]["generator"]["_target_"].endswith("VPEpsilonBackbone")
    assert last["act_history"][0]["init_from"] == str(out) and "init_generator" in last["act_history"][0]
    # the model it was converted from is recorded, for when the converted file is gone
    assert last["act_history"][0]["init_converted_from"] == str(tmp_path / "ddpm")
    # a later launch need not give init_from again (it was refused: "model.generator._target_ ... cannot
    # change on resume"), and the run can start the next one: its checkpoint sets model.generator too
    longer = [*[a for a in args if not a.startswith(("init_from", "iterations"))], "iterations=6"]
    assert train(compose([*longer, "resume_changes=[iterations]"], run_dir=str(run_dir)))["finished"]
    tune = ["experiment=quickstart", f"init_from={run_dir / 'checkpoints' / 'last.ckpt'}", "debug=smoke"]
    next_run = tmp_path / "next"
    assert train(compose([*tune, "eval=null", "iterations=2"], run_dir=str(next_run)))["finished"]
    started = torch.load(next_run / "checkpoints" / "last.ckpt", weights_only=True)["act_history"][0]
    assert started["init_generator"]["_target_"].endswith("VPEpsilonBackbone")
    assert started["init_converted_from"] == str(tmp_path / "ddpm")
    # and a new run from its checkpoint in another folder (ckpt_path=): it was refused as trained with
    # another model.generator, which no command line could give but the whole converted config
    branch = [*[a for a in longer if not a.startswith("iterations")], "iterations=8"]
    branch += [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "resume_changes=[iterations]"]
    assert train(compose(branch, run_dir=str(tmp_path / "branch")))["finished"]
    branched = torch.load(tmp_path / "branch" / "checkpoints" / "last.ckpt", weights_only=True)
    assert int(branched["state_dict"]["iteration"]) == 8
    assert branched["act_config"]["model"]["generator"]["_target_"].endswith("VPEpsilonBackbone")


def test_a_continuation_given_another_init_from_says_that_it_is_not_read(digits_ddpm, tmp_path, caplog):
    # the run resumed from its own checkpoint, and nothing said that the new file went unread
    import shutil

    _, out = digits_ddpm
    other = tmp_path / "other.ckpt"
    shutil.copy(out, other)
    args = ["experiment=quickstart", "debug=smoke", "eval=null", "iterations=3"]
    run_dir = tmp_path / "run"
    train(compose([*args, f"init_from={out}", "stop_after=2"], run_dir=str(run_dir)))
    with caplog.at_level(logging.WARNING, logger="act_lightning.start"):
        assert train(compose([*args, f"init_from={out}"], run_dir=str(tmp_path / "run")))["finished"]
        assert "is not read" not in caplog.text  # the file it started from: nothing to say
        train(compose([*args, f"init_from={other}"], run_dir=str(run_dir)))
    said = f"init_from={other} is not read: the run continues from its own checkpoint (it started from {out})"
    assert said in caplog.text


def test_the_backbone_refuses_sizes_other_than_the_unets_and_an_unknown_c_noise_at_once():
    unet = {**make_unet(channels=1).config}
    unet = {k: v for k, v in unet.items() if not k.startswith("_")}
    scheduler = {k: v for k, v in make_scheduler().config.items() if not k.startswith("_")}
    args = dict(
        unet=unet, scheduler=scheduler, sigma_data=SD, c_noise="identity", image_size=8, in_channels=1
    )
    assert VPEpsilonBackbone(**args).log_sigmas.shape == (1000,)
    for wrong in ({"image_size": 16}, {"in_channels": 3}):
        with pytest.raises(
            ValueError, match=r"model\.generator\.image_size=.* must be the UNet's sample_size=8"
        ):
            VPEpsilonBackbone(**(args | wrong))
    with pytest.raises(ValueError, match="no_such_kind"):
        VPEpsilonBackbone(**(args | {"c_noise": "no_such_kind"}))


def test_configs_are_read_as_json_objects_and_checked_before_any_weights(tmp_path):
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="list.json: not a JSON object"):
        read_json(tmp_path / "list.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json: not a readable JSON config"):
        read_json(tmp_path / "broken.json")
    assert public({"_class_name": "X", "sizes": (1, 2), "n": 3}) == {"sizes": [1, 2], "n": 3}
    unet = {"_class_name": "UNet2DModel", "sample_size": 8, "in_channels": 1, "out_channels": 1}
    check_unet(tmp_path, unet, "fixed_small")
    check_unet(tmp_path, {**unet, "out_channels": 2}, "learned_range")  # eps and the variance
    for bad, variance, message in (
        ({"sample_size": True}, None, "sample_size=True, expected one integer"),
        ({"class_embed_type": "timestep"}, None, "class_embed_type='timestep', expected null"),
        ({"out_channels": 2}, "fixed_small", "out_channels=2, expected in_channels=1"),
        ({"out_channels": 3}, "learned_range", "out_channels=3, expected in_channels=1"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            check_unet(tmp_path, {**unet, **bad}, variance)
    ddim = {"_class_name": "DDIMScheduler", "beta_schedule": "linear", "set_alpha_to_one": False}
    assert check_scheduler(tmp_path, ddim)["num_train_timesteps"] == 1000  # DDIM's own keys dropped
    with pytest.raises(ValueError, match="rescale_betas_zero_snr=true gives abar_T = 0"):
        check_scheduler(tmp_path, {**ddim, "rescale_betas_zero_snr": True})
    flat = {"_class_name": "DDPMScheduler", "num_train_timesteps": 3, "trained_betas": [0.1, 0.0, 0.1]}
    with pytest.raises(ValueError, match="do not give finite noise levels increasing with the timestep"):
        check_scheduler(tmp_path, flat)


def test_the_commands_say_what_a_converted_ddpm_is_for(digits_ddpm):
    """Sampling a conversion to check it is a first thing to try; the commands said only that the file
    was not written by train."""
    from act_lightning.checkpoints import load_model

    _, out = digits_ddpm
    with pytest.raises(ValueError, match=rf"ckpt={out}: a diffusion model that convert_diffusers converted"):
        load_model(out)
