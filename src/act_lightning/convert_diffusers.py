"""A diffusers DDPM as the start of a training run: `python -m act_lightning.convert_diffusers DIR OUT`,
then `python -m act_lightning.train experiment=... init_from=OUT`.

DIR is a diffusers folder of an unconditional, variance-preserving, epsilon-predicting model, such as
google/ddpm-cifar10-32: the UNet (UNet2DModel: config.json and diffusion_pytorch_model.safetensors or .bin)
in DIR/unet or DIR itself, and its scheduler (DDPMScheduler or DDIMScheduler: scheduler_config.json) in
DIR/scheduler or DIR itself. OUT is a weights-only checkpoint: the UNet's weights as the generator
(`generator.unet.*`) and the generator's config (`act_generator`: act_lightning.nn.vp.VPEpsilonBackbone,
which init_from puts in place of the experiment's model.generator). The backbone maps the library's
noise levels sigma to the DDPM's timesteps (sigma_t = sqrt((1 - abar_t) / abar_t), interpolated in
ln sigma) and its input scale, so that EDM's preconditioning, as model.objective=diffusion uses it,
computes the DDPM's denoiser x - sigma eps exactly (docs/algorithm.md, section 12). It follows the run's
model.sigma_data and model.c_noise; its image size and channels are the UNet's, checked against data.*.

Refused by name: a missing DIR, no UNet2DModel or DDPMScheduler config, v_prediction or sample
prediction, a class-conditional UNet, a time embedding other than the positional one (the backbone feeds
fractional timesteps), an output that is not eps, and an existing OUT (unless --force). The weights are
read as diffusers reads them (safetensors, or torch's safe loader).
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

import torch

from act_lightning.atomic import atomic_write
from act_lightning.commands import REFUSED, check_output_file, refuse
from act_lightning.nn.vp import vp_log_sigmas

UNET = "UNet2DModel"
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")  # the same betas, so the same abar_t
BACKBONE = "act_lightning.nn.vp.VPEpsilonBackbone"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def read_json(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable JSON config ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    return config


def find_configs(folder: Path) -> tuple[Path, Path]:
    """The UNet's config.json and the scheduler's scheduler_config.json in `folder`: in unet/ and
    scheduler/ (a pipeline's layout) or at the top (google/ddpm-cifar10-32 has both)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"DIR={folder} is not a folder (a diffusers DDPM folder is expected)")
    unet = next((p for p in (folder / "unet" / "config.json", folder / "config.json") if p.is_file()), None)
    if unet is None:
        raise FileNotFoundError(
            f"DIR={folder} holds no UNet config: expected {folder / 'unet' / 'config.json'} or "
            f"{folder / 'config.json'} (a diffusers {UNET})"
        )
    names = ("scheduler/scheduler_config.json", "scheduler_config.json")
    scheduler = next((folder / n for n in names if (folder / n).is_file()), None)
    if scheduler is None:
        raise FileNotFoundError(
            f"DIR={folder} holds no scheduler config: expected {folder / names[0]} or {folder / names[1]} "
            f"(a diffusers {' or '.join(SCHEDULERS)})"
        )
    return unet, scheduler


def public(config: dict) -> dict:
    """A diffusers config without its bookkeeping (`_class_name`, `_diffusers_version`, ...), with lists
    for tuples (OmegaConf and torch's safe loader both take them)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}


def check_scheduler(path: Path, raw: dict) -> dict:
    """The scheduler config's DDPMScheduler keys, after refusing what this backbone cannot reproduce."""
    from diffusers import DDPMScheduler

    kind = raw.get("_class_name")
    if kind not in SCHEDULERS:
        raise ValueError(f"{path}: _class_name is {kind!r}, expected {' or '.join(SCHEDULERS)}")
    prediction = raw.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(
            f"{path}: prediction_type={prediction!r}, expected 'epsilon' (v_prediction and sample models "
            "are not supported)"
        )
    if raw.get("rescale_betas_zero_snr"):
        raise ValueError(
            f"{path}: rescale_betas_zero_snr=true gives abar_T = 0, an infinite sigma_max: expected false"
        )
    keys = inspect.signature(DDPMScheduler.__init__).parameters
    given = {k: v for k, v in raw.items() if k in keys}  # DDIM's own keys dropped
    try:
        built = DDPMScheduler(**given)
    except (NotImplementedError, TypeError, ValueError) as err:  # e.g. an unknown beta_schedule
        raise ValueError(f"{path}: not a DDPMScheduler config this diffusers can build ({err})") from None
    scheduler = public({k: v for k, v in built.config.items() if k in keys})  # every key, defaults included
    table = vp_log_sigmas(scheduler)
    if not (table.isfinite().all() and (table.diff() > 0).all()):
        raise ValueError(f"{path}: its betas do not give finite noise levels increasing with the timestep")
    return scheduler


def check_unet(path: Path, raw: dict, variance_type: str | None) -> None:
    kind = raw.get("_class_name")
    if kind != UNET:
        raise ValueError(f"{path}: _class_name is {kind!r}, expected {UNET}")
    for key in ("num_class_embeds", "class_embed_type"):
        if raw.get(key) is not None:
            raise ValueError(
                f"{path}: {key}={raw[key]!r}, expected null (class-conditional UNets are not supported)"
            )
    if raw.get("time_embedding_type", "positional") != "positional":
        raise ValueError(
            f"{path}: time_embedding_type={raw['time_embedding_type']!r}, expected 'positional' (the "
            "backbone feeds fractional timesteps)"
        )
    size = raw.get("sample_size")
    if not isinstance(size, int) or isinstance(size, bool):
        raise ValueError(f"{path}: sample_size={size!r}, expected one integer (square images)")
    channels, out = raw.get("in_channels", 3), raw.get("out_channels", 3)
    learned = variance_type in ("learned", "learned_range")
    if out != channels and not (learned and out == 2 * channels):
        raise ValueError(
            f"{path}: out_channels={out}, expected in_channels={channels} (the noise eps; twice as many "
            "with a scheduler of learned variance)"
        )


def load_unet(folder: Path):
    """diffusers' UNet2DModel.from_pretrained of `folder`: its safetensors file when there is one, else its
    .bin, which diffusers reads with torch's safe loader (weights_only=True)."""
    from diffusers import UNet2DModel

    try:
        return UNet2DModel.from_pretrained(folder, use_safetensors=(folder / WEIGHTS).is_file())
    except OSError as err:  # no weights file, or an unreadable one: diffusers' message names the file
        raise FileNotFoundError(
            f"{folder}: the UNet's weights cannot be read (expected {WEIGHTS} or "
            f"{WEIGHTS.replace('.safetensors', '.bin')}): {err}".replace("\n", " ")
        ) from None


def weights_digest(folder: Path) -> str | None:
    """The SHA-256 of the UNet's weights file that `load_unet` read (safetensors first, else .bin)."""
    from act_lightning.data.storage import sha256_file  # here: the data modules load only to convert

    for name in (WEIGHTS, WEIGHTS.replace(".safetensors", ".bin")):
        if (folder / name).is_file():
            return sha256_file(folder / name)
    return None


def convert(folder: str | Path, out: str | Path, force: bool = False) -> dict:
    """Converts the DDPM in `folder` into the checkpoint `out` (see the module docstring); returns a
    summary (the files read, the tensors and the config written)."""
    folder, out = Path(folder), Path(out)
    unet_path, scheduler_path = find_configs(folder)
    if out.exists() and folder.resolve() in out.resolve().parents:
        raise ValueError(
            f"OUT={out} is a file of DIR={folder}, the model being converted: write it elsewhere"
        )
    check_output_file(out, "OUT", force)
    scheduler_raw = read_json(scheduler_path)
    scheduler = check_scheduler(scheduler_path, scheduler_raw)
    check_unet(unet_path, read_json(unet_path), scheduler.get("variance_type"))
    unet = load_unet(unet_path.parent)
    config = public(dict(unet.config))
    generator = {
        "_target_": BACKBONE,
        "_convert_": "all",  # the UNet's and the scheduler's configs reach the backbone as plain dicts
        "unet": config,
        "scheduler": scheduler,
        "sigma_data": "${model.sigma_data}",  # the backbone inverts the run's own preconditioning
        "c_noise": "${model.c_noise}",
        "image_size": int(config["sample_size"]),  # literal: a run on data of another size is refused
        "in_channels": int(config["in_channels"]),
    }
    state = {f"generator.unet.{k}": v.detach().clone().contiguous() for k, v in unet.state_dict().items()}
    checkpoint = {
        "state_dict": state,
        "act_generator": generator,
        "act_converted_from": str(folder.resolve()),  # as typed it named nothing from another folder
        "act_converted_sha256": weights_digest(unet_path.parent),  # which weights, once the folder changes
    }
    with atomic_write(out) as f:
        torch.save(checkpoint, f)
    return {
        "unet": str(unet_path),
        "scheduler": str(scheduler_path),
        "timesteps": int(scheduler["num_train_timesteps"]),
        "tensors": len(state),
        "parameters": sum(v.numel() for v in state.values()),
        "image_size": config["sample_size"],
        "channels": config["in_channels"],
        "out": str(out),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m act_lightning.convert_diffusers",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "dir", metavar="DIR", help="a diffusers DDPM folder (unet/ + scheduler/, or top level)"
    )
    parser.add_argument("out", metavar="OUT", help="the checkpoint to write, for init_from=OUT")
    parser.add_argument("--force", action="store_true", help="replace OUT when it exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m act_lightning.convert_diffusers DIR OUT [--force]`."""
    args = build_parser().parse_args(argv)
    try:
        summary = convert(args.dir, args.out, force=args.force)
    except REFUSED as err:  # a folder that is not a supported DDPM, named with why
        refuse(err)
    print(
        f"{summary['tensors']} tensors ({summary['parameters']:,} parameters, {summary['image_size']}x"
        f"{summary['image_size']}x{summary['channels']} images, {summary['timesteps']} timesteps) from "
        f"{summary['unet']} and {summary['scheduler']} written to {summary['out']}: train with "
        f"init_from={summary['out']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
