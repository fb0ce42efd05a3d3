"""Zero-shot editing with a consistency model (Song et al. 2023, Algorithm 4):
`python -m act_lightning.edit task=inpaint|colorize|superres ckpt=PATH input=IMAGE_OR_DIR out=DIR`.

Each task keeps a known part of the input images and lets the model fill in the rest: inpaint keeps a set
of pixels (a mask image or all but a box), colorize each pixel's luminance, superres the mean of each
factor x factor patch. The projections and the editing loop are in `act_lightning.samplers`
(`inpaint_projection`, `colorize_projection`, `superres_projection`, `zero_shot_edit`); this module reads
the images, runs them and writes the results. `edit(cfg)` is the command (tests call it); `main()` is the
thin Hydra shell.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig
from omegaconf.errors import MissingMandatoryValue
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid, save_image

from act_lightning.checkpoints import load_model, trained_iteration
from act_lightning.checks import check_count
from act_lightning.commands import (
    CONFIG_DIR,
    REFUSED,
    check_net,
    check_out_folder,
    refuse,
    resolve_device,
    write_npz,
)
from act_lightning.consistency import ConsistencySchedule, karras_sigmas
from act_lightning.data.images import eight_bit
from act_lightning.sample import check_taus, enlarged, image_noise, named_class, to_uint8
from act_lightning.samplers import (
    SUPERRES_FACTORS,
    Projection,
    colorize_projection,
    inpaint_projection,
    superres_projection,
    zero_shot_edit,
)
from act_lightning.seeds import check_seed

TASKS = ("inpaint", "colorize", "superres")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def default_taus(steps: int, sigma_min: float, sigma_max: float, rho: float) -> list[float]:
    """`steps` noise levels from sigma_max down the Karras grid (sigma_min excluded)."""
    check_count(steps, "steps")
    return karras_sigmas(steps + 1, sigma_min, sigma_max, rho).flip(0)[:-1].tolist()


# -- images in and out ----------------------------------------------------------------------------------


def image_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"input={path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"input={path}: no such image file or folder")
    return [path]


def _equal_channels(image: Image.Image) -> bool:
    rgb = np.asarray(image.convert("RGB"))
    return bool((rgb == rgb[..., :1]).all())


def read_images(
    files: list[Path], size: int, channels: int, key: str = "input", needs: str | None = None
) -> Tensor:
    """(N, C, size, size) uint8. Images must already have the model's size (`needs`: what to say the
    model needs, when not size x size); grey images are accepted for a colour model (and repeated over the
    channels), colour ones for a grey model are refused. Grey is the content, not the mode: a palette or RGB
    file whose channels are equal everywhere is grey."""
    images = []
    for file in files:
        image = open_image(file, key)
        if image.size != (size, size):
            raise ValueError(
                f"{key}={file}: {image.size[0]}x{image.size[1]} pixels; this model needs "
                f"{needs or f'{size}x{size}'}"
            )
        mode, image = image.mode, eight_bit(image, f"{key}={file}")  # palette and alpha: RGBA; 16 bits: L
        grey = image.mode in ("L", "1") or _equal_channels(image)
        if channels == 1 and not grey:
            raise ValueError(f"{key}={file}: a colour image ({mode}); this model makes grey images")
        array = np.asarray(image.convert("L" if channels == 1 or grey else "RGB"))
        tensor = torch.from_numpy(array.copy())
        tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
        images.append(tensor.expand(channels, -1, -1) if tensor.shape[0] == 1 else tensor)
    return torch.stack(images)


def box_mask(size: int, box: list[int] | None) -> Tensor:
    """(size, size) bool, true = known: all known but the box [top, left, height, width] (default: the
    centre square of half the side)."""
    if box is None:
        half = size // 2
        box = [size // 4, size // 4, half, half]
    if len(box) != 4 or any(not isinstance(v, int) or v < 0 for v in box):
        raise ValueError(f"box must be [top, left, height, width] in pixels, got {list(box)}")
    top, left, height, width = box
    if height < 1 or width < 1 or top + height > size or left + width > size:
        raise ValueError(f"box={list(box)} does not fit a {size}x{size} image with a non-empty area")
    mask = torch.ones(size, size, dtype=torch.bool)
    mask[top : top + height, left : left + width] = False
    return mask


def open_image(path: Path, key: str) -> Image.Image:
    """The image at `path`, read whole; one that Pillow cannot read is refused, naming `key` and the file."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except Exception as err:
        raise ValueError(f"{key}={path}: not a readable image ({err})") from err


def read_mask(path: Path, size: int) -> Tensor:
    """A mask image: (size, size) bool, true (non-zero pixels) = known."""
    if path.is_dir():
        raise IsADirectoryError(f"mask={path}: a folder; give one mask image, used for every input")
    if not path.is_file():
        raise FileNotFoundError(f"mask={path}: no such mask image")
    mask = open_image(path, "mask")
    if mask.size != (size, size):
        raise ValueError(f"mask={path}: {mask.size[0]}x{mask.size[1]} pixels; the images are {size}x{size}")
    return torch.from_numpy(np.asarray(mask.convert("L")) > 0)


# -- the command ----------------------------------------------------------------------------------------


def edit(cfg: DictConfig) -> dict[str, Any]:
    """Edits the images of `cfg.input` with the checkpoint `cfg.ckpt` and writes them to `cfg.out`;
    returns a summary."""
    if cfg.task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {cfg.task!r}")
    check_net(cfg.net)
    check_seed(cfg.seed)
    out = check_out_folder(cfg.out, result="result.npz", overwrite=cfg.get("overwrite", False))
    device = resolve_device(cfg.device)
    model, run, checkpoint = load_model(cfg.ckpt, device)
    if model.hparams.get("objective", "consistency") != "consistency":
        raise ValueError(
            f"ckpt={cfg.ckpt}: a diffusion model (model.objective=diffusion); zero-shot editing runs a "
            "consistency model's multistep sampler (Song et al. 2023, Algorithm 4), which a denoiser "
            "trained for diffusion does not compute"
        )
    size, channels = int(run.data.image_size), int(run.data.channels)
    batch = check_count(cfg.get("batch_size", 64), "batch_size")
    files = image_files(Path(cfg.input))
    images = read_inputs(cfg, files, size, channels)
    taus = edit_taus(cfg, model.schedule)
    n = len(files)
    names = checkpoint.get("act_label_names")  # a folder run's class names, or None
    label = class_index(cfg.class_label, model.hparams.num_classes, names)
    labels = None if label is None else torch.full((n,), label, device=device)
    net = model.target if cfg.net == "target" else model.generator
    # in batches: the whole folder in one pass ran a GPU out of memory at a few hundred 256 x 256 images
    parts = [
        edit_batch(cfg, model, net, images, range(a, min(a + batch, n)), labels, taus, (channels, size, size))
        for a in range(0, n, batch)
    ]
    result, mask, shown_input = (torch.cat(part) for part in zip(*parts, strict=True))
    write_results(out, images, result, mask, shown_input)
    summary = {  # what it takes to edit the same way again (image i's noise: (seed, i, step))
        "task": cfg.task,
        "checkpoint": str(Path(cfg.ckpt).resolve()),
        "iteration": trained_iteration(checkpoint),
        "net": cfg.net,
        "seed": int(cfg.seed),
        "images": [str(f) for f in files],
        "taus": taus,
        **task_options(cfg),
        **({} if label is None else {"class_label": label, "class_name": names[label] if names else None}),
        "out": str(out),
    }
    (out / "edit.json").write_text(json.dumps(summary, indent=2))
    return summary


def edit_batch(cfg, model, net, images: Tensor, indices: range, labels, taus, shape) -> tuple[Tensor, ...]:
    """The edit of images[indices] (uint8 inputs): the results, the kept-pixel mask and the input as the
    panels show it, on the CPU. Image i's noise is its own, (seed, i, step): the same whatever the batch."""
    device = model.device
    y = images[indices.start : indices.stop].float().to(device) / 127.5 - 1  # (B, C, h, w) in [-1, 1]
    project, y, mask = task_projection(cfg, y, shape[-1])
    label = None if labels is None else labels[indices.start : indices.stop]
    full = (len(indices), *shape)
    result = zero_shot_edit(
        lambda x, sigma: model.denoise(net, x, sigma, label),
        project,
        full,
        taus,
        float(model.schedule.sigma_min),
        lambda step: image_noise(cfg.seed, indices, shape, stream=step).to(device),
    )
    # the unknown region mid-grey: black could not be told from the dark background of digits or night scenes
    shown = project(torch.zeros(full, device=device)) if cfg.task == "inpaint" else y
    return result.cpu(), mask, shown.cpu()


def task_options(cfg: DictConfig) -> dict[str, Any]:
    """The options of `cfg.task` that shaped the edit (inpaint: mask or box, null for the default centre
    square; superres: factor)."""
    options: dict[str, Any] = {}
    if cfg.task == "inpaint":
        options["mask"] = None if cfg.mask is None else str(Path(cfg.mask).resolve())
        options["box"] = None if cfg.box is None else [int(v) for v in cfg.box]
    elif cfg.task == "superres":
        options["factor"] = int(cfg.factor)
    return options


def read_inputs(cfg: DictConfig, files: list[Path], size: int, channels: int) -> Tensor:
    """(N, C, h, w) uint8: the input images, at the model's size (superres: size / factor, or full size
    to average down, for demonstrations), refused by name when they or the task do not fit the model."""
    read_size, needs = size, None
    if cfg.task == "superres":
        factor = cfg.factor
        if isinstance(factor, bool) or factor not in SUPERRES_FACTORS or size % factor:
            allowed = ", ".join(map(str, SUPERRES_FACTORS))
            raise ValueError(
                f"factor must be one of {allowed} and divide the image size {size}; got {factor}"
            )
        low = size // factor
        needs = f"{low}x{low} (task=superres factor={factor}; or {size}x{size}, averaged down to {low}x{low})"
        try:
            with Image.open(files[0]) as first_image:
                first = first_image.size
        except Exception:  # not an image: read_images names it
            first = None
        read_size = low if first == (low, low) else size
        if len(files) > 1 and first in ((low, low), (size, size)):  # the first input decides for all
            needs = (
                f"{read_size}x{read_size} like the first input, {files[0].name} (task=superres "
                f"factor={factor}: all inputs {low}x{low}, or all {size}x{size} averaged down to {low}x{low})"
            )
    images = read_images(files, read_size, channels, needs=needs)
    if cfg.task == "colorize" and channels != 3:
        raise ValueError(f"task=colorize needs a colour model; this one makes {channels}-channel images")
    return images


def task_projection(cfg: DictConfig, y: Tensor, size: int) -> tuple[Projection, Tensor, Tensor]:
    """The task's projection onto the known part of `y` (N, C, h, w in [-1, 1]), y at the model's size
    (superres: upsampled) and the (N, size, size) bool mask of the pixels kept exactly (inpaint)."""
    n = len(y)
    mask = torch.zeros(n, size, size, dtype=torch.bool)  # true = a pixel kept exactly from the input
    if cfg.task == "inpaint":
        if cfg.mask is not None and cfg.box is not None:
            raise ValueError("give either mask=PATH or box=[top,left,height,width], not both")
        one = read_mask(Path(cfg.mask), size) if cfg.mask is not None else box_mask(size, _ints(cfg.box))
        mask = one.expand(n, -1, -1).clone()
        return inpaint_projection(y, mask.to(y.device)), y, mask
    if cfg.task == "colorize":
        return colorize_projection(y), y, mask
    factor = int(cfg.factor)
    if y.shape[-1] == size:
        y = F.avg_pool2d(y, factor)
    y = F.interpolate(y, scale_factor=factor, mode="nearest")
    return superres_projection(y, factor), y, mask


def edit_taus(cfg: DictConfig, s: ConsistencySchedule) -> list[float]:
    """sigma_max and `cfg.taus` after it, or `cfg.steps` levels down the Karras grid of schedule `s`."""
    if cfg.taus:
        return [float(s.sigma_max), *check_taus(cfg.taus, s.sigma_min, s.sigma_max)]
    return default_taus(cfg.steps, float(s.sigma_min), float(s.sigma_max), float(s.rho))


def class_index(label: Any, num_classes: int | None, names: list[str] | None) -> int | None:
    """The class of every image of a class-conditional model: `label`, an index or, where the run's data
    named their classes (a folder's class sub-folders: `names`), a name; None for an unconditional model,
    which refuses a label, as `sample` does."""
    if not num_classes:
        if label is not None:
            raise ValueError(f"class_label={label}: this model is unconditional (it takes no class label)")
        return None
    if label is None:
        raise ValueError(f"this model is class-conditional ({num_classes} classes): give class_label=")
    if isinstance(label, str):
        label = named_class(label, label, names, key="class_label")
    if isinstance(label, bool) or not isinstance(label, int):
        raise ValueError(f"class_label must be a class index (an integer) or a class's name; got {label!r}")
    if not 0 <= label < num_classes:
        raise ValueError(f"class_label={label} out of range for {num_classes} classes (0..{num_classes - 1})")
    return label


def write_results(out: Path, images: Tensor, result: Tensor, mask: Tensor, shown_input: Tensor) -> None:
    """out/result.npz (input, output, mask) and out/panels.png (each input beside its result)."""
    out.mkdir(parents=True, exist_ok=True)
    write_npz(
        out / "result.npz",
        input=images.permute(0, 2, 3, 1).numpy(),
        output=to_uint8(result.cpu()),
        mask=mask.numpy(),
    )
    n = len(result)
    panels = enlarged(torch.stack([shown_input.cpu(), result.cpu()], 1).flatten(0, 1))  # input, output, ...
    save_image(make_grid((panels + 1) / 2, nrow=2 * min(n, 4), padding=2, pad_value=1.0), out / "panels.png")


def _ints(values) -> list[int] | None:
    if values is None:
        return None
    if not isinstance(values, (list, tuple, ListConfig)):
        raise ValueError(f"box must be [top, left, height, width] in pixels, got {values}")
    return list(values)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="edit")
def main(cfg: DictConfig) -> None:
    try:
        summary = edit(cfg)
    except (*REFUSED, MissingMandatoryValue) as err:  # a bad option, image or checkpoint, named by its key
        refuse(err)
    print(f"{cfg.task}: {len(summary['images'])} images edited; {summary['out']}/result.npz and panels.png")


if __name__ == "__main__":
    main()
