"""`python -m act_lightning.convert_reference`: a checkpoint in the reference code's layout (written here
with random weights) becomes one that sample, evaluate and train ckpt_path= read, with the same networks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate

from act_lightning.checkpoints import load_model
from act_lightning.convert_reference import convert
from act_lightning.train import train
from tests.conftest import ROOT, compose

SMOKE = ["experiment=cifar10", "debug=smoke"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A module with random weights and the same weights in the reference layout (model.unet.* ...)."""
    torch.manual_seed(0)
    module = instantiate(compose(SMOKE).model, distance="l2", speed={"channels_last": False})
    for p in module.target.parameters():  # a target that differs from the generator
        p.data.add_(0.01 * torch.randn_like(p))
    state = {}
    for name, tensor in module.state_dict().items():
        for ours, theirs in (("generator.unet.", "model.unet."), ("target.unet.", "model_ema.unet.")):
            if name.startswith(ours):
                state[theirs + name[len(ours) :]] = tensor.clone()
        if name.startswith("discriminator."):
            state["model._discriminator." + name[len("discriminator.") :]] = tensor.clone()
            state["model_ema._discriminator." + name[len("discriminator.") :]] = tensor.clone()
    path = tmp_path_factory.mktemp("reference") / "cifar10_fid_6_0.ckpt"
    torch.save({"state_dict": state, "global_step": 10}, path)
    return module, state, path


def test_converted_networks_compute_what_the_reference_layout_holds(reference, tmp_path):
    module, _, path = reference
    out = tmp_path / "converted.ckpt"
    cmd = [sys.executable, "-m", "act_lightning.convert_reference", str(path), str(out), "debug=smoke"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "experiment cifar10" in result.stdout  # recognised from the generator's four levels
    converted, run, _ = load_model(out)
    x, sigma = torch.randn(2, 3, 32, 32), torch.tensor([80.0, 0.5])
    with torch.no_grad():
        for name in ("generator", "target"):
            ours, theirs = getattr(converted, name), getattr(module, name)
            torch.testing.assert_close(ours(x, sigma), theirs(x, sigma))
    state = torch.load(out, weights_only=True)["state_dict"]
    disc = instantiate(compose(SMOKE).model, distance="l2").discriminator
    disc.load_state_dict(
        {k[len("discriminator.") :]: v for k, v in state.items() if k.startswith("discriminator.")}
    )
    with torch.no_grad():
        torch.testing.assert_close(disc(x, sigma), module.discriminator(x, sigma))


def test_train_starts_from_a_converted_checkpoint(reference, tmp_path):
    _, _, path = reference
    out = tmp_path / "converted.ckpt"
    convert(path, out, ["experiment=cifar10", "debug=smoke"])
    summary = train(
        compose(
            [*SMOKE, "data=synthetic", "eval=null", "iterations=2", f"ckpt_path={out}"], str(tmp_path / "run")
        )
    )
    assert summary["finished"] and summary["iteration"] == 2


def test_unknown_missing_and_misshaped_keys_are_named(reference, tmp_path):
    _, state, _ = reference
    broken = dict(state)
    broken["model.lpips.weight"] = torch.zeros(1)
    del broken["model.unet.conv_in.bias"]
    broken["model.unet.conv_out.weight"] = torch.zeros(1, 2, 3, 3)
    path = tmp_path / "broken.ckpt"
    torch.save({"state_dict": broken}, path)
    with pytest.raises(ValueError) as err:
        convert(path, tmp_path / "out.ckpt", ["experiment=cifar10", "debug=smoke"])
    message = str(err.value)
    assert "unknown keys: model.lpips.weight" in message
    assert "mis-shaped keys: model.unet.conv_out.weight (1, 2, 3, 3)" in message
    assert "missing keys: generator.unet.conv_in.bias" in message
    with pytest.raises(ValueError, match="not a reference ACT checkpoint"):
        torch.save({"state_dict": {"weight": torch.zeros(1)}}, tmp_path / "foreign.ckpt")
        convert(tmp_path / "foreign.ckpt", tmp_path / "out.ckpt")


def test_a_converted_checkpoint_is_evaluated_sampled_and_exported(reference, tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from act_lightning.evaluate import evaluate
    from act_lightning.export import export
    from tests.conftest import CONF

    _, _, path = reference
    out = tmp_path / "cifar10_act.ckpt"
    convert(path, out, ["debug=smoke", "data=synthetic"])  # the stored config then reads no files
    overrides = [f"ckpt={out}", "num_samples=4", "batch_size=4", "samplers=[1-step]"]
    overrides += ["eval.inception_weights=random", "eval.reference=train", "eval.reference_max_images=8"]
    overrides += [f"output={tmp_path / 'eval.json'}"]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = hydra_compose("evaluate", overrides=overrides)
    summary = evaluate(cfg)
    assert summary["results"]["1-step"]["fid"] > 0 and summary["iteration"] == 0
    assert export(out, tmp_path / "exported")["iteration"] == 0
