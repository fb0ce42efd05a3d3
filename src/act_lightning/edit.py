"""Zero-shot editing with a consistency model (Song et al. 2023, Algorithm 4), as functions and as
`python -m act_lightning.edit task=inpaint|colorize|superres ckpt=PATH input=IMAGE_OR_DIR out=DIR`.

Each task keeps a known part of the image y and lets the model fill in the rest. With the projection
P(x) that replaces the known part of x by y's (Algorithm 4's A^-1[(Ay) (1 - Omega) + (Ax) Omega]):

    x <- f(P(0) + tau_1 z, tau_1); x <- P(x)
    for each later tau: x <- f(x + sqrt(tau^2 - sigma_min^2) z, tau); x <- P(x)

- inpaint: the known part is a set of pixels (mask true = known). P(x) = mask y + (1 - mask) x; the known
  pixels of the result are the input's exactly.
- colorize: the known part is each pixel's grey level (the mean of its channels; A's first row is the grey
  axis (1, 1, 1) / sqrt 3). P(x) = x + (grey(y) - grey(x)) in every channel.
- superres (factor s): the known part is the mean of each s x s patch (A's first row on a patch is
  uniform). P(x) = x + upsample(avgpool(y) - avgpool(x)); the result averaged over patches is the input.

`edit(cfg)` is the command (tests call it); `main()` is the thin Hydra shell.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid, save_image

from act_lightning.atomic import atomic_write
from act_lightning.consistency import karras_sigmas
from act_lightning.evaluate import load_model
from act_lightning.sample import check_taus, image_noise, to_uint8

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"
TASKS = ("inpaint", "colorize", "superres")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

Projection = Callable[[Tensor], Tensor]


# -- the known part of each task, as a projection -------------------------------------------------------


def inpaint_projection(y: Tensor, mask: Tensor) -> Projection:
    """mask (B, 1, H, W) or (B, H, W) bool, true = known pixel."""
    mask = (mask if mask.ndim == 4 else mask.unsqueeze(1)).to(y.dtype)
    return lambda x: mask * y + (1 - mask) * x


def colorize_projection(y: Tensor) -> Projection:
    grey = y.mean(1, keepdim=True)
    return lambda x: x + (grey - x.mean(1, keepdim=True))


def superres_projection(y: Tensor, factor: int) -> Projection:
    low = F.avg_pool2d(y, factor)

    def project(x: Tensor) -> Tensor:
        return x + F.interpolate(low - F.avg_pool2d(x, factor), scale_factor=factor, mode="nearest")

    return project


@torch.no_grad()
def zero_shot_edit(
    denoise: Callable[[Tensor, Tensor], Tensor],
    project: Projection,
    shape: tuple[int, ...],
    taus: list[float],
    sigma_min: float,
    noise: Callable[[int], Tensor],
) -> Tensor:
    """Algorithm 4: `denoise(x, sigma (B,)) -> x0`, `project` keeps the known part, `taus` decrease from
    sigma_max, `noise(step)` is the z of each step (B, C, H, W). Returns images in [-1, 1]."""
    b = shape[0]
    z = noise(0)
    x = project(torch.zeros_like(z)) + taus[0] * z
    x = project(denoise(x, x.new_full((b,), taus[0])).clamp(-1, 1))
    for step, tau in enumerate(taus[1:], start=1):
        x = x + math.sqrt(tau**2 - sigma_min**2) * noise(step)
        x = project(denoise(x, x.new_full((b,), tau)).clamp(-1, 1))
    return x.clamp(-1, 1)


def default_taus(steps: int, sigma_min: float, sigma_max: float, rho: float) -> list[float]:
    """`steps` noise levels from sigma_max down the Karras grid (sigma_min excluded)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
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


def read_images(files: list[Path], size: int, channels: int, key: str = "input") -> Tensor:
    """(N, C, size, size) uint8. Images must already have the model's size; grey images are accepted
    for a colour model (and repeated over the channels), colour ones for a grey model are refused."""
    images = []
    for file in files:
        try:
            with Image.open(file) as im:
                im.load()
                image = im
        except Exception as err:
            raise ValueError(f"{key}={file}: not a readable image ({err})") from err
        if image.size != (size, size):
            raise ValueError(
                f"{key}={file}: {image.size[0]}x{image.size[1]} pixels; this model needs {size}x{size}"
            )
        grey = image.mode in ("L", "1", "I", "I;16", "F")
        if channels == 1 and not grey:
            raise ValueError(f"{key}={file}: a colour image ({image.mode}); this model makes grey images")
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


def read_mask(path: Path, size: int) -> Tensor:
    """A mask image: (size, size) bool, true (non-zero pixels) = known."""
    if not path.is_file():
        raise FileNotFoundError(f"mask={path}: no such mask image")
    with Image.open(path) as im:
        if im.size != (size, size):
            raise ValueError(f"mask={path}: {im.size[0]}x{im.size[1]} pixels; the images are {size}x{size}")
        return torch.from_numpy(np.asarray(im.convert("L")) > 0)


# -- the command ----------------------------------------------------------------------------------------


def edit(cfg: DictConfig) -> dict[str, Any]:
    if cfg.task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {cfg.task!r}")
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    model, run, _ = load_model(cfg.ckpt, device)
    h = model.hparams
    size, channels = int(run.data.image_size), int(run.data.channels)
    files = image_files(Path(cfg.input))
    factor = int(cfg.factor)
    if cfg.task == "superres":
        if factor not in (2, 4) or size % factor:
            raise ValueError(f"factor must be 2 or 4 and divide the image size {size}; got {factor}")
        # low-resolution inputs (size / factor); full-size ones are averaged down first (demonstrations)
        with Image.open(files[0]) as first_image:
            first = first_image.size[0]
        read_size = size // factor if first == size // factor else size
        images = read_images(files, read_size, channels)
    else:
        images = read_images(files, size, channels)
    if cfg.task == "colorize" and channels != 3:
        raise ValueError(f"task=colorize needs a colour model; this one makes {channels}-channel images")
    y = images.float().to(device) / 127.5 - 1  # (N, C, h, w) in [-1, 1]

    n = len(files)
    mask = torch.zeros(n, size, size, dtype=torch.bool)  # true = a pixel kept exactly from the input
    if cfg.task == "inpaint":
        if cfg.mask is not None and cfg.box is not None:
            raise ValueError("give either mask=PATH or box=[top,left,height,width], not both")
        one = read_mask(Path(cfg.mask), size) if cfg.mask is not None else box_mask(size, _ints(cfg.box))
        mask = one.expand(n, -1, -1).clone()
        project = inpaint_projection(y, mask.to(device))
    elif cfg.task == "colorize":
        project = colorize_projection(y)
    else:
        if y.shape[-1] == size:
            y = F.avg_pool2d(y, factor)
        y = F.interpolate(y, scale_factor=factor, mode="nearest")
        project = superres_projection(y, factor)

    taus = [float(h.sigma_max), *check_taus(list(cfg.taus), h.sigma_min, h.sigma_max)] if cfg.taus else None
    taus = taus or default_taus(int(cfg.steps), float(h.sigma_min), float(h.sigma_max), float(h.rho))
    shape = (n, channels, size, size)
    labels = None
    if h.num_classes:
        if cfg.class_label is None:
            raise ValueError(f"this model is class-conditional ({h.num_classes} classes): give class_label=")
        if not 0 <= int(cfg.class_label) < h.num_classes:
            raise ValueError(f"class_label={cfg.class_label} out of range for {h.num_classes} classes")
        labels = torch.full((n,), int(cfg.class_label), device=device)
    net = model.target if cfg.net == "target" else model.generator
    result = zero_shot_edit(
        lambda x, sigma: model.denoise(net, x, sigma, labels),
        project,
        shape,
        taus,
        float(h.sigma_min),
        lambda step: image_noise(cfg.seed, range(n), shape[1:], stream=step).to(device),
    )

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    shown_input = project(torch.full(shape, -1.0, device=device)) if cfg.task == "inpaint" else y
    payload = {
        "input": images.permute(0, 2, 3, 1).numpy(),
        "output": to_uint8(result.cpu()),
        "mask": mask.numpy(),
    }
    buffer = io.BytesIO()
    np.savez(buffer, **payload)
    with atomic_write(out / "result.npz") as f:
        f.write(buffer.getvalue())
    panels = torch.stack([shown_input.cpu(), result.cpu()], 1).flatten(0, 1)  # input, output, input, ...
    if size < 64:
        panels = F.interpolate(panels, scale_factor=math.ceil(64 / size), mode="nearest")
    save_image(make_grid((panels + 1) / 2, nrow=2 * min(n, 4), padding=2, pad_value=1.0), out / "panels.png")
    summary = {"task": cfg.task, "images": [str(f) for f in files], "taus": taus, "out": str(out)}
    (out / "edit.json").write_text(json.dumps(summary, indent=2))
    return summary


def _ints(values) -> list[int] | None:
    if values is None:
        return None
    if not isinstance(values, (list, tuple, ListConfig)):
        raise ValueError(f"box must be [top, left, height, width] in pixels, got {values}")
    return list(values)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="edit")
def main(cfg: DictConfig) -> None:
    summary = edit(cfg)
    print(f"{cfg.task}: {len(summary['images'])} images edited; {summary['out']}/result.npz and panels.png")


if __name__ == "__main__":
    main()
