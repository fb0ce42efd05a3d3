"""Zero-shot editing (`python -m act_lightning.edit`): the known part of every image is kept, the model
fills in the rest; bad inputs are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from act_lightning.samplers import LUMINANCE, colorize_projection, inpaint_projection, superres_projection
from act_lightning.train import train
from tests.conftest import CONF, compose, run_module

TINY = ["debug=smoke", "data=synthetic", "iterations=2", "eval=null"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """An 8x8 grey quickstart-shaped checkpoint and a 32x32 colour (CIFAR-10-shaped) one."""
    root = tmp_path_factory.mktemp("edit")
    runs = {"grey": TINY, "rgb": ["experiment=cifar10", *TINY, "model.distance=pseudo_huber"]}
    for name, overrides in runs.items():
        train(compose(overrides, run_dir=str(root / name)))
    return {name: root / name / "checkpoints" / "last.ckpt" for name in runs}


def _images(folder, n: int, size: int, mode: str = "L", seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i}.png")
    return folder


def _edit(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from act_lightning.edit import edit

    with initialize_config_dir(str(CONF), version_base="1.3"):
        return edit(hydra_compose("edit", overrides=overrides))


def _result(out):
    with np.load(out / "result.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def test_the_inpaint_command_keeps_every_known_pixel(checkpoints, tmp_path):
    images = _images(tmp_path / "in", 3, 8)
    out = tmp_path / "out"
    args = ["task=inpaint", f"ckpt={checkpoints['grey']}", f"input={images}", f"out={out}"]
    args += [f"hydra.run.dir={tmp_path / 'hydra'}"]
    # a new interpreter: `python -m act_lightning.edit` itself starts (its only test through the command)
    result = run_module("edit", args, env={"PYTHONWARNINGS": "ignore"}, timeout=300, own_process=True)
    assert result.returncode == 0, result.stderr[-3000:]
    r = _result(out)
    assert r["input"].shape == r["output"].shape == (3, 8, 8, 1) and r["output"].dtype == np.uint8
    mask = r["mask"]
    assert mask.shape == (3, 8, 8) and mask.dtype == bool
    assert (~mask).sum() == 3 * 16 and not mask[:, 2:6, 2:6].any()  # default: the centre 4x4 is unknown
    assert np.array_equal(r["output"][mask], r["input"][mask])
    assert not np.array_equal(r["output"][~mask], r["input"][~mask])  # the unknown part was filled in
    # the panels show the unknown square mid-grey (it was black, which dark images hid) and the known
    # pixels as they are: the first input's panel, enlarged 8x from 8 x 8, behind a 2-pixel border
    with Image.open(out / "panels.png") as panels:
        first = np.asarray(panels.convert("L"))[2:66, 2:66]
    assert (np.abs(first[16:48, 16:48].astype(int) - 128) <= 1).all()
    assert np.array_equal(first[::8, ::8][mask[0]], r["input"][0, ..., 0][mask[0]])


@pytest.mark.parametrize("task", ["inpaint", "superres"])
def test_edits_in_batches_are_the_edits_of_one_pass(checkpoints, tmp_path, task, monkeypatch):
    # the whole folder went through the network in one pass (a GPU ran out of memory at a few hundred
    # 256 x 256 images); each image's noise is its own, so batches of 2 of 5 images edit the same
    from act_lightning import edit as edit_module

    passes, edit_once = [], edit_module.zero_shot_edit
    monkeypatch.setattr(
        edit_module, "zero_shot_edit", lambda *a, **k: passes.append(a[2][0]) or edit_once(*a, **k)
    )
    images = _images(tmp_path / "in", 5, 32, mode="RGB")
    common = [f"task={task}", f"ckpt={checkpoints['rgb']}", f"input={images}", "steps=3"]
    _edit([*common, f"out={tmp_path / 'one'}"])
    _edit([*common, "batch_size=2", f"out={tmp_path / 'batches'}"])
    assert passes == [5, 2, 2, 1]  # the images of each pass: all at the default 64, then 2 at a time
    one, batches = _result(tmp_path / "one"), _result(tmp_path / "batches")
    assert one["output"].shape == (5, 32, 32, 3) and np.array_equal(one["mask"], batches["mask"])
    assert np.abs(one["output"].astype(int) - batches["output"].astype(int)).max() <= 1  # float rounding
    with pytest.raises(ValueError, match="batch_size"):
        _edit([*common, "batch_size=0", f"out={tmp_path / 'none'}"])


def test_inpaint_with_a_box_or_a_mask_image(checkpoints, tmp_path):
    images = _images(tmp_path / "in", 2, 8)
    _edit([f"ckpt={checkpoints['grey']}", f"input={images}", "box=[0,0,8,3]", f"out={tmp_path / 'box'}"])
    r = _result(tmp_path / "box")
    assert not r["mask"][:, :, :3].any() and r["mask"][:, :, 3:].all()
    record = json.loads((tmp_path / "box" / "edit.json").read_text())  # what it takes to edit so again
    assert (record["box"], record["mask"], record["seed"], record["net"]) == ([0, 0, 8, 3], None, 0, "target")
    assert record["checkpoint"] == str(Path(checkpoints["grey"]).resolve()) and record["iteration"] >= 1
    assert np.array_equal(r["output"][r["mask"]], r["input"][r["mask"]])
    known = np.zeros((8, 8), dtype=np.uint8)
    known[::2] = 255  # every other row known
    Image.fromarray(known, "L").save(tmp_path / "mask.png")
    _edit(
        [
            f"ckpt={checkpoints['grey']}",
            f"input={images}",
            f"mask={tmp_path / 'mask.png'}",
            f"out={tmp_path / 'm'}",
        ]
    )
    r = _result(tmp_path / "m")
    assert np.array_equal(r["mask"][0], known > 0)
    assert np.array_equal(r["output"][r["mask"]], r["input"][r["mask"]])


def test_colorize_keeps_the_luminance_and_superres_the_patch_means(checkpoints, tmp_path):
    grey = _images(tmp_path / "grey", 2, 32)
    _edit(["task=colorize", f"ckpt={checkpoints['rgb']}", f"input={grey}", f"out={tmp_path / 'c'}"])
    r = _result(tmp_path / "c")
    assert r["input"].shape == r["output"].shape == (2, 32, 32, 3)
    luminance = r["output"].astype(float) @ np.array(LUMINANCE)
    # to one uint8 level (each channel's rounding), except where a channel had to be clipped to [0, 255]
    inside = ((r["output"] > 0) & (r["output"] < 255)).all(-1)
    assert inside.mean() > 0.5 and np.abs(luminance - r["input"][..., 0])[inside].max() <= 1.0
    assert r["output"].std(-1).max() > 0 and not r["mask"].any()  # colour where there was none
    # a colour input: PIL's own grey level ("L") of the output equals the input's
    rgb = _images(tmp_path / "rgb", 2, 32, "RGB", seed=1)
    _edit(["task=colorize", f"ckpt={checkpoints['rgb']}", f"input={rgb}", f"out={tmp_path / 'c3'}"])
    r = _result(tmp_path / "c3")
    inside = ((r["output"] > 0) & (r["output"] < 255)).all(-1)
    for i in range(2):
        out_grey, in_grey = (
            np.asarray(Image.fromarray(r[k][i]).convert("L"), float) for k in ("output", "input")
        )
        assert np.abs(out_grey - in_grey)[inside[i]].max() <= 1.0

    small = _images(tmp_path / "small", 2, 4)  # 4x4 inputs for the 8x8 model, factor 2
    _edit(
        [
            "task=superres",
            "factor=2",
            f"ckpt={checkpoints['grey']}",
            f"input={small}",
            f"out={tmp_path / 's'}",
        ]
    )
    r = _result(tmp_path / "s")
    assert r["input"].shape == (2, 4, 4, 1) and r["output"].shape == (2, 8, 8, 1)
    patches = r["output"][..., 0].astype(float).reshape(2, 4, 2, 4, 2)
    # exact up to uint8 rounding, except in patches where a pixel had to be clipped to [0, 255]
    inside = ((patches > 0) & (patches < 255)).all((2, 4))
    errors = np.abs(patches.mean((2, 4)) - r["input"][..., 0])[inside]
    assert inside.mean() > 0.3 and errors.max() <= 1.0

    # factor 8, the reference's (8x8 patches): 4x4 colour inputs for the 32x32 model
    tiny = tmp_path / "tiny"  # mid-range colours: fewer 8x8 patches where a pixel clips
    tiny.mkdir()
    for i, image in enumerate(np.random.default_rng(2).integers(96, 160, (2, 4, 4, 3), dtype=np.uint8)):
        Image.fromarray(image, "RGB").save(tiny / f"{i}.png")
    summary = _edit(
        ["task=superres", "factor=8", f"ckpt={checkpoints['rgb']}", f"input={tiny}", f"out={tmp_path / 's8'}"]
    )
    r = _result(tmp_path / "s8")
    assert r["input"].shape == (2, 4, 4, 3) and r["output"].shape == (2, 32, 32, 3) and summary["out"]
    assert summary["factor"] == 8 and "box" not in summary
    patches = r["output"].astype(float).reshape(2, 4, 8, 4, 8, 3)
    inside = ((patches > 0) & (patches < 255)).all((2, 4))
    assert inside.mean() > 0.3 and np.abs(patches.mean((2, 4)) - r["input"])[inside].max() <= 1.0


def test_superres_of_a_full_size_input_keeps_its_patch_means_and_net_picks_the_network(checkpoints, tmp_path):
    """A full-size input to superres is averaged down first (each 2x2 patch's mean kept); a mask pixel of
    grey level 1 is known; net=generator samples the online network, which differs from the target."""
    ckpt = checkpoints["grey"]
    full = _images(tmp_path / "full", 2, 8)
    _edit(["task=superres", "factor=2", f"ckpt={ckpt}", f"input={full}", f"out={tmp_path / 's'}"])
    r = _result(tmp_path / "s")
    patches = r["output"][..., 0].astype(float).reshape(2, 4, 2, 4, 2)
    means = r["input"][..., 0].astype(float).reshape(2, 4, 2, 4, 2).mean((2, 4))
    inside = ((patches > 0) & (patches < 255)).all((2, 4))
    assert inside.mean() > 0.3 and np.abs(patches.mean((2, 4)) - means)[inside].max() <= 1.0

    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:, :3] = 1  # the faintest non-zero grey: known
    Image.fromarray(mask, "L").save(tmp_path / "mask.png")
    common = [f"ckpt={ckpt}", f"input={full}", f"mask={tmp_path / 'mask.png'}"]
    _edit([*common, f"out={tmp_path / 't'}"])
    target = _result(tmp_path / "t")
    assert target["mask"][:, :, :3].all() and not target["mask"][:, :, 3:].any()
    # the same checkpoint with the online generator's weights moved: the target's edit is unchanged
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    for key, value in checkpoint["state_dict"].items():
        if key.startswith("generator.") and value.is_floating_point():
            value.add_(0.05)
    torch.save(checkpoint, tmp_path / "moved.ckpt")
    moved = [f"ckpt={tmp_path / 'moved.ckpt'}", *common[1:]]
    _edit([*moved, f"out={tmp_path / 'mt'}"])
    _edit([*moved, "net=generator", f"out={tmp_path / 'mg'}"])
    assert np.array_equal(_result(tmp_path / "mt")["output"], target["output"])
    assert not np.array_equal(_result(tmp_path / "mg")["output"], target["output"])


def test_the_projections_keep_the_known_part_exactly():
    torch.manual_seed(0)
    y, x = torch.rand(2, 2, 3, 8, 8) * 2 - 1
    mask = torch.rand(2, 8, 8) > 0.5
    out = inpaint_projection(y, mask)(x)
    assert torch.equal(out[mask.unsqueeze(1).expand_as(out)], y[mask.unsqueeze(1).expand_as(y)])
    assert torch.equal(out[~mask.unsqueeze(1).expand_as(out)], x[~mask.unsqueeze(1).expand_as(x)])
    out = colorize_projection(y)(x)
    weights = torch.tensor(LUMINANCE).view(1, 3, 1, 1)
    torch.testing.assert_close((out * weights).sum(1), (y * weights).sum(1))  # the luminance is y's
    # ... and nothing else changes: the difference to x lies along the luminance axis
    change = out - x
    torch.testing.assert_close(
        change, (change * weights).sum(1, keepdim=True) * weights / weights.square().sum()
    )
    # the reference's construction: an orthogonal Q whose first column is the unit luminance axis; keep
    # y's first coordinate in that basis and x's others (openai/consistency_models, iterative_colorization)
    q, _ = torch.linalg.qr(torch.cat([weights.view(3, 1), torch.eye(3)[:, 1:]], 1).double())
    coords = lambda images: torch.einsum("bchw,cd->bdhw", images.double(), q)  # noqa: E731
    kept = torch.cat([coords(y)[:, :1], coords(x)[:, 1:]], 1)
    torch.testing.assert_close(out.double(), torch.einsum("bdhw,cd->bchw", kept, q))
    out = superres_projection(y, 4)(x)
    pool = torch.nn.functional.avg_pool2d
    torch.testing.assert_close(pool(out, 4), pool(y, 4))


def test_a_grey_image_with_alpha_is_grey(checkpoints, tmp_path):
    """A grey PNG with an alpha channel (mode LA) is a grey image: a grey model edits it, alpha dropped."""
    folder = tmp_path / "in"
    folder.mkdir()
    grey = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(np.stack([grey, np.full_like(grey, 128)], axis=-1), "LA").save(folder / "0.png")
    _edit([f"ckpt={checkpoints['grey']}", f"input={folder}", f"out={tmp_path / 'out'}"])
    r = _result(tmp_path / "out")
    assert r["input"].shape == r["output"].shape == (1, 8, 8, 1)
    assert np.array_equal(r["input"][0, :, :, 0], grey)  # the grey values, without the alpha
    assert np.array_equal(r["output"][r["mask"]], r["input"][r["mask"]])


def test_a_16_bit_grey_image_is_read_at_its_levels_not_clipped_to_black_and_white(checkpoints, tmp_path):
    """Pillow's own conversion of a 16-bit grey image (I;16) clips every level above 255 to white: the
    edit read a black-and-white image. Its levels are scaled to 8 bits, as the training data's are."""
    grey = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    for name, array in (("8", grey), ("16", grey.astype(np.uint16) * 257)):
        (tmp_path / name).mkdir()
        Image.fromarray(array).save(tmp_path / name / "0.png")
        _edit([f"ckpt={checkpoints['grey']}", f"input={tmp_path / name}", f"out={tmp_path / ('out' + name)}"])
    assert Image.open(tmp_path / "16" / "0.png").mode.startswith("I")
    assert np.array_equal(_result(tmp_path / "out16")["input"][0, :, :, 0], grey)
    assert np.array_equal(_result(tmp_path / "out16")["output"], _result(tmp_path / "out8")["output"])


def test_bad_inputs_are_named(checkpoints, tmp_path):
    ckpt = checkpoints["grey"]
    images = _images(tmp_path / "in", 1, 8)
    with pytest.raises(ValueError, match=r"input=.*0.png: 16x16 pixels; this model needs 8x8"):
        _edit([f"ckpt={ckpt}", f"input={_images(tmp_path / 'big', 1, 16)}", f"out={tmp_path}"])
    needs = r"this model needs 2x2 \(task=superres factor=4; or 8x8, averaged down to 2x2\)"
    with pytest.raises(ValueError, match=rf"input=.*0.png: 4x4 pixels; {needs}"):
        small = _images(tmp_path / "small", 1, 4)
        _edit(["task=superres", "factor=4", f"ckpt={ckpt}", f"input={small}", f"out={tmp_path}"])
    mixed = _images(tmp_path / "mixed", 1, 2)  # 0.png low-resolution, 1.png full size: the first decides
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8), "L").save(mixed / "1.png")
    needs = r"2x2 like the first input, 0.png \(task=superres factor=4: all inputs 2x2, or all 8x8 averaged"
    with pytest.raises(ValueError, match=rf"input=.*1.png: 8x8 pixels; this model needs {needs}"):
        _edit(["task=superres", "factor=4", f"ckpt={ckpt}", f"input={mixed}", f"out={tmp_path}"])
    with pytest.raises(ValueError, match=r"input=.*0.png: a colour image \(RGB\); this model makes grey"):
        _edit([f"ckpt={ckpt}", f"input={_images(tmp_path / 'rgb', 1, 8, 'RGB')}", f"out={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="input=.*nowhere: no such image file or folder"):
        _edit([f"ckpt={ckpt}", f"input={tmp_path / 'nowhere'}", f"out={tmp_path}"])
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8), "L").save(tmp_path / "small_mask.png")
    with pytest.raises(ValueError, match=r"mask=.*small_mask.png: 4x4 pixels; the images are 8x8"):
        _edit([f"ckpt={ckpt}", f"input={images}", f"mask={tmp_path / 'small_mask.png'}", f"out={tmp_path}"])
    (tmp_path / "junk.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"mask=.*junk.png: not a readable image \(cannot identify"):
        _edit([f"ckpt={ckpt}", f"input={images}", f"mask={tmp_path / 'junk.png'}", f"out={tmp_path}"])
    with pytest.raises(IsADirectoryError, match=r"mask=.*in: a folder; give one mask image"):
        _edit([f"ckpt={ckpt}", f"input={images}", f"mask={images}", f"out={tmp_path}"])
    quarter = _images(tmp_path / "quarter", 2, 4)  # neither 2x2 nor 8x8: not "like the first input"
    with pytest.raises(ValueError, match=r"input=.*0.png: 4x4 pixels; this model needs 2x2 \(task=superres"):
        _edit(["task=superres", "factor=4", f"ckpt={ckpt}", f"input={quarter}", f"out={tmp_path}"])
    with pytest.raises(ValueError, match=r"box=\[6, 6, 4, 4\] does not fit a 8x8 image"):
        _edit([f"ckpt={ckpt}", f"input={images}", "box=[6,6,4,4]", f"out={tmp_path}"])
    with pytest.raises(ValueError, match="factor must be one of 2, 4, 8 and divide the image size 8; got 3"):
        _edit(["task=superres", "factor=3", f"ckpt={ckpt}", f"input={images}", f"out={tmp_path}"])
    with pytest.raises(ValueError, match="task=colorize needs a colour model"):
        _edit(["task=colorize", f"ckpt={ckpt}", f"input={images}", f"out={tmp_path}"])
    with pytest.raises(ValueError, match="task must be one of inpaint, colorize, superres"):
        _edit(["task=deblur", f"ckpt={ckpt}", f"input={images}", f"out={tmp_path}"])
    with pytest.raises(ValueError, match="net must be target or generator, got 'targte'"):
        _edit(["net=targte", f"ckpt={ckpt}", f"input={images}", f"out={tmp_path}"])
    with pytest.raises(ValueError, match="seed must be an integer, got 1.5"):
        _edit(["seed=1.5", f"ckpt={ckpt}", f"input={images}", f"out={tmp_path}"])
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 'abc'"):
        _edit(["steps=abc", f"ckpt={ckpt}", f"input={images}", f"out={tmp_path}"])
    with pytest.raises(ValueError, match="factor must be one of 2, 4, 8 and divide the image size 8; got x"):
        _edit(["task=superres", "factor=x", f"ckpt={ckpt}", f"input={images}", f"out={tmp_path}"])
    from act_lightning.edit import class_index

    assert class_index(4, 5, None) == 4 and class_index(None, None, None) is None
    assert class_index("b", 5, ["a", "b", "c", "d", "e"]) == 1
    with pytest.raises(ValueError, match=r"class_label=3: this model is unconditional"):
        _edit(["class_label=3", f"ckpt={ckpt}", f"input={images}", f"out={tmp_path / 'labelled'}"])
    for bad in (5, -1):
        with pytest.raises(ValueError, match=rf"class_label={bad} out of range for 5 classes \(0..4\)"):
            class_index(bad, 5, None)
    with pytest.raises(
        ValueError, match=r"class_label=abc: 'abc' is no class index, and this model's classes"
    ):
        class_index("abc", 5, None)
    for bad in (True, 1.5):
        with pytest.raises(
            ValueError,
            match=rf"class_label must be a class index \(an integer\) or a class's name; got {bad!r}",
        ):
            class_index(bad, 5, None)


def test_a_diffusion_model_is_refused(tmp_path):
    """Zero-shot editing is a consistency model's multistep sampler; a diffusion model (Heun's sampler)
    is refused by name, as export refuses it."""
    train(compose(["experiment=quickstart_diffusion", *TINY], run_dir=str(tmp_path / "run")))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"last.ckpt: a diffusion model \(model.objective=diffusion\)"):
        _edit([f"ckpt={ckpt}", f"input={_images(tmp_path / 'in', 1, 8)}", f"out={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()


def test_the_command_refuses_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from act_lightning.edit import main

    images = _images(tmp_path / "in", 1, 8)
    overrides = ["task=inpaint", f"ckpt={tmp_path / 'nope.ckpt'}", f"input={images}", f"out={tmp_path / 'o'}"]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = hydra_compose("edit", overrides=overrides)
    with pytest.raises(SystemExit) as stop:
        main.__wrapped__(cfg)  # the command's body, without Hydra's run folder
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err == f"error: ckpt={tmp_path / 'nope.ckpt'}: no such checkpoint file\n"
    assert not (tmp_path / "o").exists()


def test_a_grey_palette_or_rgb_file_is_grey_for_a_grey_model(checkpoints, tmp_path):
    """Grey is the content, not the mode: a palette PNG with a grey palette and an RGB PNG whose channels
    are equal were refused as colour images by a grey model. They are read as their grey file is."""
    grey = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    files = {
        "L": Image.fromarray(grey, "L"),
        "P": Image.fromarray(grey, "L").convert("P"),
        "RGB": Image.fromarray(np.repeat(grey[..., None], 3, axis=-1), "RGB"),
    }
    for name, image in files.items():
        (tmp_path / name).mkdir()
        image.save(tmp_path / name / "0.png")
        _edit([f"ckpt={checkpoints['grey']}", f"input={tmp_path / name}", f"out={tmp_path / ('out' + name)}"])
    assert Image.open(tmp_path / "P" / "0.png").mode == "P"
    for name in ("P", "RGB"):
        assert np.array_equal(_result(tmp_path / f"out{name}")["input"][0, :, :, 0], grey)
        assert np.array_equal(
            _result(tmp_path / f"out{name}")["output"], _result(tmp_path / "outL")["output"]
        )
    colour = files["RGB"].copy()
    colour.putpixel((0, 0), (0, 0, 255))
    (tmp_path / "colour").mkdir()
    colour.convert("P").save(tmp_path / "colour" / "0.png")
    with pytest.raises(ValueError, match=r"input=.*0.png: a colour image \(P\); this model makes grey"):
        _edit([f"ckpt={checkpoints['grey']}", f"input={tmp_path / 'colour'}", f"out={tmp_path / 'outc'}"])
