"""`python -m act_lightning.export`: the target generator as safetensors + JSON (+ a diffusers UNet and
pipeline), loadable without Lightning or Hydra, sampling exactly what `act_lightning.sample` samples."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

from act_lightning import load_generator
from act_lightning.environment import describe, environment
from act_lightning.export import FORMAT, ACTPipeline, export
from act_lightning.sample import image_noise, to_uint8
from act_lightning.train import train
from tests.conftest import CONF, ROOT, compose, refusal, run_cli, run_module
from tests.helpers_data import write_image_folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    train(compose(["debug=smoke", "data=synthetic", "iterations=2", "eval=null"], run_dir=str(root / "run")))
    ckpt = root / "run" / "checkpoints" / "last.ckpt"
    out = root / "exported"
    result = run_module(
        "export", [f"ckpt={ckpt}", f"out={out}", f"hydra.run.dir={root / 'hydra'}"], timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"exported iteration 2 to {out}" in result.stdout
    return ckpt, out


def run_the_cards_code(out, monkeypatch) -> dict:
    """Runs the model card's Python block where the folder lies beside it (a Hub repository's place)."""
    card = (out / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(out.parent)
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the card this library wrote
    return scope


def test_the_export_holds_weights_config_card_and_a_diffusers_unet(exported, monkeypatch):
    _, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "act-lightning/generator" and config["iteration"] == 2
    assert config["consistency"]["sigma_max"] == 20.0 and config["generator"]["image_size"] == 8
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers")
    assert "taus=[8.0])   # two steps" in card  # the quickstart's own two-step level
    # the scalings the card's formula uses, which it named without defining them
    assert "c_skip(t) = sigma_data^2 / ((t - sigma_min)^2 + sigma_data^2)" in card
    assert "- unconditional-image-generation\n" in card and str(out.parent) not in card  # a relative name
    assert run_the_cards_code(out, monkeypatch)["images"].shape == (16, 1, 8, 8)  # its code runs
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "ACTPipeline"


def test_the_config_and_the_card_name_the_run_its_checkpoint_and_its_length(exported):
    _, out = exported
    config = json.loads((out / "config.json").read_text())
    assert (config["experiment"], config["num_classes"]) == ("quickstart", None)
    assert config["consistency"]["rho"] == 7.0
    card = (out / "README.md").read_text()
    assert "# ACT generator: quickstart\n" in card
    assert (
        "from the checkpoint `last.ckpt`\n(iteration 2 of 2; experiment `quickstart`): 8x8 images with 1\n"
        in card
    )
    # no classes; the versions of the launch that trained it, as its checkpoint keeps them
    assert config["trained_with"] == environment()
    assert f"channel(s). Trained with {describe(environment())}.\n" in card


def test_every_exported_file_follows_the_umask_as_checkpoints_do(exported, tmp_path):
    ckpt, _ = exported
    old = os.umask(0o022)
    try:
        export(ckpt, tmp_path / "out")
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert {p.relative_to(tmp_path / "out").as_posix() for p in files} >= {
        "model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "config.json",
    }
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: "0o644" for p in files}


def assert_samples_as_the_sample_command(ckpt, out, taus, n: int, folder) -> None:
    """`load_generator(out)` samples, from the sample command's noise (seed 0, image i's own), exactly the
    images `python -m act_lightning.sample ckpt=CKPT taus=TAUS` writes."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from act_lightning.sample import sample

    with initialize_config_dir(str(CONF), version_base="1.3"):
        overrides = [f"ckpt={ckpt}", f"num_samples={n}", f"taus={taus}", "overwrite=true"]  # one folder
        cfg = hydra_compose("sample", overrides=overrides)
    cfg.out = str(folder)
    sample(cfg)
    with np.load(folder / "samples.npz") as f:
        expected = f["arr_0"]
    indices = range(n)
    step_noise = lambda step: image_noise(0, indices, (1, 8, 8), stream=step)  # noqa: E731
    images = load_generator(out).sample(image_noise(0, indices, (1, 8, 8)), taus=taus, step_noise=step_noise)
    assert np.array_equal(to_uint8(images), expected), taus


def test_reloaded_it_samples_bit_identically_to_the_sample_command(exported, tmp_path):
    ckpt, out = exported
    for taus in ([], [1.3824]):
        assert_samples_as_the_sample_command(ckpt, out, taus, 6, tmp_path / "s")
    pipeline = ACTPipeline.from_pretrained(out)
    noise = image_noise(0, range(6), (1, 8, 8))
    assert torch.equal(pipeline(noise=noise), load_generator(out).sample(noise))
    for unconditional in (load_generator(out).sample, lambda z, y: pipeline(noise=z, class_labels=y)):
        with pytest.raises(ValueError, match="class_labels: this model is unconditional"):
            unconditional(noise, torch.zeros(6, dtype=torch.long))
    two_steps = pipeline(batch_size=3, taus=[1.3824], generator=torch.Generator().manual_seed(5))
    again = pipeline(batch_size=3, taus=[1.3824], generator=torch.Generator().manual_seed(5))
    assert two_steps.shape == (3, 1, 8, 8) and torch.equal(two_steps, again)
    # diffusers' output types: an ImagePipelineOutput of an (N, H, W, C) array in [0, 1] or of PIL images
    tensor = pipeline(noise=noise)
    array = pipeline(noise=noise, output_type="np").images
    assert array.shape == (6, 8, 8, 1) and np.array_equal(
        array, ((tensor + 1) / 2).permute(0, 2, 3, 1).numpy()
    )
    pil = pipeline(noise=noise, output_type="pil").images
    assert len(pil) == 6 and pil[0].mode == "L" and pil[0].size == (8, 8)
    assert np.array_equal(np.asarray(pil[2]), (array[2, :, :, 0] * 255).round().astype(np.uint8))
    with pytest.raises(ValueError, match="output_type must be pt, pil or np; got 'latent'"):
        pipeline(noise=noise, output_type="latent")


def test_the_loaded_generator_and_the_pipeline_name_wrong_noise_and_levels(exported):
    """Noise of another size (it was sampled without a word), a bare number or sigma_max itself as taus
    (sample.json lists the levels with sigma_max first), named; float64 noise is taken in float32."""
    _, out = exported
    model, pipeline = load_generator(out), ACTPipeline.from_pretrained(out)
    noise = image_noise(0, range(2), (1, 8, 8))
    for sample in (model.sample, lambda z, **kw: pipeline(noise=z, **kw)):
        with pytest.raises(ValueError, match=r"noise: this model makes 1 x 8 x 8 images; got noise of shape"):
            sample(torch.randn(2, 1, 16, 16))
        with pytest.raises(ValueError, match=r"taus: a list of noise levels after the first step"):
            sample(noise, taus=8.0)
        with pytest.raises(ValueError, match=r"sigma_max=20, each below it .*sigma_max itself is not listed"):
            sample(noise, taus=[20.0, 8.0])
        assert torch.equal(sample(noise.double()), sample(noise))


def test_the_loaded_generator_samples_in_eval_mode_whatever_its_own_mode(exported, tmp_path):
    """`ExportedGenerator.sample` runs without dropout as ACTModule.sample does, also after `.train()`
    (a fine-tuning script's mode): with dropout 0.3 its samples moved by up to 0.46."""
    _, out = exported
    folder = tmp_path / "dropout"
    folder.mkdir()
    for name in ("model.safetensors", "config.json"):
        (folder / name).write_bytes((out / name).read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["generator"]["dropout"] = 0.3
    (folder / "config.json").write_text(json.dumps(config))
    model = load_generator(folder)
    noise = image_noise(0, range(4), (1, 8, 8))
    expected = model.sample(noise)
    model.train()
    assert torch.equal(model.sample(noise), expected) and model.training  # its mode is left as it was
    assert not torch.equal(
        model(noise * 20.0, torch.full((4,), 20.0)), model(noise * 20.0, torch.full((4,), 20.0))
    )


def test_load_generator_names_a_checkpoint_file_and_a_broken_config(exported, tmp_path):
    ckpt, out = exported
    with pytest.raises(
        ValueError, match=r"a file; load_generator reads the folder .* act_lightning.checkpoints.load_model"
    ):
        load_generator(ckpt)
    with pytest.raises(FileNotFoundError, match=r"user/act-cifar10: no such folder; .*snapshot_download"):
        load_generator("user/act-cifar10")  # a Hub repository's name: not a folder here
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    (folder / "config.json").write_text('{"format": "act-lightning/generator", ')
    with pytest.raises(ValueError, match=rf"{folder / 'config.json'}: not readable as JSON"):
        load_generator(folder)
    (folder / "config.json").write_text(json.dumps({"format": FORMAT, "consistency": {}}))
    with pytest.raises(ValueError, match=r"config.json: no generator section"):
        load_generator(folder)


def test_an_export_keeps_the_runs_own_constants_and_every_step(tmp_path):
    """A run with sigma_data 0.7 and the log noise embedding: config.json holds both, and load_generator,
    the diffusers pipeline and the sample command agree, for one step and for three."""
    overrides = ["debug=smoke", "data=synthetic", "iterations=2", "eval=null"]
    own = ["model.sigma_data=0.7", "model.c_noise=log", "model.schedule.rho=5.0"]
    train(compose([*overrides, *own], run_dir=str(tmp_path / "run")))
    ckpt, out = tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "exported"
    export(ckpt, out)
    config = json.loads((out / "config.json").read_text())["consistency"]
    assert (config["sigma_data"], config["c_noise"], config["rho"]) == (0.7, "log", 5.0)
    for taus in ([], [5.0, 1.0]):
        assert_samples_as_the_sample_command(ckpt, out, taus, 4, tmp_path / "s")
    noise = image_noise(0, range(4), (1, 8, 8))
    assert torch.equal(ACTPipeline.from_pretrained(out)(noise=noise), load_generator(out).sample(noise))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_pipeline_on_a_gpu_takes_a_host_or_a_device_generator(exported):
    """On a GPU the pipeline draws with the user's host generator and moves the noise to the UNet's
    device; with the same generator seed it samples what it samples on the host (to float tolerance)."""
    _, out = exported
    cpu = ACTPipeline.from_pretrained(out)
    gpu = ACTPipeline.from_pretrained(out).to("cuda")
    for taus in ([], [1.3824]):
        on_host = cpu(batch_size=4, taus=taus, generator=torch.Generator().manual_seed(1))
        on_gpu = gpu(batch_size=4, taus=taus, generator=torch.Generator().manual_seed(1))
        assert on_gpu.device.type == "cuda"
        torch.testing.assert_close(on_gpu.cpu(), on_host, rtol=1e-3, atol=1e-3)
    on_device = gpu(batch_size=4, taus=[1.3824], generator=torch.Generator(device="cuda").manual_seed(1))
    assert on_device.device.type == "cuda" and torch.isfinite(on_device).all()  # a generator on the GPU too


@pytest.mark.slow
def test_loading_needs_neither_lightning_nor_hydra(exported):
    _, out = exported
    code = (
        "import sys, torch, act_lightning\n"
        f"m = act_lightning.load_generator({str(out)!r})\n"
        "x = m.sample(torch.randn(2, 1, 8, 8))\n"
        "assert x.shape == (2, 1, 8, 8) and x.abs().max() <= 1\n"
        "assert not any(n == 'lightning' or n.startswith(('lightning.', 'hydra')) for n in sys.modules), "
        "sorted(n for n in sys.modules if n.startswith(('lightning', 'hydra')))\n"
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_an_export_replaces_an_earlier_one_and_refuses_a_folder_of_other_files(exported):
    ckpt, out = exported
    export(ckpt, out)  # again, into the earlier export: replaced
    assert json.loads((out / "config.json").read_text())["format"] == FORMAT
    before = sorted(p.name for p in ckpt.parent.iterdir())
    with pytest.raises(ValueError, match=f"out={ckpt.parent} holds other files, not an earlier export"):
        export(ckpt, ckpt.parent)  # it wrote a model card and weights among the run's checkpoints
    assert sorted(p.name for p in ckpt.parent.iterdir()) == before
    hub = out.parent / "hub_clone"  # a clone of a new Hugging Face repository: hidden files only
    (hub / ".git").mkdir(parents=True)
    (hub / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    export(ckpt, hub)
    assert (hub / "model.safetensors").is_file() and (hub / ".gitattributes").read_text().startswith("*.safe")


def test_a_folder_that_is_not_an_export_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json: missing; .* not a folder written by"):
        load_generator(tmp_path)


def test_the_command_names_a_missing_option_and_a_missing_checkpoint(tmp_path):
    hydra = f"hydra.run.dir={tmp_path / 'hydra'}"
    # a new interpreter: `python -m act_lightning.export` itself starts (the other runs are in-process)
    result = run_module("export", [hydra, f"out={tmp_path}"], timeout=120, own_process=True)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        "error: ckpt is required: give ckpt=... (--help lists the options)"
    ), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    missing = tmp_path / "nope.ckpt"
    args = [f"ckpt={missing}", f"out={tmp_path / 'out'}"]
    result = run_module("export", [hydra, *args], timeout=120)
    assert f"error: ckpt={missing}: no such checkpoint file" in result.stderr, result.stderr[-2000:]
    assert result.returncode == 2 and not (tmp_path / "out").exists() and "Traceback" not in result.stderr


def test_a_diffusion_model_and_a_converted_ddpm_are_refused_not_written_wrong(tmp_path):
    from tests.unit.test_convert_diffusers import convert, make_scheduler, make_unet, save_ddpm

    diffusion = tmp_path / "diffusion"
    train(
        compose(
            ["experiment=quickstart_diffusion", "debug=smoke", "iterations=1", "eval=null"],
            run_dir=str(diffusion),
        )
    )
    with pytest.raises(ValueError, match="a diffusion model"):
        export(diffusion / "checkpoints" / "last.ckpt", tmp_path / "out1")
    ddpm = tmp_path / "ddpm.ckpt"
    convert(save_ddpm(tmp_path / "folder", make_unet(1), make_scheduler()), ddpm)
    tuned = tmp_path / "tuned"
    train(
        compose(
            ["experiment=quickstart", f"init_from={ddpm}", "debug=smoke", "iterations=1", "eval=null"],
            run_dir=str(tuned),
        )
    )
    with pytest.raises(ValueError, match="VPEpsilonBackbone"):
        export(tuned / "checkpoints" / "last.ckpt", tmp_path / "out2")
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def test_a_folder_of_another_format_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"format": "someone-else/model"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(
        ValueError, match=r"config.json: not an act-lightning generator \(format 'someone-else"
    ):
        load_generator(tmp_path)


def test_a_class_conditional_export_keeps_its_classes_and_samples_the_ones_given(tmp_path):
    """A folder as export writes it, of a tiny class-conditional UNetGenerator (no training needed):
    load_generator knows its classes, and the labels given to sample reach every step."""
    from safetensors.torch import save_file

    from act_lightning.nn.generator import UNetGenerator

    args = {
        "image_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 8],
        "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"],
        "layers_per_block": 1, "attention_head_dim": None, "num_class_embeds": 3, "norm_num_groups": 4,
    }  # fmt: skip
    torch.manual_seed(0)
    backbone = UNetGenerator(**args)
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_file(
        {k: v.contiguous() for k, v in backbone.state_dict().items()}, str(tmp_path / "model.safetensors")
    )
    constants = {"sigma_min": 0.002, "sigma_max": 20.0, "sigma_data": 0.5, "rho": 7.0, "c_noise": "identity"}
    config = {"format": FORMAT, "generator": args, "consistency": constants}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_generator(tmp_path)
    assert model.num_classes == 3 and not model.training
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    step = lambda step: torch.ones(2, 1, 8, 8)  # noqa: E731
    first, second = (model.sample(noise, torch.tensor([c, c]), taus=[1.0], step_noise=step) for c in (0, 2))
    assert not torch.equal(first, second)
    again = model.sample(noise, torch.tensor([0, 0]), taus=[1.0], step_noise=step)
    assert torch.equal(first, again)
    # the diffusers pipeline around the same UNet takes the labels too
    pipeline = ACTPipeline(unet=model.backbone.unet, used_channels=model.backbone.used_channels, **constants)
    labels = torch.tensor([2, 2])
    assert torch.equal(pipeline(noise=noise, class_labels=labels), model.sample(noise, labels))
    assert not torch.equal(pipeline(noise=noise, class_labels=labels), model.sample(noise, labels * 0))
    two = pipeline(noise=noise, class_labels=labels, taus=[1.0], generator=torch.Generator().manual_seed(3))
    assert torch.equal(
        two, model.sample(noise, labels, taus=[1.0], generator=torch.Generator().manual_seed(3))
    )
    assert not torch.equal(two, pipeline(noise=noise, class_labels=labels))
    # one class for every image (an int or a 0-d tensor), a list or an int32 tensor: the same as int64 labels
    for sample in (model.sample, lambda z, y: pipeline(noise=z, class_labels=y)):
        expected = sample(noise, torch.tensor([2, 2]))
        for same in (2, torch.tensor(2), [2, 2], torch.tensor([2, 2], dtype=torch.int32)):
            assert torch.equal(sample(noise, same), expected)
    # labels missing, of the wrong shape or kind, or out of range: said by name, not by diffusers' UNet
    for sample in (model.sample, lambda z, y: pipeline(noise=z, class_labels=y)):
        with pytest.raises(
            ValueError, match=r"class-conditional \(3 classes\); pass one class index per image"
        ):
            sample(noise, None)
        for bad in (torch.tensor([1]), torch.tensor([[0, 1]]), [0, 1, 2]):
            with pytest.raises(ValueError, match=r"one class index per image, shape \(2,\), or one for all"):
                sample(noise, bad)
        for bad in (
            torch.tensor([0.0, 1.0]),
            torch.tensor([0, 1], dtype=torch.uint8),
            torch.tensor([True, False]),
        ):
            with pytest.raises(ValueError, match=r"class_labels: integer class indices \(int64 or int32\)"):
                sample(noise, bad)
        for bad in ([0.5, 1], True):
            with pytest.raises(ValueError, match=r"class_labels: integer class indices; got"):
                sample(noise, bad)
        for bad in (torch.tensor([0, 3]), torch.tensor([-1, 0]), 3):
            with pytest.raises(ValueError, match=r"class_labels: out of range for 3 classes \(0..2\)"):
                sample(noise, bad)


def test_a_class_conditional_run_exports_its_class_count_into_config_card_and_loaded_model(
    tmp_path, monkeypatch
):
    """A trained class-conditional checkpoint: config.json and the model card say how many classes the
    generator knows (and that sampling takes class_labels); load_generator reads the count back."""
    run = tmp_path / "run"
    overrides = ["debug=smoke", "data=synthetic", "data.num_classes=3", "model.generator.num_class_embeds=3"]
    train(compose([*overrides, "iterations=1", "eval=null"], run_dir=str(run)))
    out = tmp_path / "exported"
    export(run / "checkpoints" / "last.ckpt", out)
    assert json.loads((out / "config.json").read_text())["num_classes"] == 3
    card = (out / "README.md").read_text()
    assert "channel(s), 3 classes (pass class_labels). Trained with " in card
    assert "- class-conditional-image-generation\n" in card and "unconditional" not in card
    assert load_generator(out).num_classes == 3
    scope = run_the_cards_code(out, monkeypatch)  # it sampled without class labels before
    assert scope["images"].shape == (16, 1, 8, 8) and scope["labels"].max() < 3
    pipeline = ACTPipeline.from_pretrained(out)
    torch.testing.assert_close(  # a list of labels, as diffusers pipelines take them
        pipeline(noise=scope["z"][:2], class_labels=[1, 2]),
        pipeline(noise=scope["z"][:2], class_labels=torch.tensor([1, 2])),
    )


def test_a_folder_runs_class_names_are_kept_refused_when_renamed_on_resume_and_exported(tmp_path):
    """The class-name-to-index mapping of a folder data set was written nowhere but the launch's log: a
    resume after a class folder was renamed trained on reshuffled labels without a word, and no one holding
    the checkpoint or the export could tell what index k was."""
    images = write_image_folder(tmp_path / "images", classes=("apple", "mango", "zebra"), per_class=2)
    run = tmp_path / "run"
    common = ["experiment=cifar10", "debug=smoke", "data=folder", f"data.root={images}", "data.num_classes=3"]
    common += ["eval=null", "iterations=4"]
    train(compose([*common, "stop_after=2"], run_dir=str(run)))
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["act_label_names"] == ["apple", "mango", "zebra"]
    (images / "apple").rename(images / "zz_apple")
    line = refusal(run_cli(common, run))
    assert (
        "class sub-folders are now mango, zebra, zz_apple; this run was trained with apple, mango, zebra"
        in line
    )
    (images / "zz_apple").rename(images / "apple")
    train(compose(common, run_dir=str(run)))  # as they were: it goes on
    summary = export(last, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["class_names"] == ["apple", "mango", "zebra"] and summary["iteration"] == 4
    assert "classes by index: 0: apple, 1: mango, 2: zebra" in (tmp_path / "export" / "README.md").read_text()
    assert load_generator(tmp_path / "export").class_names == ["apple", "mango", "zebra"]
    labels = load_generator(tmp_path / "export").sample(torch.randn(2, 3, 32, 32), np.array([0, 2]))
    assert labels.shape == (2, 3, 32, 32)  # numpy's integer labels (a samples.npz's arr_1) are taken
    # edit takes a class by its name, as sample does: the same edit as by its index, recorded with both
    from tests.integration.test_edit import _edit, _images, _result

    inputs = [f"ckpt={last}", f"input={_images(tmp_path / 'in', 1, 32, 'RGB')}"]
    by_name = _edit([*inputs, "class_label=mango", f"out={tmp_path / 'by_name'}"])
    _edit([*inputs, "class_label=1", f"out={tmp_path / 'by_index'}"])
    assert by_name["class_label"] == 1 and by_name["class_name"] == "mango"
    np.testing.assert_array_equal(
        _result(tmp_path / "by_name")["output"], _result(tmp_path / "by_index")["output"]
    )
    with pytest.raises(
        ValueError, match="class_label=pear: no class is called 'pear'; this model's classes: apple"
    ):
        _edit([*inputs, "class_label=pear", f"out={tmp_path / 'pear'}"])
