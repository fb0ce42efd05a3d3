"""FID cost on this machine: images per second of Inception feature extraction, of one-step sampling with
each paper experiment's generator, the Fréchet distance at 2048-d, and the projected time of a 50k
evaluation (`python -m act_lightning.evaluate`, one sampler) and of a training-time evaluation.

Speed does not depend on the weights, so an untrained Inception stands in when the real file is absent.

    python benchmarks/bench_fid.py                          # all experiments, auto device
    python benchmarks/bench_fid.py --experiments cifar10 --device cuda --batch-size 500
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from act_lightning.metrics.frechet import frechet_distance
from act_lightning.metrics.inception import InceptionFeatures, WeightsError

CONF = Path(__file__).resolve().parents[1] / "conf"


def rate(fn, batch: int, seconds: float, device: torch.device) -> float:
    """Images per second of fn() on `batch` images, after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n == 0:
        fn()
        n += batch
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


@torch.no_grad()
def measure(experiment: str, extractor, batch: int, seconds: float, device) -> tuple[int, float, float]:
    """(image size, feature extraction img/s, one-step sampling img/s with the full-size generator)."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", "run_dir=/tmp/bench-fid"])
    size, channels = cfg.data.image_size, cfg.data.channels
    images = torch.rand(batch, channels, size, size, device=device) * 2 - 1
    extract = rate(lambda: extractor(images), batch, seconds, device)
    model = instantiate(cfg.model, distance="l2").to(device).eval()
    labels = torch.zeros(batch, dtype=torch.long, device=device) if cfg.data.num_classes else None
    sample = rate(lambda: model.sample(torch.randn_like(images), labels), batch, seconds, device)
    return size, extract, sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", nargs="+", default=["cifar10", "imagenet64", "lsun_cat256"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 250 on a GPU, 16 on the CPU")
    parser.add_argument("--seconds", type=float, default=5.0, help="timing window per measurement")
    args = parser.parse_args()
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    batch = args.batch_size or (250 if device.type == "cuda" else 16)

    try:
        extractor, weights = InceptionFeatures(None), "TF-Inception weights"
    except WeightsError:
        extractor, weights = InceptionFeatures("random"), "untrained Inception (same cost)"
    extractor.to(device)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"device: {name}; batch {batch}; {weights}")

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4096, 2048)), rng.normal(size=(4096, 2048)) + 0.1
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
    start = time.perf_counter()
    frechet_distance(*stats[0], *stats[1])
    fd_seconds = time.perf_counter() - start
    print(f"Fréchet distance at 2048-d: {fd_seconds:.2f} s\n")

    columns = ("experiment", "size", "extract img/s", "sample img/s", "50k eval", "10k in training")
    widths = (12, 5, 14, 13, 10, 16)
    header = " ".join(f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, w) in enumerate(zip(columns, widths)))
    print(header)
    print("-" * len(header))
    for experiment in args.experiments:
        size, extract, sample = measure(experiment, extractor, batch, args.seconds, device)
        per_image = 1 / extract + 1 / sample
        minutes = [(n * per_image + fd_seconds) / 60 for n in (50_000, 10_000)]
        print(
            f"{experiment:<12} {size:>5} {extract:>14.1f} {sample:>13.1f} "
            f"{minutes[0]:>8.1f} m {minutes[1]:>14.1f} m"
        )
    print(
        "\n50k eval: one sampler of `evaluate` (a 2-step sampler samples twice). Reference statistics extra."
    )


if __name__ == "__main__":
    main()
