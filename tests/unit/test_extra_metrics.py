"""The metrics beside FID (act_lightning.metrics.extra) against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from act_lightning.metrics.extra import (
    FeatureRecorder,
    check_metrics,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)


def test_inception_score_counts_the_classes_of_confident_diverse_predictions():
    classes = torch.arange(40) % 8  # 8 classes, equally often, each predicted with certainty
    logits = 100.0 * torch.nn.functional.one_hot(classes, 1008).double()
    assert inception_score(logits, splits=1)["is"] == pytest.approx(8.0, rel=1e-6)
    assert inception_score(torch.zeros(40, 1008), splits=1)["is"] == pytest.approx(1.0)  # no information
    # by hand for two samples: p1 = softmax(l1), p2 = softmax(l2), IS = exp(mean KL(p_i || mean p))
    two = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    p = two.softmax(1)
    q = p.mean(0)
    expected = math.exp(((p * (p.log() - q.log())).sum(1)).mean().item())
    assert inception_score(two, splits=1)["is"] == pytest.approx(expected, rel=1e-9)


def _mmd2_unbiased_by_hand(x, y):
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731  (the cubic polynomial kernel)
    m = len(x)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    off = lambda kk: (kk.sum() - kk.diagonal().sum()) / (m * (m - 1))  # noqa: E731
    return (off(kxx) + off(kyy) - 2 * kxy.mean()).item()


def test_kid_with_whole_sets_as_subsets_is_the_unbiased_mmd_by_hand():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 5, generator=g).double(), (torch.randn(12, 5, generator=g) + 0.5).double()
    out = kernel_inception_distance(x, y, subsets=3, subset_size=1000)  # capped at 12: every sample
    assert out["kid"] == pytest.approx(_mmd2_unbiased_by_hand(x, y), rel=1e-9)
    assert out["kid_subsets_std"] == pytest.approx(0.0, abs=1e-12)  # the same subset each time
    same = kernel_inception_distance(x, x.clone(), subsets=3, subset_size=1000)["kid"]
    assert abs(same) < out["kid"]


def test_precision_and_recall_of_copies_and_of_far_away_samples():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(20, 4, generator=g)
    far = torch.randn(20, 4, generator=g) + 100.0
    assert precision_recall(real.clone(), real) == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(far, real) == {"precision": 0.0, "recall": 0.0}
    # every real sample copied plus as many far ones: half the generated samples are real-like, and every
    # real sample lies in the ball of its copy
    assert precision_recall(torch.cat([real, far]), real) == {"precision": 0.5, "recall": 1.0}


def test_the_recorder_keeps_features_and_logits_of_one_pass():
    class Extractor(torch.nn.Module):
        num_features = 3
        calls = 0

        def features_and_logits(self, images):
            Extractor.calls += 1
            flat = images.flatten(1)
            return flat[:, :3], flat[:, 3:5]

    recorder = FeatureRecorder(Extractor(), logits=True)
    batches = [torch.arange(10.0).view(2, 5), torch.arange(10.0, 15.0).view(1, 5)]
    returned = [recorder(b) for b in batches]
    assert Extractor.calls == 2  # one pass per batch gives both
    assert torch.equal(recorder.all_features(), torch.arange(15.0).view(3, 5)[:, :3])
    assert torch.equal(recorder.all_logits(), torch.arange(15.0).view(3, 5)[:, 3:])
    assert torch.equal(returned[0], batches[0][:, :3])


def test_metric_names_are_checked():
    assert check_metrics(["fid", "kid"], "digits") == ["fid", "kid"]
    with pytest.raises(ValueError, match="metrics must list fid and any of is, kid, pr"):
        check_metrics(["fid", "lpips"], "inception")
    with pytest.raises(ValueError, match="metrics must list fid"):
        check_metrics(["kid"], "inception")
    with pytest.raises(ValueError, match=r"metrics=\[is\] needs eval.features=inception"):
        check_metrics(["fid", "is"], "digits")
