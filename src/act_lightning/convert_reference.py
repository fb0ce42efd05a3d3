"""The paper's released checkpoints in this library's format:
`python -m act_lightning.convert_reference CKPT OUT [experiment=cifar10 key=value ...]`.

The reference code (kong13661/ACT) writes Lightning checkpoints whose `state_dict` holds the generator
as `model.unet.*`, the target EMA as `model_ema.unet.*` and the discriminator as `model._discriminator.*`
(the CIFAR-10 file also an unused `model_ema._discriminator.*`). The networks are the same diffusers
modules as here (docs/algorithm.md, section 10), so conversion renames keys, checks every name and
shape against the experiment's networks, and writes a weights-only checkpoint (networks, the experiment's
config, iteration 0) that `sample`, `edit`, `evaluate`, `export` read, and from which `train
ckpt_path=OUT` starts (new optimiser state, the curriculum from the start).

The experiment is recognised from the generator's number of resolution levels (4: cifar10, 5:
imagenet64, 6: lsun_cat256) unless given. The file is read with torch's safe loader only.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

from act_lightning.atomic import atomic_write

PREFIXES = {  # reference prefix -> this library's
    "model.unet.": "generator.unet.",
    "model_ema.unet.": "target.unet.",
    "model._discriminator.": "discriminator.",
}
IGNORED = ("model_ema._discriminator.",)  # an unused copy in the CIFAR-10 file
LEVELS = {4: "cifar10", 5: "imagenet64", 6: "lsun_cat256"}
USAGE = "usage: python -m act_lightning.convert_reference CKPT OUT [experiment=NAME key=value ...]"


def read_reference(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"CKPT={path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"CKPT={path}: cannot be read with torch's safe loader ({type(err).__name__}): it holds pickled "
            "Python objects besides tensors. In an environment you trust, keep only the weights with "
            "torch.save({'state_dict': torch.load(CKPT, weights_only=False)['state_dict']}, 'weights.ckpt') "
            "and convert that file."
        ) from err
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not any(k.startswith("model.unet.") for k in state):
        raise ValueError(f"CKPT={path}: not a reference ACT checkpoint (no model.unet.* weights)")
    return state


def detect_experiment(state: dict[str, torch.Tensor]) -> str:
    levels = {int(m.group(1)) for k in state if (m := re.match(r"model\.unet\.down_blocks\.(\d+)\.", k))}
    experiment = LEVELS.get(len(levels))
    if experiment is None:
        raise ValueError(f"a generator with {len(levels)} resolution levels: pass experiment=NAME")
    return experiment


def convert(ckpt: str | Path, out: str | Path, overrides: list[str] | None = None) -> dict:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    state = read_reference(Path(ckpt))
    overrides = list(overrides or [])
    if not any(o.startswith("experiment=") for o in overrides):
        overrides.insert(0, f"experiment={detect_experiment(state)}")
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(str(conf), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "run_dir=converted"])
    model = instantiate(cfg.model, distance="l2", channels_last=False)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("distance.")}

    converted, unknown, misshaped = {}, [], []
    for key, value in state.items():
        prefix = next((p for p in PREFIXES if key.startswith(p)), None)
        if prefix is None:
            if not key.startswith(IGNORED):
                unknown.append(key)
            continue
        name = PREFIXES[prefix] + key[len(prefix) :]
        if name not in own:
            unknown.append(key)
        elif own[name].shape != value.shape:
            misshaped.append(f"{key} {tuple(value.shape)} (expected {tuple(own[name].shape)})")
        else:
            converted[name] = value
    networks = [k for k in own if k.startswith(("generator.", "target.", "discriminator."))]
    missing = [k for k in networks if k not in converted]
    problems = [
        (
            f"unknown keys: {', '.join(unknown[:8])}"
            + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        )
        if unknown
        else "",
        f"mis-shaped keys: {', '.join(misshaped[:8])}" if misshaped else "",
        f"missing keys: {', '.join(missing[:8])}"
        + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        if missing
        else "",
    ]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(
            f"CKPT={ckpt} does not match experiment {cfg.experiment_name}'s networks: " + "; ".join(problems)
        )
    model.load_state_dict({**own, **converted})
    full = {k: v for k, v in model.state_dict().items() if not k.startswith("distance.")}
    checkpoint = {
        "state_dict": full,
        "act_config": OmegaConf.to_container(cfg, resolve=True),
        "act_weights_only": True,  # no optimiser or loop state: train starts from these weights
        "act_converted_from": str(Path(ckpt).name),
    }
    with atomic_write(out) as f:
        torch.save(checkpoint, f)
    return {"experiment": cfg.experiment_name, "tensors": len(converted), "out": str(out)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv) or len([a for a in argv if "=" not in a]) != 2:
        print(USAGE + "\n\n" + __doc__.split("\n\n", 1)[1])
        return 0 if any(a in ("-h", "--help") for a in argv) else 2
    ckpt, out = [a for a in argv if "=" not in a]
    summary = convert(ckpt, out, [a for a in argv if "=" in a])
    print(f"{summary['tensors']} tensors of experiment {summary['experiment']} written to {summary['out']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
