"""FID as used in training (callbacks.FrechetEvaluation) and by `python -m act_lightning.evaluate`.

Pure torch: feature extractors by name, statistics of real and generated images, reference statistics
(published or the training set's, cached). Sample i's noise (and label) is seeded by i
(`evaluation_noise`); samples come in chunks of `batch_size`, and rank r of `world_size` takes chunks
r, r + world_size, ...; with the float64 feature sums all-reduced, one process and many, at any batch
size, evaluate the same samples and give the same FID.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from act_lightning.metrics.frechet import FeatureStatistics
from act_lightning.metrics.reference import (
    ReferenceStatisticsError,
    load_reference,
    missing_reference_message,
    save_reference,
)
from act_lightning.seeds import EVALUATION, mix_seed

log = logging.getLogger(__name__)

FEATURES = ("inception", "digits")
# (noise, labels, the samples' indices) -> images in [-1, 1]
Sampler = Callable[[Tensor, Tensor | None, range], Tensor]


DIGITS_SEED = 0  # the quickstart's classifier is the same in every run: one ruler for every seed


def build_feature_extractor(
    name: str,
    inception_weights: str | None = None,
    quantize: str = "round",
    inception_resize: int | None = None,
) -> nn.Module:
    """'inception' (FID: 2048-d TF-Inception features of images quantised to uint8 by `quantize`;
    `inception_weights` a resolved path or 'random', `inception_resize` None (299) or the random
    network's smaller input) or 'digits' (the quickstart's classifier, trained at start-up from a
    constant seed, so that distances are comparable across runs and seeds)."""
    if name == "inception":
        from act_lightning.metrics.inception import InceptionFeatures

        return InceptionFeatures(inception_weights, quantize=quantize, resize=inception_resize)
    if name == "digits":
        from act_lightning.metrics.digits import DigitsFeatures

        return DigitsFeatures.trained(seed=DIGITS_SEED)
    raise ValueError(f"eval.features must be one of {', '.join(FEATURES)}; got {name!r}")


def check_reference_spec(reference: str) -> None:
    """Fails at start-up when eval.reference names a file that is not there."""
    if str(reference) != "train" and not Path(reference).is_file():
        raise ReferenceStatisticsError(missing_reference_message(Path(reference)))


@torch.no_grad()
def feature_statistics(
    extractor: nn.Module,
    batches: Iterable[Tensor],
    device,
    sync: bool = True,
    progress: Callable[[int], None] | None = None,
    real: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the features of batches of images in [-1, 1]; summed across ranks if `sync`.
    `real`: a data set's images (8-bit levels, never truncated: `InceptionFeatures.features_and_logits`)."""
    stats = FeatureStatistics(extractor.num_features, sync_on_compute=sync).to(device)
    for images in batches:
        stats.update(extractor(images.to(device), real=real))
        if progress is not None:
            progress(images.shape[0])
    return stats.compute()


class EvaluationStopped(Exception):
    """An evaluation given up part-way: its caller's `stop` said so (a stop signal), on every rank."""


def sample_chunks(
    num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1
) -> list[tuple[int, int]]:
    """(chunk index, size) of the chunks of samples that `rank` draws."""
    n = math.ceil(num_samples / batch_size)
    return [(c, min(batch_size, num_samples - c * batch_size)) for c in range(rank, n, world_size)]


def evaluation_noise(
    seed: int, indices: range, shape: tuple[int, ...], num_classes: int | None
) -> tuple[Tensor, Tensor | None]:
    """The fixed noise z (and class labels) of an evaluation's samples `indices`, on the CPU: sample i's
    from its own generator (seed, i, EVALUATION, 0), so an evaluation draws the same images whatever its
    batch size or process count (`evaluate batch_size=...` reproduces a training run's val/fid)."""
    generators = [torch.Generator().manual_seed(mix_seed(seed, i, EVALUATION, 0)) for i in indices]
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
    if not num_classes:
        return noise, None
    return noise, torch.stack([torch.randint(num_classes, (), generator=g) for g in generators])


def sample_statistics(
    sample: Sampler, extractor: nn.Module, num_samples: int, batch_size: int, *args, **kwargs
) -> tuple[np.ndarray, np.ndarray]:
    """Feature statistics of `num_samples` generated images, all ranks together: one set of
    `sample_subset_statistics` (the further arguments are its own, from `shape` on)."""
    return sample_subset_statistics(sample, extractor, 1, num_samples, batch_size, *args, **kwargs)[0]


@torch.no_grad()
def sample_subset_statistics(
    sample: Sampler,
    extractor: nn.Module,
    num_subsets: int,
    subset_size: int,
    batch_size: int,
    shape: tuple[int, ...],
    num_classes: int | None = None,
    seed: int = 0,
    device="cpu",
    rank: int = 0,
    world_size: int = 1,
    progress: Callable[[int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Feature statistics of `num_subsets` disjoint sets of `subset_size` generated images (samples
    s * subset_size ... (s + 1) * subset_size - 1 form set s), all ranks together: the Frechet distance
    of each at a chosen sample count, which sets its bias. The ranks draw in rounds of one chunk each;
    after each round but the last every rank calls `stop` (a collective, when it is one), and all raise
    EvaluationStopped when it says so."""
    stats = [FeatureStatistics(extractor.num_features).to(device) for _ in range(num_subsets)]
    total = num_subsets * subset_size
    chunks = sample_chunks(total, batch_size, rank, world_size)
    rounds = math.ceil(math.ceil(total / batch_size) / world_size)  # alike on every rank
    for round_ in range(rounds):
        if round_ < len(chunks):  # the last round leaves ranks without a chunk when they do not divide
            chunk, size = chunks[round_]
            start = chunk * batch_size  # the index of the chunk's first sample
            indices = range(start, start + size)
            noise, labels = evaluation_noise(seed, indices, shape, num_classes)
            images = sample(noise.to(device), None if labels is None else labels.to(device), indices)
            features = extractor(images)
            for s in range(start // subset_size, (start + size - 1) // subset_size + 1):
                lo = max(start, s * subset_size) - start
                hi = min(start + size, (s + 1) * subset_size) - start
                stats[s].update(features[lo:hi])
            if progress is not None:
                progress(size)
        if stop is not None and round_ + 1 < rounds and stop():  # a finished evaluation is kept
            raise EvaluationStopped(f"stopped after {round_ + 1} rounds of sampling")
    return [s.compute() for s in stats]


def reference_statistics(
    extractor: nn.Module,
    reference: str,
    datamodule=None,
    features: str = "inception",
    cache: str | Path | None = None,
    max_images: int | None = None,
    batch_size: int = 500,
    device="cpu",
    rank: int = 0,
    world_size: int = 1,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The reference (mu, sigma): `reference` = "train" (the datamodule's reference set, read by the
    ranks together) or an .npz file (mu/sigma, or images under arr_0). Statistics computed here are kept
    in `cache` (an .npz with the facts they were made from: the data, the features and the extractor's
    `cache_key`, e.g. random Inception weights or another input size) and read from it while those facts
    hold.
    `progress(n)` is called after each batch of n images this process reads (a progress bar)."""
    n = extractor.num_features
    cache = Path(cache) if cache else None
    if str(reference) == "train":
        if datamodule is None:
            raise ValueError("eval.reference=train needs the training data (a datamodule)")
        dataset = datamodule.build_reference_dataset()
        count = min(len(dataset), max_images or len(dataset))
        sizes = dict(num_images=count, dataset_size=len(dataset), image_size=datamodule.image_size)
        channels = getattr(datamodule, "channels", 3)  # a colour set's images read grey are another set
        meta = _cache_facts(extractor, "train", features, channels=channels, **sizes)
        meta |= _data_digest(datamodule) if cache is not None else {}
        cached = _read_cache(cache, meta, n)
        if _all_ranks_have(cached is not None, device):
            return cached
        if rank == 0:
            log.info("Computing the %s statistics of %d training images ...", features, count)
        loader = datamodule.reference_dataloader(batch_size, rank, world_size, dataset, max_images)
        stats = feature_statistics(extractor, (x for x, _ in loader), device, progress=progress, real=True)
    else:
        path = Path(reference).resolve()
        st = path.stat()  # an .npz rewritten with other images of the same shape has the same size
        meta = _cache_facts(extractor, str(path), features, file_size=st.st_size, file_mtime=st.st_mtime_ns)
        cached = _read_cache(cache, meta, n)
        if cached is not None:
            return cached
        computed = []

        def extract(batches):  # an image batch (arr_0): each rank reads it whole, no all-reduce
            computed.append(True)
            return feature_statistics(extractor, batches, device, sync=False, progress=progress, real=True)

        stats = load_reference(path, n, extract, batch_size)
        if not computed:
            return stats  # published mu/sigma: nothing worth caching
    if rank == 0 and cache is not None:
        try:
            save_reference(cache, *stats, **meta)
            log.info("Reference statistics cached in %s", cache)
        except OSError as e:  # a read-only data folder: evaluate anyway, recompute next time
            log.warning("Could not cache the reference statistics at %s: %s", cache, e)
    return stats


def _all_ranks_have(cached: bool, device) -> bool:
    """Whether every DDP rank read the cache: the ranks compute the training set's statistics together
    (an all-reduce), so one rank without it (a node-local cache that only rank 0's node wrote) made the
    others return and left it waiting in the all-reduce for good. All compute unless all have it."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return cached
    flag = torch.tensor(int(cached), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _cache_facts(extractor: nn.Module, source: str, features: str, **facts) -> dict:
    """What cached statistics were made from: the source, the features and the extractor's `cache_key`
    (e.g. random Inception weights, another input size), and the source's own facts (sizes). `levels`:
    real images are read at their 8-bit levels; caches from before lack it and are made again (with
    eval.quantize=truncate they held truncated real images)."""
    key = getattr(extractor, "cache_key", "")
    return {"source": source, "features": features, "extractor": key, "levels": "exact", **facts}


def _data_digest(datamodule) -> dict:
    """The data's own digest among the cache's facts (`reference_fingerprint`, where the data have one):
    other images at the same count (a folder's replaced by others) are computed anew."""
    fingerprint = getattr(datamodule, "reference_fingerprint", None)
    digest = fingerprint() if fingerprint is not None else None
    return {} if digest is None else {"data": digest}


def _read_cache(path: Path | None, meta: dict, num_features: int):
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            if any(k not in npz.files or str(npz[k]) != str(v) for k, v in meta.items()):
                return None  # made from other data or with another extractor: recompute
        return load_reference(path, num_features)
    except (ValueError, OSError):
        return None
