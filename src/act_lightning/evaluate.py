"""Evaluation entry point: `python -m act_lightning.evaluate ckpt=PATH [num_samples=50000 ...]`.

FID of `num_samples` samples of the checkpoint's target network for each sampler (1-step and 2-step by
default), against the reference statistics of its training config. Printed, and written as JSON next to
the checkpoint. `evaluate(cfg)` is a plain function (tests call it); `main()` is the thin Hydra shell.
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from torch import nn
from tqdm import tqdm

from act_lightning.atomic import atomic_write
from act_lightning.checkpoints import build_model, load_checkpoint, trained_iteration
from act_lightning.checks import check_count, check_names
from act_lightning.commands import (
    CONFIG_DIR,
    REFUSED,
    check_net,
    check_output_file,
    refuse,
    resolve_device,
)
from act_lightning.consistency import ConsistencySchedule
from act_lightning.environment import environment, latest_environment
from act_lightning.metrics.extra import NEED_REAL_IMAGES, ExtraMetrics, check_metrics, real_references
from act_lightning.metrics.fid import (
    build_feature_extractor,
    check_reference_spec,
    reference_statistics,
    sample_statistics,
)
from act_lightning.metrics.frechet import LazyRoot, frechet_distance
from act_lightning.metrics.inception import check_quantize
from act_lightning.metrics.reference import check_reference_images, require_reference_images
from act_lightning.sample import check_taus, heun_record, two_step_tau
from act_lightning.seeds import EVALUATION, check_seed, image_noise

log = logging.getLogger(__name__)


EVAL_DEFAULTS = {  # a run trained without an evaluation callback (eval: null) is scored with these (on the
    # quickstart's digits: with its digit-classifier features, as `fd`)
    "features": "inception",
    "key": "val/fid",
    "inception_weights": None,
    "inception_resize": None,
    "download": True,
    "reference": "train",
    "reference_cache": None,
    "reference_max_images": None,
    "quantize": "round",
}


def _apply_overrides(run: DictConfig, cfg: DictConfig) -> DictConfig:
    """The run's evaluation settings (its FrechetEvaluation arguments) and data, with the non-null keys
    of `cfg.eval` and `cfg.data` put over them."""
    trained, defaults = run.get("eval"), dict(EVAL_DEFAULTS)
    if trained is None and "Digits" in str(OmegaConf.select(run, "data._target_", default="")):
        defaults["features"] = "digits"  # the quickstart's: Inception sees nothing in 8x8 digits
    ev = OmegaConf.merge(defaults, trained or {})
    given = cfg.get("eval") or {}
    for key, value in given.items():
        if value is not None:
            ev[key] = value
    if given.get("key") is None and (trained is None or given.get("features") is not None):
        ev.key = "val/fd" if ev.features == "digits" else "val/fid"  # the name follows the features
    if ev.inception_weights != "random" and given.get("inception_resize") is None:
        ev.inception_resize = None  # a smoke run's smaller input was for its random network only
    trained_root = run.data.get("root")
    for key, value in (cfg.get("data") or {}).items():
        if value is not None:
            run.data[key] = value
    cache, root = ev.get("reference_cache"), run.data.get("root")
    moved = cache and trained_root and root != trained_root and given.get("reference_cache") is None
    if moved and Path(cache).is_relative_to(trained_root):
        # the cache the run kept beside its data (reference=train) moves with data.root: the old place's
        # statistics are of the data that was there
        ev.reference_cache = str(Path(root) / Path(cache).relative_to(trained_root))
    return ev


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluates `cfg.ckpt`; returns (and writes) the results."""
    lap = Laps()
    checkpoint, run = load_checkpoint(cfg.ckpt)  # (ckpt=null refused there, before any Path of it)
    lap("checkpoint")
    ev = _apply_overrides(run, cfg)
    check_options(cfg, run)
    seeds = sampling_seeds(cfg)
    output = output_file(cfg, Path(cfg.ckpt))
    asked = cfg.get("metrics") or ["fid"]
    metrics = check_metrics(asked, ev.features, count=("num_samples", cfg.num_samples))
    quantize = recorded_quantize(ev, (cfg.get("eval") or {}).get("quantize"), metrics)
    weights, dinov2_weights = required_files(cfg, ev, metrics, run)  # before the networks are built
    device, tf32 = resolve_device(cfg.device), use_tf32(cfg, run)
    model = build_model(checkpoint, run, device)
    lap("networks")
    datamodule = reference_datamodule(ev, run)
    extractor, reference = build_reference(ev, datamodule, weights, cfg.batch_size, device)
    dinov2 = None if dinov2_weights is None else build_dinov2(ev, dinov2_weights, device)
    lap("reference")
    real, dinov2_reference, num_real = real_references(  # kid/pr's and fd_dinov2's: one read of the images
        metrics, str(ev.reference), datamodule, extractor, dinov2, cfg.num_samples, cfg.batch_size, device
    )
    lap("real_references")
    name = ev.key.split("/")[-1]  # fid (Inception features) or fd (the quickstart's)
    results = {}
    for sampler in cfg.samplers:
        per_seed = []
        for seed in seeds:
            taps = ExtraMetrics(metrics, extractor, dinov2)
            result = score_sampler(cfg, sampler, model, run, taps.extractor, reference, name, device, seed)
            result.update(taps.values(real, dinov2_reference))
            per_seed.append(result)
        results[sampler] = over_seeds(per_seed, seeds)
    lap("samplers")
    summary = {
        "checkpoint": str(Path(cfg.ckpt).resolve()),
        "iteration": trained_iteration(checkpoint),
        "experiment": run.get("experiment_name"),
        "net": cfg.net,
        "num_samples": cfg.num_samples,
        "seed": seeds[0],
        "seeds": seeds,
        "features": ev.features,
        "metrics": [name if m == "fid" else m for m in metrics],  # as in results: fd with the digits
        "reference": str(ev.reference),
        "num_real": num_real,  # real images kid, pr and fd_dinov2 compare with (None: none of them)
        "quantize": quantize,
        "inception_resize": ev.inception_resize if ev.features == "inception" else None,
        "device": str(device),
        "tf32": tf32,
        "results": results,
        "stage_seconds": lap.seconds,
        "environment": environment(),  # what measured; the last launch's of the run: what trained
        "trained_with": latest_environment(checkpoint.get("act_history")),
    }
    with atomic_write(output) as f:  # a stopped command leaves no truncated file
        f.write(json.dumps(summary, indent=2).encode())
    summary["output"] = str(output)
    return summary


class Laps:
    """Wall-clock seconds of consecutive stages: `lap(name)` ends the stage begun at the last lap (or at
    creation); `seconds` maps each name to its duration and `total` to the time since creation, rounded
    to 0.1 s. What an evaluation spends besides its samplers (reading the checkpoint, building networks
    on the device, the reference statistics) then shows in its JSON; the process's start and imports come
    before it."""

    def __init__(self) -> None:
        self._laps: dict[str, float] = {}
        self._last = self._first = time.perf_counter()

    def __call__(self, name: str) -> None:
        if name == "total":
            raise ValueError("'total' is the sum's name, not a stage's")
        if name in self._laps:
            raise ValueError(f"stage {name!r} timed twice")
        now = time.perf_counter()
        self._laps[name], self._last = now - self._last, now

    @property
    def seconds(self) -> dict[str, float]:
        laps = {**self._laps, "total": self._last - self._first}
        return {name: round(value, 1) for name, value in laps.items()}


def required_files(cfg: DictConfig, ev: DictConfig, metrics: list[str], run: DictConfig) -> tuple:
    """The Inception and DINOv2 weights files and the reference the metrics need, each refused by name
    when missing (a reference batch also when its images are not the model's size), before anything is
    built: (inception weights or None, DINOv2 weights or None)."""
    from act_lightning.metrics.inception import check_inception_resize, resolve_inception_weights

    weights = None
    if ev.features == "inception":
        check_inception_resize(ev.inception_resize, ev.inception_weights)
        weights = resolve_inception_weights(ev.inception_weights, ev.download)
    dinov2_weights = None
    if "fd_dinov2" in metrics:
        from act_lightning.metrics.dinov2 import resolve_dinov2_weights

        dinov2_weights = resolve_dinov2_weights(cfg.get("dinov2_weights"), bool(ev.download))
    check_reference_spec(ev.reference)
    if str(ev.reference) != "train":
        check_reference_images(Path(ev.reference), int(run.data.image_size), int(run.data.channels))
        if real := [m for m in metrics if m in NEED_REAL_IMAGES]:
            require_reference_images(Path(ev.reference), real)
    return weights, dinov2_weights


def build_dinov2(ev: DictConfig, weights, device) -> nn.Module:
    """DINOv2's feature extractor (FD-DINOv2's reference: `real_references`, as many real images of the
    reference as samples are drawn)."""
    from act_lightning.metrics.dinov2 import load_dinov2

    return load_dinov2(weights, ev.quantize).to(device)


def sampling_seeds(cfg: DictConfig) -> list[int]:
    """`seeds` (a list: each sampler is scored once per seed) or `[seed]`."""
    seeds = cfg.get("seeds")
    if seeds is None:
        return [check_seed(cfg.seed)]
    if isinstance(seeds, (int, str)) or not len(seeds) or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of integers, e.g. seeds=[0,1,2]; got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must not repeat a seed; got {list(seeds)}")
    return [int(s) for s in seeds]


def over_seeds(per_seed: list[dict], seeds: list[int]) -> dict:
    """One sampler's result: with one seed, that seed's; with several, for each metric its mean over the
    seeds, its sample standard deviation (`<metric>_std`, n - 1 in the denominator) and every seed's value
    (`<metric>_per_seed`)."""
    if len(per_seed) == 1:
        return per_seed[0]
    out: dict[str, Any] = {}
    described = ("taus", "sampler", "heun_steps")  # how it sampled: the same for every seed
    for key in per_seed[0]:
        if key in (*described, "seconds"):
            continue
        values = [r[key] for r in per_seed]
        out[key] = statistics.fmean(values)
        out[f"{key}_std"] = statistics.stdev(values)
        out[f"{key}_per_seed"] = dict(zip(map(str, seeds), values, strict=True))
    out.update({key: per_seed[0][key] for key in described if key in per_seed[0]})
    out["seconds"] = round(sum(r["seconds"] for r in per_seed), 1)
    return out


def use_tf32(cfg: DictConfig, run: DictConfig) -> bool:
    """TF32 matmuls and convolutions on GPUs that have them, as the command's `tf32` says (null: as the
    run trained and measured its val/fid, whose samples `evaluate` reproduces only with the same
    arithmetic); PyTorch's own default, TF32 convolutions but not matmuls, is neither."""
    tf32 = cfg.get("tf32")
    tf32 = OmegaConf.select(run, "tf32", default=True) if tf32 is None else tf32
    if not isinstance(tf32, bool):
        raise ValueError(f"tf32 must be true, false or null (as the run); got {tf32!r}")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    return tf32


def output_file(cfg: DictConfig, ckpt: Path) -> Path:
    """Where the JSON goes (`output`, or `<checkpoint>.eval.json`), its folder checked before sampling."""
    output = Path(cfg.output) if cfg.output else ckpt.with_name(ckpt.name + ".eval.json")
    if output.exists() and ckpt.exists() and output.resolve() == ckpt.resolve():
        raise ValueError(f"output={output} is the checkpoint being evaluated: name a JSON file to write")
    if output.is_file() and output.suffix != ".json":  # a rerun replaces its JSON, nothing else
        raise ValueError(
            f"output={output} already exists and is no .json file (a checkpoint, an image?): evaluate would "
            "replace it with its JSON; name a .json file"
        )
    return check_output_file(output, "output")


def recorded_quantize(ev: DictConfig, given: str | None, metrics: list[str]) -> str | None:
    """How generated images become uint8 before the networks that read uint8 images (Inception, and
    DINOv2 for fd_dinov2), or None where no network reads them so (the digits features read the floats):
    then a quantisation given on the command line would change nothing, and is refused by name."""
    check_quantize(ev.quantize)
    if ev.features == "inception" or "fd_dinov2" in metrics:
        return ev.quantize
    if given is not None:
        raise ValueError(
            f"eval.quantize={given}: the {ev.features} features read the generated images as floats, "
            "unquantised; eval.quantize applies to eval.features=inception and to metrics=[...,fd_dinov2]"
        )
    return None


def reference_datamodule(ev: DictConfig, run: DictConfig):
    """The run's data module when the reference is its training set (`train`), else None (a file)."""
    from hydra.utils import instantiate

    return instantiate(run.data) if str(ev.reference) == "train" else None


def resolve_taus(cfg: DictConfig, run: DictConfig) -> None:
    """Each sampler's noise levels after the first step, checked against the run's schedule (decreasing,
    in (sigma_min, sigma_max)) and named by their key: a sampler whose levels are null (the default 2-step)
    takes `two_step_tau`, by default the run's."""
    tau = cfg.get("two_step_tau")
    schedule = run.model.get("schedule") or {}  # its keys, or the schedule's defaults
    low = float(schedule.get("sigma_min", ConsistencySchedule.sigma_min))
    high = float(schedule.get("sigma_max", ConsistencySchedule.sigma_max))
    for name in cfg.samplers:
        key, levels = f"taus.{name}", cfg.taus[name]
        if levels is None:
            levels = [two_step_tau(run) if tau is None else tau]
            key = "two_step_tau" if tau is not None else "the run's two_step_tau"
        steps = re.fullmatch(r"(\d+)-step", str(name))
        if (
            steps and isinstance(levels, (list, ListConfig)) and len(levels) != int(steps.group(1)) - 1
        ):  # a sampler named for a count it does not run
            raise ValueError(
                f"{key}={list(levels)}: {name} takes {int(steps.group(1)) - 1} level(s) after the first "
                f"step, got {len(levels)}; name a sampler of another count yourself, e.g. "
                "'+taus.three=[5.0,0.8]' samplers=[1-step,three]"
            )
        try:
            cfg.taus[name] = check_taus(levels, low, high)
        except ValueError:
            shown = levels if key.startswith("taus.") else levels[0]
            raise ValueError(
                f"{key}={shown}: the noise levels after the first step (at sigma_max={high:g}) must be "
                f"numbers that decrease and stay above sigma_min={low:g}"
            ) from None


def check_options(cfg: DictConfig, run: DictConfig | None = None) -> None:
    """The command's own options (samplers, sizes, net), named by their keys; with the checkpoint's
    training config `run`, the samplers its model can use and their levels (`resolve_taus`), before any
    network is built."""
    check_names(cfg.samplers, "samplers", "[1-step]")
    unknown = [name for name in cfg.samplers if name not in cfg.taus]
    if unknown:
        raise ValueError(
            f"samplers={list(cfg.samplers)}: {', '.join(unknown)} not in taus ({', '.join(cfg.taus)}); "
            "add one with '+taus.NAME=[t_2,...]' (a NAME that starts with a letter, as Hydra's keys do)"
        )
    for name in cfg.samplers:
        if not isinstance(cfg.taus[name], (ListConfig, type(None))):
            raise ValueError(f"taus.{name}={cfg.taus[name]}: a list of noise levels, e.g. [5.0,0.8]")
    objective = OmegaConf.select(run, "model.objective", default="consistency") if run is not None else None
    multistep = [name for name in cfg.samplers if cfg.taus[name] is None or len(cfg.taus[name])]
    if objective == "diffusion" and multistep:
        raise ValueError(
            f"samplers={list(cfg.samplers)}: {', '.join(multistep)} samples in several consistency steps, "
            "but this checkpoint is a diffusion model (model.objective=diffusion), which is sampled with "
            "EDM's Heun sampler (model.heun_steps) alone: evaluate it with samplers=[1-step]"
        )
    check_count(cfg.num_samples, "num_samples", 2)  # a covariance needs two samples
    check_count(cfg.batch_size, "batch_size")
    check_net(cfg.net)
    if run is not None:
        resolve_taus(cfg, run)


def build_reference(ev: DictConfig, datamodule, weights, batch_size: int, device: torch.device):
    """(feature extractor, reference (mu, sigma, sigma^(1/2))) of the evaluation settings `ev`
    (`datamodule`: `reference_datamodule`'s): the root is computed once here, not in every sampler's and
    seed's Fréchet distance (at 2048-d it is half of each distance's work)."""
    extractor = (
        build_feature_extractor(
            ev.features,
            inception_weights=weights,
            quantize=ev.quantize,
            inception_resize=ev.inception_resize,
        )
        .to(device)
        .eval()
    )
    reference = reference_statistics(
        extractor,
        ev.reference,
        datamodule=datamodule,
        features=ev.features,
        cache=ev.reference_cache,
        max_images=ev.reference_max_images,
        batch_size=batch_size,
        device=device,
    )
    return extractor, (*reference, LazyRoot(reference[1]))


def score_sampler(
    cfg: DictConfig, sampler: str, model, run, extractor, reference, name, device, seed: int
) -> dict:
    """{name: the Frechet distance of `sampler`'s samples (noise from `seed`) to `reference`, taus,
    seconds}."""
    net = model.target if cfg.net == "target" else model.generator
    taus = [float(model.schedule.sigma_max), *(float(t) for t in cfg.taus[sampler])]

    shape = (run.data.channels, run.data.image_size, run.data.image_size)

    def sample(noise, labels, indices):  # the fresh noise of later steps: also each sample's own
        step_noise = lambda step: image_noise(seed, indices, shape, (EVALUATION, step))  # noqa: E731
        return model.sample(noise, labels, net=net, taus=taus[1:], step_noise=step_noise)

    start = time.perf_counter()
    with tqdm(total=cfg.num_samples, desc=f"{sampler} {name.upper()}", unit="img") as bar:
        stats = sample_statistics(
            sample,
            extractor,
            cfg.num_samples,
            cfg.batch_size,
            shape,
            model.hparams.num_classes,
            seed,
            device,
            progress=bar.update,
        )
    value = frechet_distance(*stats, *reference)  # reference: (mu, sigma, sigma's root)
    log.info("%s %s = %.4f (%d samples, seed %d)", sampler, name.upper(), value, cfg.num_samples, seed)
    return {name: value, "taus": taus, **heun_record(model), "seconds": round(time.perf_counter() - start, 1)}


def _number(value: float) -> str:
    return f"{value:.4f}" if value == 0 or not math.isfinite(value) or abs(value) >= 1e-2 else f"{value:.3e}"


def result_line(sampler: str, result: dict, seeds: int) -> str:
    """One sampler's metrics in one line, named as in the JSON: `1-step: fid 5.1409, is 1.0012, ...`;
    over several seeds each as mean ± sample standard deviation. A diffusion model's line says that it
    sampled with Heun's sampler in several network evaluations, not in one step."""
    shown = []
    for key, value in result.items():
        if key in ("taus", "sampler", "heun_steps", "seconds") or key.endswith("_per_seed"):
            continue
        if key.endswith("_std") and key.removesuffix("_std") in result and seeds > 1:
            continue  # shown with its mean
        spread = result.get(f"{key}_std") if seeds > 1 else None
        shown.append(f"{key} {_number(value)}" + ("" if spread is None else f" ± {_number(spread)}"))
    over = f" ({seeds} seeds)" if seeds > 1 else ""
    if result.get("sampler") == "heun":  # a diffusion model: its "1-step" is EDM's Heun sampler
        steps = result["heun_steps"]
        sampler = f"{sampler} (EDM's Heun sampler: {steps} levels, {2 * steps - 1} network evaluations)"
    return f"{sampler}: {', '.join(shown)}{over}"


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        summary = evaluate(cfg)
    except (*REFUSED, MissingMandatoryValue) as err:  # a bad option or checkpoint, named by its key
        refuse(err)
    for sampler, result in summary["results"].items():
        print(result_line(sampler, result, len(summary["seeds"])))
    print(f"written to {summary['output']}")


if __name__ == "__main__":
    main()
