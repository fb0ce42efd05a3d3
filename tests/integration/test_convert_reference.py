"""`python -m act_lightning.convert_reference`: a checkpoint in the reference code's layout (written here
with random weights) becomes one that sample, evaluate and train ckpt_path= read, with the same networks.
tests/fixtures/reference_keys holds every state-dict key (name and shape) of the reference's checkpoints,
derived from its code by make_reference_keys.py there: each experiment's complete key set converts."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate

from act_lightning.checkpoints import load_model
from act_lightning.convert_reference import convert, rename_keys
from act_lightning.train import train
from tests.conftest import ROOT, compose, run_module

SMOKE = ["experiment=cifar10", "debug=smoke"]
EXPERIMENTS = ("cifar10", "imagenet64", "lsun_cat256")
REFERENCE_KEYS = ROOT / "tests" / "fixtures" / "reference_keys"
NETWORKS = {  # the reference's prefix -> this library's
    "model.unet.": "generator.unet.",
    "model_ema.unet.": "target.unet.",
    "model._discriminator.": "discriminator.",
}
LIGHTNING = ("epoch", "global_step", "loops", "callbacks", "optimizer_states", "lr_schedulers")


def reference_keys(experiment: str) -> dict[str, list[int]]:
    """Every key of the reference's checkpoint of `experiment` with its shape (tests/fixtures)."""
    return json.loads((REFERENCE_KEYS / f"{experiment}.json").read_text())["state_dict"]


def ours(key: str) -> str | None:
    """A reference network key's name here (None: not one of the three networks)."""
    prefix = next((p for p in NETWORKS if key.startswith(p)), None)
    return None if prefix is None else NETWORKS[prefix] + key[len(prefix) :]


def full_size(experiment: str) -> list[str]:
    """Overrides of debug=smoke that keep the experiment's number of layers per block, so the tiny
    networks have the full-size networks' key names (smoke's layers_per_block=1 has fewer)."""
    model = compose([f"experiment={experiment}"]).model
    return [
        f"model.generator.layers_per_block={model.generator.layers_per_block}",
        f"model.discriminator.layers_per_block={model.discriminator.layers_per_block}",
    ]


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
    # a new interpreter: `python -m act_lightning.convert_reference` itself starts (its only command test)
    result = run_module("convert_reference", [path, out, "debug=smoke"], timeout=300, own_process=True)
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
    # what trained the weights before stays with them: the run's history, its export's card and config
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    started = {"checkpoint": "cifar10_fid_6_0.ckpt", "reference_iteration": 5}  # global_step 10 / 2
    assert saved["act_history"][0]["started_from"] == started
    from act_lightning.export import export

    assert export(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "exported")["iteration"] == 2
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["started_from"] == started and config["converted_from"] is None
    card = (tmp_path / "exported" / "README.md").read_text()
    released = "`cifar10_fid_6_0.ckpt` (trained by its reference code, kong13661/ACT, for 5 iterations)"
    assert f"with the act-lightning library, starting from the paper's released checkpoint {released}" in card
    assert "(iteration 2 of 2; experiment `cifar10`)" in card


def test_unknown_misshaped_duplicate_and_missing_keys_are_named(reference, tmp_path):
    _, state, _ = reference
    broken = dict(state)
    broken["model.lpips.weight"] = torch.zeros(1)
    broken["something_else.weight"] = torch.zeros(1)
    broken["model.unet._orig_mod.nonsense.weight"] = torch.zeros(1)
    broken["model.unet._orig_mod.conv_out.bias"] = broken["model.unet.conv_out.bias"]  # twice
    broken["fid._orig_mod.inception.fc.bias"] = torch.zeros(1008)  # dropped, whatever its shape
    broken["distance_loss.lpips.model.0.bias"] = torch.zeros(1)
    del broken["model.unet.conv_in.bias"]
    d_key = next(k for k in broken if k.startswith("model._discriminator."))
    del broken[d_key]  # the discriminator's weights are converted (and required) too
    broken["model.unet.conv_out.weight"] = torch.zeros(1, 2, 3, 3)
    path = tmp_path / "broken.ckpt"
    torch.save({"state_dict": broken}, path)
    with pytest.raises(ValueError) as err:
        convert(path, tmp_path / "out.ckpt", ["experiment=cifar10", "debug=smoke"])
    message = str(err.value)
    assert (
        "unknown keys: model.lpips.weight, something_else.weight, model.unet._orig_mod.nonsense.weight;"
        in message
    )
    assert "duplicate keys: model.unet._orig_mod.conv_out.bias;" in message
    assert "fid." not in message and "distance_loss" not in message
    assert "mis-shaped keys: model.unet.conv_out.weight (1, 2, 3, 3)" in message
    assert "missing keys: model.unet.conv_in.bias" in message  # named as the reference's file names keys
    assert message.count("model.unet.conv_out.weight") == 1  # mis-shaped, not also missing
    assert d_key in message
    with pytest.raises(ValueError, match="not a reference ACT checkpoint"):
        torch.save({"state_dict": {"weight": torch.zeros(1)}}, tmp_path / "foreign.ckpt")
        convert(tmp_path / "foreign.ckpt", tmp_path / "out.ckpt")


def test_torch_compiles_prefix_is_left_out_wherever_it_is_and_however_often():
    from act_lightning.convert_reference import plain

    assert plain("model._orig_mod.unet._orig_mod.conv_in.weight") == "model.unet.conv_in.weight"
    assert plain("model.unet.conv_in._orig_mod") == "model.unet.conv_in"
    assert plain("model.unet.x_orig_mod.weight") == "model.unet.x_orig_mod.weight"


def test_a_file_that_is_the_state_dict_itself_converts(reference, tmp_path):
    _, state, _ = reference
    path = tmp_path / "bare.ckpt"
    torch.save(state, path)  # no Lightning wrapper: the file is the state dict
    summary = convert(path, tmp_path / "out.ckpt", ["debug=smoke"])
    assert summary["experiment"] == "cifar10"
    saved = torch.load(tmp_path / "out.ckpt", weights_only=True)
    assert saved["act_weights_only"] is True and saved["act_converted_from"] == "bare.ckpt"
    assert saved["act_reference_iteration"] is None  # no Lightning wrapper, no global_step
    assert "${" not in json.dumps(saved["act_config"])  # resolved: read without Hydra's resolvers
    # its iteration is unknown, not 0: the tools say so, and a run starts from it (int(None) stopped it)
    from act_lightning.export import export

    assert export(tmp_path / "out.ckpt", tmp_path / "exported")["iteration"] is None
    card = (tmp_path / "exported" / "README.md").read_text()
    assert "(an iteration its file does not record; experiment `cifar10`)" in card
    run = tmp_path / "run"
    summary = train(
        compose(
            [*SMOKE, "data=synthetic", "eval=null", "iterations=2", f"ckpt_path={tmp_path / 'out.ckpt'}"],
            str(run),
        )
    )
    assert summary["finished"] and summary["iteration"] == 2
    started = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["act_history"][0][
        "started_from"
    ]
    assert started == {"checkpoint": "bare.ckpt", "reference_iteration": None}
    export(run / "checkpoints" / "last.ckpt", tmp_path / "tuned")
    released = (
        "`bare.ckpt` (trained by its reference code, kong13661/ACT, for a number of iterations its file does"
    )
    assert released in (tmp_path / "tuned" / "README.md").read_text()


def test_a_given_experiment_is_not_recognised_again(tmp_path):
    """With experiment= given, a generator of no recognisable depth is compared with that experiment's
    networks (and refused by its keys), not refused for its number of levels."""
    path = tmp_path / "shallow.ckpt"
    torch.save({"state_dict": {"model.unet.conv_in.weight": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match="a generator with 0 resolution levels: pass experiment=NAME"):
        convert(path, tmp_path / "out.ckpt", ["debug=smoke"])
    with pytest.raises(ValueError, match=r"does not match experiment cifar10's networks: mis-shaped keys"):
        convert(path, tmp_path / "out.ckpt", ["experiment=cifar10", "debug=smoke"])


def test_at_most_eight_keys_of_a_kind_are_named_and_how_many_more():
    own = {f"generator.k{i}": torch.zeros(1) for i in range(10)}
    converted, problems = rename_keys({}, own)
    names = ", ".join(f"generator.k{i}" for i in range(8))
    assert converted == {} and problems == [f"missing keys: {names} and 2 more"]
    converted, problems = rename_keys({"model.unet.x": torch.zeros(1)}, {"generator.unet.x": torch.zeros(1)})
    assert problems == [] and list(converted) == ["generator.unet.x"]


def test_the_command_refuses_a_foreign_file_in_one_line(tmp_path, capsys):
    from act_lightning.convert_reference import main

    torch.save({"state_dict": {"weight": torch.zeros(1)}}, tmp_path / "foreign.ckpt")
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "foreign.ckpt"), str(tmp_path / "out.ckpt")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and "not a reference ACT checkpoint" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.ckpt").exists()


def test_a_mistyped_override_is_refused_in_one_line_with_the_options(reference, tmp_path, capsys):
    """Hydra's composition errors (an unknown option of a group, a key not in the config) were a traceback."""
    from act_lightning.convert_reference import main

    _, _, path = reference
    said = {
        "experiment=cifar1O": "In 'train': Could not find 'experiment/cifar1O'; the options in 'experiment': "
        "cifar10, cifar10_diffusion,",
        "model.nosuch=1": "Could not override 'model.nosuch'. To append to your config use +model.nosuch=1",
    }
    for override, message in said.items():
        with pytest.raises(SystemExit) as stop:
            main([str(path), str(tmp_path / "out.ckpt"), override])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith(f"error: overrides {override}: {message}"), err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.ckpt").exists()


def test_an_existing_out_is_replaced_only_with_force_and_never_when_it_is_ckpt(reference, tmp_path, capsys):
    from act_lightning.convert_reference import main

    _, _, path = reference
    released = path.read_bytes()
    out = tmp_path / "cifar10_act.ckpt"
    out.write_bytes(b"a checkpoint of mine")
    link = tmp_path / "link.ckpt"
    link.symlink_to(path)
    refused = (
        ([str(path), str(out), *SMOKE], f"error: OUT={out} already exists: pass --force to replace it"),
        ([str(path), str(path), "--force", *SMOKE], f"error: OUT={path} is CKPT itself"),
        ([str(path), str(link), "--force", *SMOKE], f"error: OUT={link} is CKPT itself"),
        ([str(path), str(tmp_path), "--force", *SMOKE], f"error: OUT={tmp_path} is a folder: name the file"),
    )
    for argv, said in refused:
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2 and capsys.readouterr().err.startswith(said)
    assert out.read_bytes() == b"a checkpoint of mine" and path.read_bytes() == released
    assert main([str(path), str(out), "--force", *SMOKE]) == 0
    assert load_model(out)[0].k == 0 and path.read_bytes() == released


def test_the_command_takes_only_key_value_overrides_after_ckpt_and_out(tmp_path, capsys):
    from act_lightning.convert_reference import main

    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "in.ckpt"), str(tmp_path / "out.ckpt"), "debug=smoke", "cifar10"])
    assert stop.value.code == 2
    assert "cifar10: after CKPT and OUT, only key=value overrides" in capsys.readouterr().err


def test_a_converted_checkpoint_is_evaluated_sampled_and_exported(reference, tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from act_lightning.evaluate import evaluate
    from act_lightning.export import export
    from tests.conftest import CONF

    _, _, path = reference
    out = tmp_path / "cifar10_act.ckpt"
    convert(path, out, ["debug=smoke", "data=synthetic"])  # the stored config then reads no files
    overrides = [f"ckpt={out}", "eval.quantize=truncate"]  # the README's command
    overrides += ["num_samples=4", "batch_size=4", "samplers=[1-step]"]
    overrides += ["eval.inception_weights=random", "eval.reference=train", "eval.reference_max_images=8"]
    overrides += [f"output={tmp_path / 'eval.json'}"]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = hydra_compose("evaluate", overrides=overrides)
    summary = evaluate(cfg)
    # the reference's global_step 10 counts a generator and a discriminator step per iteration: 5 trained
    # the weights, which the commands report; the checkpoint itself is at 0, where training starts
    assert summary["results"]["1-step"]["fid"] > 0 and summary["iteration"] == 5
    assert summary["quantize"] == "truncate"
    assert export(out, tmp_path / "exported")["iteration"] == 5
    saved = torch.load(out, weights_only=True)
    assert int(saved["state_dict"]["iteration"]) == 0 and saved["act_reference_iteration"] == 5
    card = (tmp_path / "exported" / "README.md").read_text()
    assert "(iteration 5 of the reference's run; experiment `cifar10`)" in card  # not this config's length
    # trained by the reference code, not by this library
    assert "by the paper's reference code (kong13661/ACT; its checkpoint `cifar10_fid_6_0.ckpt`)" in card
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["converted_from"] == path.name
    # the reference's UNet predicts 6 channels, of which the image takes 3: so do the exported generator
    # and the diffusers pipeline built from the same folder
    from act_lightning import load_generator
    from act_lightning.export import ACTPipeline

    z = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    images = load_generator(tmp_path / "exported").sample(z)
    assert images.shape == (2, 3, 32, 32)
    assert torch.equal(ACTPipeline.from_pretrained(tmp_path / "exported")(noise=z), images)


def networks(state: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items() if k.startswith(tuple(NETWORKS.values()))}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_the_reference_networks_are_this_librarys_at_full_size(experiment):
    keys = reference_keys(experiment)
    with torch.device("meta"):  # full size: names and shapes, no memory
        model = instantiate(
            compose([f"experiment={experiment}"]).model, distance="l2", speed={"channels_last": False}
        )
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("distance.")}
    mapped = {ours(k): tuple(shape) for k, shape in keys.items() if ours(k) is not None}
    assert mapped == networks(own)  # every name, every shape
    others = {k.split(".")[0] for k in keys if ours(k) is None and not k.startswith("model_ema._disc")}
    assert others == {"distance_loss", "fid"}  # the loss's LPIPS and the FID metric, nothing else
    reference = {k: torch.empty(shape, device="meta") for k, shape in keys.items()}
    converted, problems = rename_keys(reference, own)
    assert not problems and set(converted) == set(networks(own))
    tiny = compose([f"experiment={experiment}", "debug=smoke", *full_size(experiment)]).model
    smoke = instantiate(tiny, distance="l2").state_dict()
    assert set(networks(smoke)) == set(mapped)  # the tiny networks of the test below have the same names


def lightning_entries() -> dict:
    """The top-level entries of a checkpoint written by the reference's Trainer (plain containers)."""
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizers = [torch.optim.RAdam([weight], lr=1e-4, betas=(0, 0.99)) for _ in range(2)]
    weight.grad = torch.ones(3)
    for optimizer in optimizers:
        optimizer.step()
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lr_lambda=lambda step: 1.0) for o in optimizers]
    checkpoint_callback = "ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 10000}"
    return {
        "epoch": 6,
        "global_step": 20000,
        "pytorch-lightning_version": "2.1.2",
        "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": 10000}}},
        "callbacks": {checkpoint_callback: {"best_model_path": "", "kth_value": torch.tensor(float("inf"))}},
        "optimizer_states": [o.state_dict() for o in optimizers],
        "lr_schedulers": [s.state_dict() for s in schedulers],
    }


@pytest.fixture(scope="module")
def reference_of():
    """experiment -> (a module with random tiny networks of the full-size names, its reference state:
    every key of the reference's checkpoint, the networks from the module, the rest one-element tensors
    of the reference's shapes)."""
    cache = {}

    def make(experiment):
        if experiment not in cache:
            torch.manual_seed(0)
            cfg = compose([f"experiment={experiment}", "debug=smoke", *full_size(experiment)])
            module = instantiate(cfg.model, distance="l2", speed={"channels_last": False})
            for p in module.target.parameters():  # a target that differs from the generator
                p.data.add_(0.01 * torch.randn_like(p))
            own = module.state_dict()
            state = {}
            for key, shape in reference_keys(experiment).items():
                name = ours(key.replace("model_ema._discriminator.", "model._discriminator."))
                state[key] = own[name].clone() if name is not None else torch.zeros(()).expand(shape)
            cache[experiment] = module, state
        return cache[experiment]

    return make


@pytest.mark.parametrize(
    ("experiment", "unet_compile"),
    [("cifar10", False), ("imagenet64", False), ("lsun_cat256", False), ("imagenet64", True)],
)
def test_every_key_of_a_reference_checkpoint_converts(reference_of, experiment, unet_compile, tmp_path):
    module, state = reference_of(experiment)
    if unet_compile:  # torch.compile's wrapper around the generator (and its deep-copied EMA)
        state = {k.replace(".unet.", ".unet._orig_mod.", 1): v for k, v in state.items()}
    path = tmp_path / "reference.ckpt"
    torch.save({"state_dict": state, **lightning_entries()}, path)
    out = tmp_path / "converted.ckpt"
    overrides = ["debug=smoke", *full_size(experiment)]  # the experiment is recognised from the generator
    summary = convert(path, out, overrides)
    assert summary["experiment"] == experiment and summary["tensors"] == len(networks(module.state_dict()))
    converted, _, _ = load_model(out)
    size = compose([f"experiment={experiment}"]).data.image_size
    x, sigma, labels = torch.randn(2, 3, size, size), torch.tensor([80.0, 0.5]), torch.tensor([3, 7])
    with torch.no_grad():
        for name in ("generator", "target"):
            torch.testing.assert_close(
                getattr(converted, name)(x, sigma, labels), getattr(module, name)(x, sigma, labels)
            )
    saved = torch.load(out, weights_only=True)["state_dict"]
    disc = {k[len("discriminator.") :]: v for k, v in saved.items() if k.startswith("discriminator.")}
    theirs = {k[len("model._discriminator.") :]: v for k, v in state.items() if k.startswith("model._disc")}
    assert disc.keys() == module.discriminator.state_dict().keys() == theirs.keys()
    assert all(torch.equal(v, theirs[k]) for k, v in disc.items())  # the reference's discriminator


def test_the_way_out_a_pickled_file_is_told_keeps_its_iteration(reference, tmp_path):
    """The released files hold Lightning's pickled callbacks and hyper-parameters beside the tensors; the
    refusal's recipe kept the state dict alone, so the converted file's iteration was lost (read as 0)."""
    import argparse
    import re

    _, state, _ = reference
    path = tmp_path / "cifar10_fid_6_0.ckpt"
    torch.save({"state_dict": state, "global_step": 10, "hyper_parameters": argparse.Namespace(lr=1)}, path)
    with pytest.raises(Exception, match="cannot be read with torch's safe loader") as refused:
        convert(path, tmp_path / "out.ckpt", ["debug=smoke"])
    recipe = re.search(r"with (c = torch\.load\(CKPT.*'weights\.ckpt'\))", str(refused.value)).group(1)
    exec(recipe.replace("CKPT", repr(str(path))).replace("'weights.ckpt'", repr(str(tmp_path / "w.ckpt"))))
    assert convert(tmp_path / "w.ckpt", tmp_path / "out.ckpt", ["debug=smoke"])["reference_iteration"] == 5
