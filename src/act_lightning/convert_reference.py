"""The paper's released checkpoints in this library's format:
`python -m act_lightning.convert_reference CKPT OUT [--force] [experiment=cifar10 key=value ...]`.

The reference code (kong13661/ACT) writes Lightning checkpoints whose `state_dict` holds the generator
as `model.unet.*`, the target EMA as `model_ema.unet.*` and the discriminator as `model._discriminator.*`
(the CIFAR-10 file also an unused `model_ema._discriminator.*`), besides its loss and metric modules:
piq's LPIPS VGG as `distance_loss.lpips.*` and torchmetrics' FID Inception as `fid.inception.*` (on
ImageNet 64 and LSUN Cat also the reference statistics `fid.real_mu`, `fid.real_cov`), which are dropped
(this library brings its own). Modules that `torch.compile` wrapped (the reference's compile=True, the
ImageNet 64 default, and unet_compile=True) hold their keys under `_orig_mod.`, which is left out of the
names. tests/fixtures/reference_keys lists every key of the three experiments' checkpoints.

The networks are the same diffusers modules as here (docs/algorithm.md, section 10), so conversion
renames keys, checks every name and shape against the experiment's networks (any other key is refused
by name), and writes a weights-only checkpoint (networks, the experiment's config, iteration 0) that
`sample`, `edit`, `evaluate`, `export` read, and from which `train ckpt_path=OUT` starts (new optimiser
state, the curriculum from the start). The iteration the reference run had reached (half of its
Lightning `global_step`: one generator and one discriminator step per iteration) is kept beside it, and
those four commands report it as the checkpoint's iteration.

The experiment is recognised from the generator's number of resolution levels (4: cifar10, 5:
imagenet64, 6: lsun_cat256) unless given. The file is read with torch's safe loader only. An existing
OUT is refused unless --force, and OUT may never be CKPT itself (the released file stays as it is).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from act_lightning.atomic import atomic_write
from act_lightning.checkpoints import holds_reference_weights, plain, read_checkpoint
from act_lightning.commands import CONFIG_DIR, REFUSED, check_output_file, refuse

PREFIXES = {  # reference prefix -> this library's
    "model.unet.": "generator.unet.",
    "model_ema.unet.": "target.unet.",
    "model._discriminator.": "discriminator.",
}
IGNORED = (  # dropped: the reference's loss and metric modules, an unused copy in the CIFAR-10 file
    "distance_loss.",
    "fid.",
    "model_ema._discriminator.",
)
LEVELS = {4: "cifar10", 5: "imagenet64", 6: "lsun_cat256"}
PICKLED = (  # what read_checkpoint says when the safe loader refuses the file ({{ }}: literal braces)
    "cannot be read with torch's safe loader ({kind}): it holds pickled Python objects besides tensors. In "
    "an environment you trust, keep only the weights and the step count with c = torch.load(CKPT, "
    "weights_only=False); torch.save({{'state_dict': c['state_dict'], 'global_step': c['global_step']}}, "
    "'weights.ckpt') and convert that file."
)


def read_reference(path: Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """The reference checkpoint's state dict (its `state_dict`, or the file itself when it is one) and the
    ACT iteration it was saved at (None when the file does not say). The reference steps the generator's
    and the discriminator's optimisers once each per iteration, and Lightning counts every step in
    `global_step` (its train scripts double `max_steps` for that): the iteration is half of it."""
    checkpoint = read_checkpoint(path, "CKPT", unreadable=PICKLED)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not holds_reference_weights(state):
        raise ValueError(f"CKPT={path}: not a reference ACT checkpoint (no model.unet.* weights)")
    step = checkpoint.get("global_step") if state is not checkpoint else None
    return state, (int(step) // 2 if isinstance(step, int) and not isinstance(step, bool) else None)


def detect_experiment(state: dict[str, torch.Tensor]) -> str:
    pattern = re.compile(r"model\.unet\.down_blocks\.(\d+)\.")
    levels = {int(m.group(1)) for k in state if (m := pattern.match(plain(k)))}
    experiment = LEVELS.get(len(levels))
    if experiment is None:
        raise ValueError(f"a generator with {len(levels)} resolution levels: pass experiment=NAME")
    return experiment


def check_out(ckpt: Path, out: Path, force: bool) -> None:
    """OUT is not CKPT itself, and replaces an existing file only when asked to."""
    if out.exists() and ckpt.exists() and out.resolve() == ckpt.resolve():
        raise ValueError(f"OUT={out} is CKPT itself: write the converted checkpoint to another file")
    check_output_file(out, "OUT", force)


def convert(
    ckpt: str | Path, out: str | Path, overrides: list[str] | None = None, force: bool = False
) -> dict:
    """Converts the reference checkpoint `ckpt` into `out` (see the module docstring); `overrides` are
    the training config's, as for act_lightning.train; an existing `out` is replaced only with `force`."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    check_out(Path(ckpt), Path(out), force)
    state, iteration = read_reference(Path(ckpt))
    overrides = list(overrides or [])
    detected = None
    if not any(o.startswith("experiment=") for o in overrides):
        detected = detect_experiment(state)
        overrides.insert(0, f"experiment={detected}")
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        try:
            cfg = compose("train", overrides=[*overrides, "run_dir=converted"])
        except HydraException as err:  # a mistyped override: Hydra's message in one line
            given = " ".join(o for o in overrides if o != f"experiment={detected}")
            raise ValueError(f"overrides {given}: {one_line(str(err))}") from None
    model = instantiate(cfg.model, distance="l2", speed={"channels_last": False})
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("distance.")}
    converted, problems = rename_keys(state, own)
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
        "act_reference_iteration": iteration,  # what trained the weights (checkpoints.trained_iteration)
    }
    with atomic_write(out) as f:
        torch.save(checkpoint, f)
    return {
        "experiment": cfg.experiment_name,
        "tensors": len(converted),
        "out": str(out),
        "reference_iteration": iteration,
    }


def rename_keys(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """The reference tensors under this library's names, and the problems: keys of `state` that have no
    place in `own` (unknown), the wrong shape (mis-shaped) or a place another key took (duplicate: with
    and without `_orig_mod.`), and networks' keys of `own` it lacks (missing), each listed by name as
    the reference's file names its keys."""
    converted, unknown, misshaped, duplicate = {}, [], [], []
    present = set()  # our names of the keys the file holds, whatever their shape (not missing)
    for key, value in state.items():
        reference = plain(key)
        prefix = next((p for p in PREFIXES if reference.startswith(p)), None)
        if prefix is None:
            if not reference.startswith(IGNORED):
                unknown.append(key)
            continue
        name = PREFIXES[prefix] + reference[len(prefix) :]
        present.add(name)
        if name not in own:
            unknown.append(key)
        elif own[name].shape != value.shape:
            misshaped.append(f"{key} {tuple(value.shape)} (expected {tuple(own[name].shape)})")
        elif name in converted:
            duplicate.append(key)
        else:
            converted[name] = value
    networks = [k for k in own if k.startswith(("generator.", "target.", "discriminator."))]
    theirs = {ours: reference for reference, ours in PREFIXES.items()}  # named as the file would hold them
    missing = [  # a key no reference prefix maps to keeps its own name
        next((theirs[p] + k[len(p) :] for p in theirs if k.startswith(p)), k)
        for k in networks
        if k not in present  # a mis-shaped key is listed once, as mis-shaped
    ]
    kinds = (("unknown", unknown), ("mis-shaped", misshaped), ("duplicate", duplicate), ("missing", missing))
    problems = [
        f"{kind} keys: {', '.join(keys[:8])}" + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
        for kind, keys in kinds
        if keys
    ]
    return converted, problems


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m act_lightning.convert_reference",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("ckpt", metavar="CKPT", help="a checkpoint written by the reference code")
    parser.add_argument("out", metavar="OUT", help="the checkpoint to write")
    parser.add_argument("--force", action="store_true", help="replace OUT when it exists")
    parser.add_argument(
        "overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="overrides of the training config, as for act_lightning.train: experiment=NAME (recognised "
        "from the generator when not given), debug=smoke, data=synthetic ...",
    )
    return parser


def one_line(message: str) -> str:
    """Hydra's composition error in one line: its first line, and the options it lists (not its search
    path)."""
    first, _, rest = message.partition("\n")
    options = rest.split("Config search path:")[0].split()
    if "Available options" in rest:
        group = rest.split("Available options in ")[1].split(":")[0]
        return f"{first}; the options in {group}: {', '.join(o for o in options[4:])}"
    return " ".join([first, *options]) if options else first


def main(argv: list[str] | None = None) -> int:
    """`python -m act_lightning.convert_reference CKPT OUT [--force] [experiment=NAME key=value ...]`."""
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # --force anywhere, also among the overrides
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"{', '.join(bad)}: after CKPT and OUT, only key=value overrides")
    try:
        summary = convert(args.ckpt, args.out, args.overrides, force=args.force)
    except REFUSED as err:  # a file that is not the reference's, named with why
        refuse(err)
    trained = summary["reference_iteration"]
    print(
        f"{summary['tensors']} tensors of experiment {summary['experiment']} written to {summary['out']}"
        + (f" (trained {trained} iterations by the reference code)" if trained is not None else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
