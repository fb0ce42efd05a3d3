"""Images per second each DataModule delivers on this machine, next to what one ACT iteration consumes.

Builds every data source over synthetic files in its official format in a temporary folder, then
times its training loader, the copy to `--device` and the `on_after_batch_transfer` step (uint8 ->
[-1, 1], flips, halves: on the CPU unless a GPU is named), with 0 and 2 worker processes. One ACT
iteration consumes 2 x data.batch_size images per device, so `iter/s fed` is the most iterations
per second the loader could sustain on its own.

    python benchmarks/bench_data.py                 # all sources, workers 0 and 2
    python benchmarks/bench_data.py --sources lsun_cat256 --workers 0 2 4 --seconds 20
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' writers of official formats
from tests.helpers_data import encode, smooth_images, write_cifar10, write_imagenet64  # noqa: E402

from act_lightning.data import (  # noqa: E402
    CIFAR10DataModule,
    FolderDataModule,
    ImageNet64DataModule,
    LSUNDataModule,
)
from act_lightning.data.imagenet64 import prepare_imagenet64  # noqa: E402
from act_lightning.data.lsun import prepare_lsun  # noqa: E402


def photo_like(n: int, height: int, width: int, seed: int) -> np.ndarray:
    """Smooth colour fields plus grain: they cost a codec about what photos cost (flat fields do not)."""
    grain = np.random.default_rng(seed).normal(0, 12, size=(n, height, width, 3))
    return np.clip(smooth_images(n, height, width, seed=seed) + grain, 0, 255).astype(np.uint8)


UNIQUE = 120  # distinct encoded images; the rest repeat them (decoding costs the same, writing far less)


def write_lsun(path: Path, n: int) -> None:
    import hashlib

    import lmdb

    values = []
    for i in range(UNIQUE):
        w, h = ((341, 256), (256, 384), (256, 256))[i % 3]  # LSUN's short side is 256
        values.append(encode(photo_like(1, h, w, seed=i)[0], "WEBP" if i % 2 else "JPEG"))
    path.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=1 << 34)
    with env.begin(write=True) as txn:
        for i in range(n):
            txn.put(hashlib.sha1(str(i).encode()).hexdigest().encode(), values[i % UNIQUE])
    env.close()


def write_folder(path: Path, n: int) -> None:
    values = [encode(photo_like(1, 375, 500, seed=i)[0], "JPEG") for i in range(UNIQUE)]
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (path / f"{i:05d}.jpg").write_bytes(values[i % UNIQUE])


def build(source: str, root: Path, scale: int) -> list[tuple[str, dict]]:
    """(label, DataModule kwargs) for each configuration of `source`, with its files written under root."""
    if source == "cifar10":
        write_cifar10(root / "cifar10", per_batch=2000 * scale)  # 62 batches an epoch
        common = dict(root=root / "cifar10", batch_size=80, download=False, verify=False)
        return [("cifar10", common), ("cifar10 in_memory", dict(common, in_memory=True))]
    if source == "imagenet64":
        write_imagenet64(root / "imagenet64_official", per_file=1000 * scale)  # 15 batches an epoch
        prepare_imagenet64(root / "imagenet64_official", root / "imagenet64", progress=False)
        return [("imagenet64 (prepared)", dict(root=root / "imagenet64", batch_size=320))]
    if source == "lsun_cat256":
        write_lsun(root / "lsun" / "cat", 3200 * scale)  # 20 batches an epoch
        prepare_lsun(
            root / "lsun", root / "lsun_prepared", image_size=256, workers=os.cpu_count() or 1, progress=False
        )
        return [
            ("lsun_cat256 (LMDB)", dict(root=root / "lsun", batch_size=80, image_size=256)),
            ("lsun_cat256 (prepared)", dict(root=root / "lsun_prepared", batch_size=80, image_size=256)),
        ]
    if source == "folder":
        write_folder(root / "folder", 2560 * scale)  # 20 batches an epoch
        return [("folder 500x375 jpg -> 64", dict(root=root / "folder", batch_size=64, image_size=64))]
    raise ValueError(source)


CLASSES = {
    "cifar10": CIFAR10DataModule,
    "imagenet64": ImageNet64DataModule,
    "lsun_cat256": LSUNDataModule,
    "folder": FolderDataModule,
}


def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    return type(batch)(to_device(b, device) for b in batch)


def measure(cls, kwargs: dict, workers: int, seconds: float, device: torch.device) -> tuple[float, int]:
    """Images per second through train_dataloader, the copy to `device` and on_after_batch_transfer."""
    pin = device.type == "cuda"
    dm = cls(**kwargs, num_workers=workers, persistent_workers=workers > 0, pin_memory=pin)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    images, start, warm = 0, None, 2 if workers == 0 else 2 * workers  # skip worker start-up
    seen = 0
    while start is None or time.perf_counter() - start < seconds:
        for batch in loader:
            half = dm.on_after_batch_transfer(to_device(batch, device), 0)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seen += 1
            if seen == warm:
                start = time.perf_counter()
            elif start is not None:
                images += half.gen.shape[0] + half.disc.shape[0]
                if time.perf_counter() - start >= seconds:
                    break
    return images / (time.perf_counter() - start), 2 * dm.batch_size


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sources", nargs="+", default=list(CLASSES), choices=list(CLASSES))
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 2])
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per configuration")
    parser.add_argument("--scale", type=int, default=1, help="multiplies the number of images written")
    parser.add_argument("--device", default="cpu", help="where batches go before on_after_batch_transfer")
    args = parser.parse_args()
    device = torch.device(args.device)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
        f"device {device}"
    )
    print(f"timing {args.seconds:g} s per configuration")
    header = (
        f"{'data source':<26} {'workers':>7} {'images/s':>10} {'images/iteration':>17} {'iter/s fed':>11}"
    )
    rows = [header, "-" * len(header)]
    with tempfile.TemporaryDirectory(prefix="act-bench-data-") as tmp:
        for source in args.sources:
            t0 = time.perf_counter()
            configs = build(source, Path(tmp), args.scale)
            print(f"wrote {source} files in {time.perf_counter() - t0:.1f} s", flush=True)
            for label, kwargs in configs:
                for workers in args.workers:
                    if "in_memory" in label and workers:
                        continue  # the in-memory path has no workers
                    rate, per_iter = measure(CLASSES[source], kwargs, workers, args.seconds, device)
                    rows.append(
                        f"{label:<26} {workers:>7} {rate:>10.0f} {per_iter:>17} {rate / per_iter:>11.2f}"
                    )
                    print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
