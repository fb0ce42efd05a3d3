"""The metrics papers report beside FID, from the features FID already extracts (no second pass):
Inception Score (from the same network's logits), KID and precision/recall (from the pool features of
generated and real images). The arithmetic is torch-fidelity's (`metric_isc`, `metric_kid`,
`metric_prc`), the implementation the field's tables come from; this module feeds it features.

`python -m act_lightning.evaluate metrics=[fid,is,kid,pr]` computes them per sampler (and per seed).
`fd_dinov2` is the Fréchet distance in DINOv2 ViT-L/14's features (EDM2's FD-DINOv2, metrics.dinov2): a
second network sees the same generated images (`SecondFeatures`), no second sampling pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from act_lightning.checks import check_names
from act_lightning.metrics.frechet import LazyRoot, frechet_distance, statistics_of
from act_lightning.metrics.reference import reference_image_features

log = logging.getLogger(__name__)

METRICS = (
    "fid",
    "is",
    "kid",
    "pr",
    "fd_dinov2",
)  # is: Inception Score; kid: Kernel Inception Distance; pr: precision/recall; fd_dinov2: FD in DINOv2's
NEED_REAL = ("kid", "pr")  # these compare sets of features, not statistics: they need real images
NEED_REAL_IMAGES = (*NEED_REAL, "fd_dinov2")  # FD-DINOv2 computes its reference from real images too
NEED_LOGITS = ("is",)  # only the Inception network has class logits


PR_NEIGHBOURHOOD = 3  # k of improved precision/recall's k-nearest-neighbour radii (torch-fidelity's default)


def check_metrics(
    metrics: Iterable[str], features: str, key: str = "metrics", count: tuple[str, int] | None = None
) -> list[str]:
    """The requested metrics, refused by name (`key`) when unknown or impossible with these features, or
    (`count`: the key and value of the generated images' count) with so few images."""
    metrics = check_names(metrics, key, "[fid,kid]")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics or "fid" not in metrics:
        raise ValueError(
            f"{key} must list fid (the run's Fréchet distance; with the digits features it is reported as "
            f"fd) and any of {', '.join(METRICS[1:])}; got {metrics}"
        )
    if features != "inception" and any(m in NEED_LOGITS for m in metrics):
        raise ValueError(f"{key}=[is] needs eval.features=inception (class logits); got {features}")
    if count is not None and "pr" in metrics and count[1] <= PR_NEIGHBOURHOOD:
        raise ValueError(
            f"{key}=[...,pr] with {count[0]}={count[1]}: precision and recall compare each image with its "
            f"{PR_NEIGHBOURHOOD} nearest neighbours, so they need at least {PR_NEIGHBOURHOOD + 1} images"
        )
    return metrics


class FeatureRecorder:
    """Keeps every batch of features an extractor returns (and, with `logits`, the Inception network's
    class logits of the same forward pass) while the FID statistics are accumulated."""

    def __init__(self, extractor: nn.Module, logits: bool = False) -> None:
        self.extractor = extractor
        self.features: list[Tensor] = []
        self.logits: list[Tensor] | None = [] if logits else None
        self.num_features = extractor.num_features

    def __call__(self, images: Tensor, real: bool = False) -> Tensor:
        if self.logits is not None:
            features, logits = self.extractor.features_and_logits(images, real)
            self.logits.append(logits.cpu())
        else:
            features = self.extractor(images, real)
        self.features.append(features.float().cpu())
        return features

    def all_features(self) -> Tensor:
        return torch.cat(self.features)  # (N, D)

    def all_logits(self) -> Tensor:
        return torch.cat(self.logits)  # (N, 1008)


class SecondFeatures:
    """Passes each batch of generated images to `main` (the FID extractor, or a FeatureRecorder around
    it), whose features it returns, and to `second` (DINOv2), whose features it keeps: one sampling pass
    for both metrics."""

    def __init__(self, main, second: nn.Module) -> None:
        self.main, self.second = main, second
        self.num_features = main.num_features
        self.features: list[Tensor] = []

    def __call__(self, images: Tensor, real: bool = False) -> Tensor:
        self.features.append(self.second(images, real).float().cpu())
        return self.main(images, real)

    def all_features(self) -> Tensor:
        return torch.cat(self.features)


class RealReferences(NamedTuple):
    """What kid/pr and fd_dinov2 compare generated images with (`real_references`)."""

    features: Tensor | None  # the FID network's features of the real images, for kid and pr
    dinov2: tuple | None  # their DINOv2 statistics (mu, sigma, sigma^(1/2)), for fd_dinov2
    count: int | None  # how many real images were read (None: none were needed)


def real_references(
    metrics: list[str],
    reference: str,
    datamodule,
    extractor: nn.Module,
    dinov2: nn.Module | None,
    count: int,
    batch_size: int,
    device,
) -> RealReferences:
    """What the metrics compare generated images with, from one read of up to `count` real images of the
    reference (`reference_image_features`): their FID features for kid and pr (None without those) and
    their DINOv2 statistics (mu, sigma, sigma^(1/2)) for fd_dinov2 (None without `dinov2`). When both are
    asked, each batch goes to both networks (`SecondFeatures`): the reference images are read once. A
    reference with fewer images than `count` (an ADM reference batch holds 10,000) is said in the log."""
    need_real = any(m in NEED_REAL for m in metrics)
    if dinov2 is None and not need_real:
        return RealReferences(None, None, None)
    if dinov2 is None:
        tap = extractor
    else:
        tap = SecondFeatures(extractor, dinov2) if need_real else dinov2
    first = reference_image_features(reference, datamodule, tap, count, batch_size, device)
    if "pr" in metrics and len(first) <= PR_NEIGHBOURHOOD:  # as the generated images' count is checked
        raise ValueError(
            f"eval.reference={reference} holds {len(first)} real image(s): precision and recall "
            f"(metrics=[...,pr]) compare each image with its {PR_NEIGHBOURHOOD} nearest neighbours, so they "
            f"need at least {PR_NEIGHBOURHOOD + 1}"
        )
    if len(first) < count:
        log.warning(
            "eval.reference=%s holds %d real images, fewer than the %d generated ones: %s compare %d "
            "generated images with %d real ones (eval.reference=train reads the whole data set)",
            reference,
            len(first),
            count,
            ", ".join(m for m in metrics if m in NEED_REAL_IMAGES),
            count,
            len(first),
        )
    if dinov2 is None:
        return RealReferences(first, None, len(first))
    mu, sigma = statistics_of(tap.all_features() if need_real else first)
    return RealReferences(first if need_real else None, (mu, sigma, LazyRoot(sigma)), len(first))


class ExtraMetrics:
    """The metrics beside FID of one set of generated images. `extractor` is what the FID statistics are
    accumulated with: it records the FID network's features (and logits for `is`) when is, kid or pr are
    asked for, and passes the same images to DINOv2 for fd_dinov2; `values` then computes them."""

    def __init__(self, metrics: list[str], fid_extractor: nn.Module, dinov2: nn.Module | None = None) -> None:
        self.metrics = metrics
        wanted = [m for m in metrics if m not in ("fid", "fd_dinov2")]
        self.recorder = FeatureRecorder(fid_extractor, logits="is" in metrics) if wanted else None
        self.second = SecondFeatures(self.recorder or fid_extractor, dinov2) if dinov2 is not None else None
        self.extractor = self.second or self.recorder or fid_extractor

    def values(
        self,
        real: Tensor | None,
        dinov2_reference: tuple | None,
        gather: Callable[[Tensor], Tensor] = lambda t: t,
    ) -> dict[str, float]:
        """The metrics from what was recorded (`gather`: all ranks' rows of a tensor), `real` the real
        images' FID features (kid, pr), `dinov2_reference` (mu, sigma, sigma^(1/2)) of their DINOv2's."""
        out: dict[str, float] = {}
        if self.recorder is not None:
            self.recorder.features = [gather(self.recorder.all_features())]
            if self.recorder.logits is not None:
                self.recorder.logits = [gather(self.recorder.all_logits())]
            out.update(extra_metrics(self.metrics, self.recorder, real))
        if self.second is not None:
            stats = statistics_of(gather(self.second.all_features()))
            out["fd_dinov2"] = frechet_distance(*stats, *dinov2_reference)
        return out


def inception_score(logits: Tensor, splits: int = 10) -> dict[str, float]:
    """IS = exp(E KL(p(y|x) || p(y))) over `splits` parts of the samples (torch-fidelity's, with its
    fixed shuffle): the mean over the parts, and their standard deviation as `is_splits_std`."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    out = isc_features_to_metric(logits, splits=min(splits, len(logits)))
    return {"is": out["inception_score_mean"], "is_splits_std": out["inception_score_std"]}


def kernel_inception_distance(
    generated: Tensor, real: Tensor, subsets: int = 100, subset_size: int = 1000
) -> dict[str, float]:
    """KID: the unbiased MMD^2 with the cubic polynomial kernel, averaged over `subsets` random subsets
    of `subset_size` (capped by the smaller set) from each side (torch-fidelity's defaults); their standard
    deviation as `kid_subsets_std`."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    size = min(subset_size, len(generated), len(real))
    out = kid_features_to_metric(
        generated, real, kid_subsets=subsets, kid_subset_size=size, verbose=False, rng_seed=2020
    )
    return {
        "kid": out["kernel_inception_distance_mean"],
        "kid_subsets_std": out["kernel_inception_distance_std"],
    }


def precision_recall(
    generated: Tensor, real: Tensor, neighborhood: int = PR_NEIGHBOURHOOD
) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): the share of generated samples inside
    the real k-NN manifold, and of real samples inside the generated one (k = `neighborhood`)."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    out = prc_features_to_metric(
        generated, real, prc_neighborhood=neighborhood, prc_batch_size=10000, save_cpu_ram=True, verbose=False
    )
    return {"precision": out["precision"], "recall": out["recall"]}


def extra_metrics(metrics: list[str], recorder: FeatureRecorder, real: Tensor | None) -> dict[str, float]:
    """The metrics of `metrics` other than fid, from what `recorder` kept and the real features."""
    out: dict[str, float] = {}
    if "is" in metrics:
        out.update(inception_score(recorder.all_logits()))
    if "kid" in metrics:
        out.update(kernel_inception_distance(recorder.all_features(), real))
    if "pr" in metrics:
        out.update(precision_recall(recorder.all_features(), real))
    return out
