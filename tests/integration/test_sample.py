"""`python -m act_lightning.sample`: the images of a checkpoint, reproducible by seed whatever the batch
size, in the ADM / EDM evaluators' npz layout, one or several steps, class-conditional or not."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from act_lightning.checkpoints import load_model, read_checkpoint
from act_lightning.consistency import karras_sigmas
from act_lightning.sample import check_taus, class_labels, image_noise, labels_record, two_step_tau
from act_lightning.seeds import LABEL, mix_seed
from act_lightning.train import train
from tests.conftest import CONF, ROOT, compose, refusal, run_module

TINY = ["debug=smoke", "data=synthetic", "iterations=2", "eval=null"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A quickstart-shaped (8x8 grey, unconditional) and a five-class checkpoint, two iterations each."""
    root = tmp_path_factory.mktemp("sample")
    runs = {
        "plain": TINY,
        "classes": [*TINY, "data.num_classes=5", "model.generator.num_class_embeds=5"],
    }
    for name, overrides in runs.items():
        train(compose(overrides, run_dir=str(root / name)))
    return {name: root / name / "checkpoints" / "last.ckpt" for name in runs}


def _sample(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from act_lightning.sample import sample

    with initialize_config_dir(str(CONF), version_base="1.3"):
        return sample(hydra_compose("sample", overrides=overrides))


def _arrays(path):
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def test_the_command_twice_gives_identical_samples(checkpoints, tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        args = [f"ckpt={checkpoints['plain']}", "num_samples=16", "seed=7", f"out={out}"]
        args += [f"hydra.run.dir={tmp_path / 'hydra'}"]
        result = run_module("sample", args, env={"PYTHONWARNINGS": "ignore"}, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        with Image.open(out / "grid.png") as grid:  # 16 images of 8 x 8 as 4 x 4 of 64 px (it was 42 px)
            assert grid.size == (4 * 64 + 5 * 2,) * 2
        outs.append(_arrays(out / "samples.npz"))
    assert list(outs[0]) == ["arr_0"]  # unconditional: no labels
    images = outs[0]["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (16, 8, 8, 1)
    assert np.array_equal(images, outs[1]["arr_0"])
    assert len({img.tobytes() for img in images}) == 16  # sixteen different images


def test_an_earlier_draw_is_kept_unless_overwrite_and_a_multiruns_jobs_each_write_their_own(
    checkpoints, tmp_path
):
    """A multirun given one out= left only its last job's samples, and a quick test into the folder of a 50k
    draw replaced it, without a word."""
    out = tmp_path / "draw"
    _sample([f"ckpt={checkpoints['plain']}", "num_samples=3", f"out={out}"])
    first = _arrays(out / "samples.npz")["arr_0"]
    with pytest.raises(ValueError, match="already holds samples.npz of an earlier call"):
        _sample([f"ckpt={checkpoints['plain']}", "num_samples=2", "seed=1", f"out={out}"])
    assert np.array_equal(_arrays(out / "samples.npz")["arr_0"], first)
    _sample([f"ckpt={checkpoints['plain']}", "num_samples=2", "seed=1", f"out={out}", "overwrite=true"])
    assert len(_arrays(out / "samples.npz")["arr_0"]) == 2
    sweep = tmp_path / "sweep"
    args = ["-m", f"ckpt={checkpoints['plain']}", "num_samples=2", "seed=0,1", f"hydra.sweep.dir={sweep}"]
    result = run_module("sample", args, env={"PYTHONWARNINGS": "ignore"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    seeds = [json.loads((sweep / str(job) / "sample.json").read_text())["seed"] for job in (0, 1)]
    assert seeds == [0, 1]


def test_the_images_do_not_depend_on_the_batch_size_and_are_the_modules_samples(checkpoints, tmp_path):
    ckpt = checkpoints["plain"]
    a = _sample([f"ckpt={ckpt}", "num_samples=10", "batch_size=10", f"out={tmp_path / 'a'}"])
    b = _sample([f"ckpt={ckpt}", "num_samples=12", "batch_size=3", f"out={tmp_path / 'b'}"])
    assert a["shape"] == [10, 8, 8, 1] and b["shape"] == [12, 8, 8, 1]
    first, second = _arrays(tmp_path / "a" / "samples.npz"), _arrays(tmp_path / "b" / "samples.npz")
    assert np.array_equal(first["arr_0"], second["arr_0"][:10])  # image i is image i
    # one step of the target network from image i's own noise, rounded to uint8
    model, run, checkpoint = load_model(ckpt)
    assert model.k == int(checkpoint["state_dict"]["iteration"]) > 0  # the module says its iteration
    assert f"iteration={model.k}/" in repr(model)
    x = model.sample(image_noise(0, range(10), (1, 8, 8)))
    expected = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(first["arr_0"], expected)


def test_taus_give_multistep_samples_and_bad_taus_are_refused(checkpoints, tmp_path):
    ckpt = checkpoints["plain"]
    one = _sample([f"ckpt={ckpt}", "num_samples=4", f"out={tmp_path / 'one'}"])
    two = _sample([f"ckpt={ckpt}", "num_samples=4", "taus=[0.821]", f"out={tmp_path / 'two'}"])
    sigma_max = load_model(ckpt)[0].schedule.sigma_max  # the quickstart's 20
    assert one["taus"] == [sigma_max] and two["taus"] == [sigma_max, 0.821]
    assert one["class_labels"] is None  # an unconditional model: no labels drawn
    a, b = _arrays(tmp_path / "one" / "samples.npz"), _arrays(tmp_path / "two" / "samples.npz")
    assert not np.array_equal(a["arr_0"], b["arr_0"])
    for taus in ("[1.0,2.0]", f"[{sigma_max + 1}]", "[0.001]"):
        with pytest.raises(ValueError, match="taus=.*must decrease and stay above sigma_min"):
            _sample([f"ckpt={ckpt}", "num_samples=2", f"taus={taus}", f"out={tmp_path / 'bad'}"])
    with pytest.raises(ValueError, match=r"taus=1.0: a list of noise levels, e.g. taus=\[0.821\]"):
        _sample([f"ckpt={ckpt}", "num_samples=2", "taus=1.0", f"out={tmp_path / 'bad'}"])
    with pytest.raises(ValueError, match="seed must be an integer, got 'abc'"):
        _sample([f"ckpt={ckpt}", "num_samples=2", "seed=abc", f"out={tmp_path / 'bad'}"])
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1, got 'abc'"):
        _sample([f"ckpt={ckpt}", "num_samples=abc", f"out={tmp_path / 'bad'}"])
    (tmp_path / "a_file").write_text("")
    with pytest.raises(NotADirectoryError, match=f"out={tmp_path / 'a_file'}: .* is not a folder"):
        _sample([f"ckpt={ckpt}", "num_samples=2", f"out={tmp_path / 'a_file'}"])


def test_class_labels_random_one_class_or_a_list_and_their_errors(checkpoints, tmp_path):
    ckpt = checkpoints["classes"]
    _sample([f"ckpt={ckpt}", "num_samples=40", f"out={tmp_path / 'r'}"])
    labels = _arrays(tmp_path / "r" / "samples.npz")["arr_1"]
    assert labels.dtype == np.int64 and labels.shape == (40,) and set(labels) == set(range(5))
    assert json.loads((tmp_path / "r" / "sample.json").read_text())["class_labels"] == "random"
    _sample([f"ckpt={ckpt}", "num_samples=3", "class_labels=4", f"out={tmp_path / 'one'}"])
    assert _arrays(tmp_path / "one" / "samples.npz")["arr_1"].tolist() == [4, 4, 4]
    _sample([f"ckpt={ckpt}", "num_samples=5", "class_labels=[0,2]", f"out={tmp_path / 'list'}"])
    assert _arrays(tmp_path / "list" / "samples.npz")["arr_1"].tolist() == [0, 2, 0, 2, 0]
    for out, given in (("one", [4]), ("list", [0, 2])):  # what was asked, repeated over the images
        assert json.loads((tmp_path / out / "sample.json").read_text())["class_labels"] == given
    with pytest.raises(ValueError, match=r"class_labels=7: \[7\] out of range for 5 classes"):
        _sample([f"ckpt={ckpt}", "num_samples=2", "class_labels=7", f"out={tmp_path / 'x'}"])
    with pytest.raises(ValueError, match="class_labels=3: this model is unconditional"):
        _sample([f"ckpt={checkpoints['plain']}", "num_samples=2", "class_labels=3", f"out={tmp_path / 'y'}"])


def test_a_missing_or_foreign_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt=.*nope.ckpt: no such checkpoint file"):
        _sample([f"ckpt={tmp_path / 'nope.ckpt'}", f"out={tmp_path}"])
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(1)}, foreign)
    with pytest.raises(ValueError, match="not a checkpoint written by act_lightning.train"):
        _sample([f"ckpt={foreign}", f"out={tmp_path}"])
    run = tmp_path / "run"  # a run folder given for its checkpoint: the files it holds are named
    (run / "checkpoints").mkdir(parents=True)
    for name in ("last.ckpt", "best.ckpt"):
        (run / "checkpoints" / name).write_bytes(b"")
    checkpoints = f"{run / 'checkpoints' / 'best.ckpt'}, {run / 'checkpoints' / 'last.ckpt'}"
    with pytest.raises(
        IsADirectoryError, match=f"^ckpt={run}: a folder, not a checkpoint file: it holds {checkpoints}$"
    ):
        _sample([f"ckpt={run}", f"out={tmp_path / 'out'}"])
    exported, diffusers = tmp_path / "exported", tmp_path / "ddpm"  # the folders a user may take for one
    (exported / "unet").mkdir(parents=True)
    (exported / "model.safetensors").write_bytes(b"")
    (diffusers / "unet").mkdir(parents=True)
    with pytest.raises(IsADirectoryError, match="an exported generator, which act_lightning.load_generator"):
        _sample([f"ckpt={exported}", f"out={tmp_path / 'out'}"])
    with pytest.raises(
        IsADirectoryError, match=rf"a diffusers model\? convert it first: python -m .* {diffusers}"
    ):
        _sample([f"ckpt={diffusers}", f"out={tmp_path / 'out'}"])
    with pytest.raises(IsADirectoryError, match=r"OUT.ckpt \(then init_from=OUT.ckpt\)$"):
        read_checkpoint(diffusers, "init_from")
    result = run_module("convert_reference", [str(run), str(tmp_path / "converted.ckpt")], timeout=120)
    assert result.returncode == 2 and result.stderr.startswith(
        f"error: CKPT={run}: a folder, not a checkpoint"
    )


def test_ckpt_null_and_out_null_are_refused_in_one_line_by_every_command(checkpoints, tmp_path):
    """`ckpt=null` raised pathlib's TypeError (a traceback) and `out=null` wrote into a folder named None."""
    image = tmp_path / "digit.png"
    Image.new("L", (8, 8)).save(image)
    hydra = f"hydra.run.dir={tmp_path / 'hydra'}"
    for command in ("sample", "edit", "export", "evaluate"):
        args = [hydra, "ckpt=null", *([f"out={tmp_path / 'out'}"] if command != "evaluate" else [])]
        said = refusal(run_module(command, [*args, *([f"input={image}"] if command == "edit" else [])]))
        assert said == "error: ckpt=null: give ckpt=PATH, a checkpoint file", (command, said)
        # and none given at all (sample said it with a traceback)
        said = refusal(run_module(command, [hydra, *([f"input={image}"] if command == "edit" else [])]))
        assert said == "error: ckpt is required: give ckpt=... (--help lists the options)", (command, said)
    for command in ("sample", "edit", "export"):
        args = [
            hydra,
            f"ckpt={checkpoints['plain']}",
            "out=null",
            *([f"input={image}"] if command == "edit" else []),
        ]
        assert (
            refusal(run_module(command, args)) == "error: out=null: give out=FOLDER, the folder to write into"
        )
    assert not (ROOT / "None").exists() and not Path("None").exists()


def test_help_lists_the_commands_own_options():
    # a new interpreter: `python -m act_lightning.sample` itself starts (the other tests run it in-process)
    result = run_module("sample", ["--help"], timeout=120, own_process=True)
    assert result.returncode == 0, result.stderr[-3000:]
    for key in ("python -m act_lightning.sample ckpt=PATH", "num_samples:", "taus:", "class_labels:", "net:"):
        assert key in result.stdout, key
    assert "model:" not in result.stdout  # the training options are not this command's


@pytest.mark.slow
def test_every_entry_point_is_a_console_script_with_its_own_help():
    # the installed package's scripts (pyproject.toml's [project.scripts] as pip installed them; read from
    # its metadata, which works on every supported Python, where tomllib needs 3.11)
    dist = importlib.metadata.distribution("act-lightning")
    scripts = {e.name: e.value for e in dist.entry_points if e.group == "console_scripts"}
    modules = {
        "train",
        "evaluate",
        "prepare",
        "sample",
        "edit",
        "export",
        "convert_reference",
        "convert_diffusers",
        "report",
    }
    assert scripts == {f"act-{m.replace('_', '-')}": f"act_lightning.{m}:main" for m in modules}
    bin_dir = os.path.dirname(sys.executable)
    commands = (
        ("act-sample", "num_samples:"),
        ("act-edit", "box:"),
        ("act-prepare", "usage"),
        ("act-train", "python -m act_lightning.train [experiment=NAME]"),
    )
    others = (
        ("act-export", "ckpt=PATH out=DIR"),
        ("act-convert-reference", "CKPT OUT"),
        ("act-convert-diffusers", "DIR OUT"),
        ("act-report", "--out"),
    )
    for i, (name, own) in enumerate((*commands, *others)):
        path = Path(bin_dir) / name
        assert os.access(path, os.X_OK), f"{name} is not installed next to {sys.executable}"
        if i == 0:  # as the shell starts it (its #! line)
            result = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
        else:  # the others' wrappers (pip's, the same lines but the import) run in this process
            result = run_module(path, ["--help"], timeout=120)
        assert result.returncode == 0 and own in result.stdout, (name, result.stderr[-2000:])


def test_the_readmes_shell_completion_installs_and_completes_a_choice():
    act_train = str(Path(os.path.dirname(sys.executable)) / "act-train")
    installed = subprocess.run(
        [act_train, "-sc", "install=bash"], capture_output=True, text=True, timeout=120
    )
    assert (
        installed.returncode == 0
        and "complete -o nospace -o default -F hydra_bash_completion act-train" in (installed.stdout)
    )
    env = {**os.environ, "COMP_LINE": "act-train variant=ec"}
    query = subprocess.run(
        [act_train, "-sc", "query=bash"], capture_output=True, text=True, timeout=120, env=env
    )
    assert query.stdout.split() == ["variant=ect", "variant=ect_act", "variant=ect_staged"]


def test_a_diffusion_model_samples_with_heun_and_says_so(tmp_path):
    run = tmp_path / "diffusion"
    train(compose(["experiment=quickstart_diffusion", "debug=smoke", "model.heun_steps=3"], run_dir=str(run)))
    ckpt = run / "checkpoints" / "last.ckpt"
    summary = _sample([f"ckpt={ckpt}", f"out={tmp_path / 'out'}", "num_samples=3"])
    assert (summary["sampler"], summary["heun_steps"]) == ("heun", 3) and "taus" not in summary  # Heun's
    assert _arrays(tmp_path / "out" / "samples.npz")["arr_0"].shape == (3, 8, 8, 1)
    with pytest.raises(ValueError, match="Heun sampler over model.heun_steps=3 levels"):
        _sample([f"ckpt={ckpt}", f"out={tmp_path / 'two'}", "num_samples=3", "taus=[1.0]"])
    assert not (tmp_path / "two").exists()  # refused before its folder was made


def test_check_taus_refuses_a_repeated_level_and_levels_at_sigma_max_or_sigma_min():
    assert check_taus([5.0, 0.8], 0.002, 80.0) == [5.0, 0.8] and check_taus([], 0.002, 80.0) == []
    for taus in ([1.0, 1.0], [80.0], [0.002], [5.0, 0.002]):
        with pytest.raises(ValueError, match="must decrease and stay above sigma_min"):
            check_taus(taus, 0.002, 80.0)
    with pytest.raises(ValueError, match=r"sigma_max itself is not listed, as sample.json records it"):
        check_taus([80.0, 0.8], 0.002, 80.0)  # the levels as sample.json records them


def test_class_labels_accept_the_last_class_and_refuse_the_next():
    assert class_labels(4, 3, 5, 0).tolist() == [4, 4, 4]
    assert class_labels([0, 4], 3, 5, 0).tolist() == [0, 4, 0]
    for bad in (5, [0, 5], -1):
        with pytest.raises(ValueError, match="out of range for 5 classes"):
            class_labels(bad, 3, 5, 0)


def test_class_labels_may_be_the_names_a_folder_run_recorded():
    names = ["cat", "dog", "fox"]
    assert class_labels("fox", 2, 3, 0, names).tolist() == [2, 2]
    assert class_labels(["dog", 0], 3, 3, 0, names).tolist() == [1, 0, 1]  # names and indices mixed
    assert labels_record(["dog", 0], None, names) is None  # unconditional: nothing drawn
    assert labels_record(["dog", 0], torch.tensor([1, 0]), names) == [1, 0]
    with pytest.raises(ValueError, match=r"no class is called 'wolf'; this model's classes: cat, dog, fox"):
        class_labels("wolf", 2, 3, 0, names)
    with pytest.raises(ValueError, match=r"'dog' is no class index, and this model's classes have no names"):
        class_labels("dog", 2, 3, 0)


def test_each_sampling_step_draws_an_images_noise_from_its_own_stream():
    shape = (1, 4, 4)
    first, second = image_noise(3, range(2), shape), image_noise(3, range(2), shape, stream=1)
    assert not torch.equal(first, second)  # a later step's noise is not the first step's again
    for stream, noise in enumerate((first, second)):
        for i in range(2):  # image i's noise of step `stream`: the generator seeded by (seed, i, stream)
            g = torch.Generator().manual_seed(mix_seed(3, i, stream))
            assert torch.equal(noise[i], torch.randn(shape, generator=g))


def test_the_default_two_step_tau_is_t_22_of_the_reference_40_level_grid():
    reference = karras_sigmas(40, 0.002, 80.0, 7.0).flip(0)[22].item()  # openai/consistency_models' ts
    assert two_step_tau(OmegaConf.create({})) == pytest.approx(reference, abs=5e-5)
    assert two_step_tau(OmegaConf.create({"two_step_tau": 8.0})) == 8.0


def test_a_folder_runs_classes_are_sampled_by_their_names(checkpoints, tmp_path):
    checkpoint = torch.load(checkpoints["classes"], map_location="cpu", weights_only=True)
    checkpoint["act_label_names"] = ["ant", "bee", "cat", "dog", "eel"]  # as a folder run records them
    named = tmp_path / "named.ckpt"
    torch.save(checkpoint, named)
    summary = _sample([f"ckpt={named}", "num_samples=3", "class_labels=[dog,ant]", f"out={tmp_path / 's'}"])
    assert _arrays(tmp_path / "s" / "samples.npz")["arr_1"].tolist() == [3, 0, 3]
    assert summary["class_labels"] == [3, 0]


def test_each_image_of_a_batch_gets_its_own_class_label(checkpoints, tmp_path):
    ckpt = checkpoints["classes"]
    labels = "class_labels=[0,1,2,3,4]"
    _sample([f"ckpt={ckpt}", "num_samples=5", "batch_size=5", labels, f"out={tmp_path / 'one'}"])
    _sample([f"ckpt={ckpt}", "num_samples=5", "batch_size=2", labels, f"out={tmp_path / 'three'}"])
    one, three = _arrays(tmp_path / "one" / "samples.npz"), _arrays(tmp_path / "three" / "samples.npz")
    assert one["arr_1"].tolist() == three["arr_1"].tolist() == [0, 1, 2, 3, 4]
    assert np.array_equal(one["arr_0"], three["arr_0"])  # image i is conditioned on label i in any batch


def test_random_class_labels_come_from_their_own_stream_per_image():
    labels = class_labels("random", 6, 10, 3)
    for i, label in enumerate(labels.tolist()):  # image i's label: the generator seeded by (seed, i, LABEL)
        g = torch.Generator().manual_seed(mix_seed(3, i, LABEL))
        assert label == torch.randint(10, (), generator=g).item()
    assert torch.equal(class_labels(None, 6, 10, 3), labels)  # null is random
    assert torch.equal(class_labels("random", 4, 10, 3), labels[:4])  # whatever the number of images


@pytest.mark.parametrize(
    "command",
    [
        "report",
        "convert_reference",
        "convert_diffusers",
        "prepare",
        *sorted((ROOT / "benchmarks").glob("*.py")),
    ],
    ids=lambda c: getattr(c, "name", c),
)
def test_each_argparse_help_describes_the_command_in_whole_sentences(command):
    """The description under `usage:` is the command's docstring's first paragraph (or more), never
    its first line alone, which stopped mid-sentence ("... against ACT iterations and"). `report` and
    `prepare` start as `python -m act_lightning.<command>` here (a process of its own), as each of the other
    commands does in one test of its own."""
    own_process = command in ("report", "prepare")
    result = run_module(command, ["--help"], timeout=120, own_process=own_process)
    assert result.returncode == 0, result.stderr[-2000:]
    description = result.stdout.split("\n\n")[1]
    assert not description.startswith(("usage", "options", "positional")), result.stdout[:2000]
    assert description.rstrip().endswith((".", "?", ")")), description
