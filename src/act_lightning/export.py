"""Export for code that does not use this library: `python -m act_lightning.export ckpt=PATH out=DIR`.

Writes the checkpoint's target generator (the network the paper samples) as

    DIR/model.safetensors        the backbone's weights (keys `unet.*`)
    DIR/config.json              the backbone's arguments and the consistency function's constants
    DIR/README.md                a model card (Hugging Face Hub front matter)
    DIR/model_index.json, DIR/unet/   the same UNet saved by diffusers (`save_pretrained`), loadable
                                 with `ACTPipeline.from_pretrained(DIR)`

so the folder can be uploaded to the Hub as it is. `act_lightning.load_generator(DIR)` rebuilds the
consistency function from the first two files with torch, safetensors, diffusers and omegaconf (no
Lightning, no Hydra) and samples in one or more steps. `export(ckpt, out)` is a plain function (tests call
it); `main()` is the thin Hydra shell (Hydra is imported by it only: loading an export needs no Hydra).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from act_lightning.atomic import default_file_mode
from act_lightning.checkpoints import load_model, reference_start, trained_iteration
from act_lightning.checks import check_noise, class_labels_for
from act_lightning.commands import CONFIG_DIR, REFUSED, check_out_folder, refuse
from act_lightning.environment import describe, latest_environment
from act_lightning.nn.generator import UNetGenerator, run_unet
from act_lightning.nn.precond import consistency_function
from act_lightning.samplers import later_levels, multistep

FORMAT = "act-lightning/generator"
__all__ = ["ACTPipeline", "ExportedGenerator", "class_labels_for", "export", "load_generator"]


class ExportedGenerator(nn.Module):
    """The consistency function f(x, sigma, y) of an exported generator, with its samplers."""

    def __init__(self, backbone: UNetGenerator, constants: dict[str, Any], num_classes: int | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.constants = dict(constants)
        self.num_classes = num_classes

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        c = self.constants
        return consistency_function(
            self.backbone,
            x,
            sigma,
            class_labels,
            sigma_min=c["sigma_min"],
            sigma_data=c["sigma_data"],
            c_noise_kind=c["c_noise"],
        )

    @torch.no_grad()
    def sample(
        self,
        noise: Tensor,
        class_labels: Tensor | list[int] | int | None = None,
        taus: list[float] | None = None,
        generator: torch.Generator | None = None,
        step_noise=None,
    ) -> Tensor:
        """Images in [-1, 1] from noise z (B, C, H, W) at the model's size: one step at sigma_max, then one
        per later tau (their noise from `generator`, or `step_noise(step)`), in eval mode (no dropout)
        whatever the module's mode. A class-conditional generator takes one class index per image
        (`class_labels`: a (B,) tensor, list or numpy array) or one for all (an int)."""
        noise = check_noise(noise, self.backbone)
        class_labels = class_labels_for(class_labels, self.num_classes, len(noise), noise.device)
        taus = [self.constants["sigma_max"], *later_levels(taus, self.constants["sigma_max"])]
        was_training = self.training
        self.eval()
        try:
            denoise = lambda x, s: self(x, s, class_labels)  # noqa: E731
            return multistep(denoise, noise, taus, self.constants["sigma_min"], generator, step_noise)
        finally:
            self.train(was_training)


def load_generator(path: str | Path, device: torch.device | str = "cpu") -> ExportedGenerator:
    """An exported generator (`python -m act_lightning.export`) from its folder, in eval mode."""
    path = Path(path)
    if not path.exists():  # a Hub repository's name, say: its folder is downloaded first
        raise FileNotFoundError(
            f"{path}: no such folder; load_generator reads a local folder that act_lightning.export wrote "
            "(one shared on the Hugging Face Hub: huggingface_hub.snapshot_download(repo_id) first)"
        )
    if path.is_file():
        raise ValueError(
            f"{path}: a file; load_generator reads the folder that act_lightning.export writes. A training "
            "checkpoint loads with `model, run, checkpoint = act_lightning.checkpoints.load_model(path)`, "
            "or export it first: python -m act_lightning.export ckpt=PATH out=DIR"
        )
    config_file, weights = path / "config.json", path / "model.safetensors"
    for file in (config_file, weights):
        if not file.is_file():
            raise FileNotFoundError(
                f"{file}: missing; {path} is not a folder written by act_lightning.export"
            )
    try:
        config = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{config_file}: not readable as JSON ({err}); export the checkpoint again"
        ) from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise ValueError(f"{config_file}: not an act-lightning generator (format {found!r})")
    missing = [key for key in ("generator", "consistency") if not isinstance(config.get(key), dict)]
    if missing:
        raise ValueError(f"{config_file}: no {' and no '.join(missing)} section; export the checkpoint again")
    backbone = UNetGenerator(**config["generator"])
    backbone.load_state_dict(load_file(weights, device="cpu"))
    model = ExportedGenerator(backbone, config["consistency"], config["generator"].get("num_class_embeds"))
    model.class_names = config.get("class_names")  # index k's name, where the training data named them
    return model.to(device).eval()


class ACTPipeline(DiffusionPipeline):
    """A diffusers pipeline around the exported UNet: `ACTPipeline.from_pretrained(DIR)(batch_size=16)`
    samples in one step (`taus=[...]` for more), with the same consistency function as training. It returns
    the image tensor in [-1, 1]; `output_type="pil"` or `"np"` returns diffusers' `ImagePipelineOutput`
    (`.images`: PIL images, or an (N, H, W, C) array in [0, 1]), as diffusers' own image pipelines do."""

    def __init__(
        self,
        unet: UNet2DModel,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        rho: float = 7.0,
        c_noise: str = "identity",
        used_channels: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(unet=unet)
        self.register_to_config(
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            sigma_data=sigma_data,
            rho=rho,
            c_noise=c_noise,
            used_channels=used_channels,
        )

    def _backbone(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None) -> Tensor:
        return run_unet(self.unet, x, c_noise, class_labels, self.config.used_channels)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        taus: list[float] | None = None,
        class_labels: Tensor | list[int] | int | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pt",
    ) -> Tensor | ImagePipelineOutput:
        """Images in [-1, 1], (B, C, H, W) (`output_type="pt"`), or an ImagePipelineOutput of PIL images
        ("pil") or of an (B, H, W, C) array in [0, 1] ("np"). `generator` may live on the host or on the
        UNet's device: the noise is drawn where it is and moved to the UNet's device, as are `noise` and
        `class_labels`."""
        if output_type not in ("pt", "pil", "np"):
            raise ValueError(f"output_type must be pt, pil or np; got {output_type!r}")
        c = self.config
        size = self.unet.config.sample_size
        channels = self.unet.config.in_channels
        device = self.unet.device
        where = None if generator is None else generator.device
        if noise is None:
            noise = torch.randn((batch_size, channels, size, size), generator=generator, device=where)
        noise = check_noise(
            noise.to(device) if isinstance(noise, Tensor) else noise, self.unet, (channels, size)
        )
        class_labels = class_labels_for(class_labels, self.unet.config.num_class_embeds, len(noise), device)
        step_noise = None
        if generator is not None and generator.device != device:  # later steps' noise: drawn there too
            step_noise = lambda step: torch.randn(noise.shape, generator=generator, device=where)  # noqa: E731

        def denoise(x: Tensor, sigma: Tensor) -> Tensor:
            return consistency_function(
                self._backbone,
                x,
                sigma,
                class_labels,
                sigma_min=c.sigma_min,
                sigma_data=c.sigma_data,
                c_noise_kind=c.c_noise,
            )

        levels = [c.sigma_max, *later_levels(taus, c.sigma_max)]
        images = multistep(denoise, noise, levels, c.sigma_min, generator, step_noise)
        if output_type == "pt":
            return images
        array = ((images.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return ImagePipelineOutput(images=self.numpy_to_pil(array) if output_type == "pil" else array)


MODEL_CARD = """---
library_name: diffusers
tags:
- consistency-model
- adversarial-consistency-training
- act-lightning
- {task}
---

# {name}

A one-step image generator trained with Adversarial Consistency Training (Kong et al., ACT-Diffusion,
arXiv 2311.14097) {trained_by} `{checkpoint}`
({at}; experiment `{experiment}`): {size}x{size} images with {channels}
channel(s){classes}.{trained_with}

```python
from act_lightning import load_generator
import torch

model = load_generator("{folder}")  # this folder
{labels}z = torch.randn(16, {channels}, {size}, {size})
images = model.sample(z{label_arg})        # one step, in [-1, 1]
images = model.sample(z{label_arg}, taus=[{two_step_tau}])   # two steps
```

As a diffusers pipeline: `ACTPipeline.from_pretrained("{folder}")(batch_size=16{label_arg})` (the class is in
`act_lightning.export`, which diffusers' `DiffusionPipeline.from_pretrained` does not know;
`output_type="pil"` returns `.images` as PIL images); the UNet alone loads with diffusers alone:
`UNet2DModel.from_pretrained("{folder}", subfolder="unet")` (F is its output channels `used_channels`,
listed in `model_index.json`).
The consistency function is f(x, t) = c_skip(t) x + c_out(t) F(c_in(t) x, c_noise(t)) with
sigma_min = {sigma_min}, sigma_max = {sigma_max}, sigma_data = {sigma_data}, c_noise = {c_noise}:
c_skip(t) = sigma_data^2 / ((t - sigma_min)^2 + sigma_data^2),
c_out(t) = sigma_data (t - sigma_min) / sqrt(sigma_data^2 + t^2), c_in(t) = 1 / sqrt(t^2 + sigma_data^2)
(Song et al. 2023, appendix C).
"""


def _follow_umask(out: Path) -> None:
    """safetensors writes each file through a temporary one (Rust's `tempfile`, mode 0600) renamed into
    place: give the weights the mode every other file of the export has, 0o666 less the umask."""
    for path in [out / "model.safetensors", *sorted((out / "unet").glob("*.safetensors"))]:
        os.chmod(path, default_file_mode())


def check_exportable(model, ckpt) -> None:
    """Refuses what the exported pipeline cannot reproduce: a diffusion model (Heun's sampler, not the
    consistency function's steps) and a generator other than UNetGenerator (a converted DDPM's)."""
    if model.hparams.get("objective", "consistency") != "consistency":
        raise ValueError(
            f"ckpt={ckpt}: a diffusion model (model.objective=diffusion), which samples with Heun's method; "
            "export writes one-step consistency generators (sample it with python -m act_lightning.sample)"
        )
    if type(model.generator) is not UNetGenerator:
        raise ValueError(
            f"ckpt={ckpt}: its generator is a {type(model.generator).__name__} (a converted diffusers "
            "model's), not the act_lightning.nn.UNetGenerator that export writes and load_generator reads"
        )


def check_export_folder(out: Path) -> None:
    """`out` is new, empty or an earlier export (replaced): a folder of other files (a run's checkpoints,
    a data set) would get a model card, weights and diffusers' folders mixed into it. Hidden entries do not
    count: a clone of a new Hugging Face repository (.git, .gitattributes) takes an export."""
    if not out.is_dir() or not any(not p.name.startswith(".") for p in out.iterdir()):
        return
    try:
        earlier = json.loads((out / "config.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        earlier = False
    if not earlier:
        raise ValueError(
            f"out={out} holds other files, not an earlier export: export into a new or empty folder"
        )


def trained_by(config: dict[str, Any]) -> str:
    """Who trained the exported weights, as the model card says it: this library, the paper's reference
    code (a released checkpoint that `convert_reference` converted), or this library from such a one."""
    if config.get("converted_from") is not None:
        return (
            f"by the paper's reference code (kong13661/ACT; its checkpoint `{config['converted_from']}`), "
            "converted by act-lightning's convert_reference into"
        )
    started = config.get("started_from")
    if started is not None:
        return (
            f"with the act-lightning library, starting from the paper's released checkpoint "
            f"`{started['checkpoint']}` (trained by its reference code, kong13661/ACT, for "
            f"{reached(started['reference_iteration'])}), into the checkpoint"
        )
    return "with the act-lightning library, from the checkpoint"


def reached(iteration: int | None) -> str:
    """How many iterations the reference code trained a released checkpoint, as the model card says it."""
    return (
        "a number of iterations its file does not record" if iteration is None else f"{iteration} iterations"
    )


def model_card(out: Path, ckpt, run, h, config: dict[str, Any]) -> str:
    """The export's README.md (MODEL_CARD) for the run's config `run`, the module's hyper-parameters `h`
    and the export's `config.json` contents."""
    from act_lightning.sample import two_step_tau  # (with Hydra: not for loading an exported model)

    classes = config["num_classes"]  # the generator's class embeddings: what sampling takes
    conditional = bool(classes)
    return MODEL_CARD.format(
        name=f"ACT generator: {run.get('experiment_name')}",
        checkpoint=Path(ckpt).name,
        trained_by=trained_by(config),
        at=f"iteration {config['iteration']} of {h.iterations}"
        if config.get("converted_from") is None
        # the reference run's own count, not this config's length
        else (
            "an iteration its file does not record"
            if config["iteration"] is None
            else f"iteration {config['iteration']} of the reference's run"
        ),
        experiment=run.get("experiment_name"),
        size=int(run.data.image_size),
        channels=int(run.data.channels),
        classes=f", {classes} classes (pass class_labels){named(config.get('class_names'))}"
        if conditional
        else "",
        folder=out.name,
        task="class-conditional-image-generation" if conditional else "unconditional-image-generation",
        labels=f"labels = torch.randint({classes}, (16,))  # a class per image\n" if conditional else "",
        label_arg=", class_labels=labels" if conditional else "",
        two_step_tau=repr(two_step_tau(run)),
        trained_with=f" Trained with {describe(env)}." if (env := config["trained_with"]) else "",
        **config["consistency"],
    )


def named(names: list[str] | None, shown: int = 20) -> str:
    """The model card's list of class names by index (the first `shown`), or nothing without them."""
    if not names:
        return ""
    listed = ", ".join(f"{i}: {name}" for i, name in enumerate(names[:shown]))
    return f"; classes by index: {listed}" + (
        f", ... ({len(names)} in all, in config.json)" if len(names) > shown else ""
    )


def export(ckpt: str | Path, out: str | Path) -> dict[str, Any]:
    """Writes the checkpoint's target generator into `out` (see the module docstring)."""
    from omegaconf import OmegaConf

    out = check_out_folder(out)
    check_export_folder(out)
    model, run, checkpoint = load_model(ckpt)
    check_exportable(model, ckpt)
    out.mkdir(parents=True, exist_ok=True)
    h = model.hparams
    generator_args = OmegaConf.to_container(run.model.generator, resolve=True)
    generator_args.pop("_target_", None)
    sched = model.schedule  # the noise levels; sigma_data and c_noise are the module's own arguments
    constants = {
        "sigma_min": sched.sigma_min,
        "sigma_max": sched.sigma_max,
        "sigma_data": h.sigma_data,
        "rho": sched.rho,
        "c_noise": h.c_noise,
    }
    backbone = model.target
    state = {k: v.contiguous() for k, v in backbone.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    config = {
        "format": FORMAT,
        "generator": generator_args,
        "consistency": constants,
        "num_classes": generator_args.get("num_class_embeds"),  # the classes the generator takes
        "class_names": checkpoint.get("act_label_names"),  # index k's name (a folder's k-th class), or None
        "iteration": trained_iteration(checkpoint),
        "experiment": run.get("experiment_name"),
        # one of the paper's released checkpoints, by its file name (convert_reference), or None
        "converted_from": checkpoint.get("act_converted_from")
        if "act_reference_iteration" in checkpoint
        else None,
        # trained on here from one of them (train ckpt_path=): its file name and the reference's iteration
        "started_from": None if "act_reference_iteration" in checkpoint else reference_start(checkpoint),
        # the versions (and commit) of the launch that wrote the checkpoint (act_lightning.environment)
        "trained_with": latest_environment(checkpoint.get("act_history")),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    pipeline = ACTPipeline(
        unet=backbone.unet, used_channels=backbone.used_channels, **constants
    )  # (load_model builds the networks in the standard memory format, which safetensors needs)
    pipeline.save_pretrained(out)
    _follow_umask(out)
    (out / "README.md").write_text(model_card(out, ckpt, run, h, config))
    return {"out": str(out), "iteration": config["iteration"]}


def main() -> None:
    """`python -m act_lightning.export ckpt=PATH out=DIR` (conf/export.yaml)."""
    import hydra
    from omegaconf import DictConfig
    from omegaconf.errors import MissingMandatoryValue

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="export")
    def run(cfg: DictConfig) -> None:
        try:
            summary = export(cfg.ckpt, cfg.out)
        except (*REFUSED, MissingMandatoryValue) as err:  # a missing option or a file that is no checkpoint
            refuse(err)
        at = (
            "an unrecorded iteration" if summary["iteration"] is None else f"iteration {summary['iteration']}"
        )
        print(f"exported {at} to {summary['out']}")

    run()


if __name__ == "__main__":
    main()
