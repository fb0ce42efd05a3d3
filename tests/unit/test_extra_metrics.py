"""The metrics beside FID (act_lightning.metrics.extra) against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from act_lightning.metrics.extra import (
    FeatureRecorder,
    check_metrics,
    extra_metrics,
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


def _inside_share(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """The share of a's points inside b's manifold: the union of the balls around b's points whose radius
    is the distance to their k-th nearest neighbour in b (themselves not counted)."""
    radii = torch.cdist(b, b).sort(1).values[:, k]
    return (torch.cdist(a, b) <= radii[None]).any(1).float().mean().item()


@pytest.mark.parametrize("seed", [0, 1])
def test_precision_and_recall_are_the_k_nearest_neighbour_manifolds_by_hand(seed):
    """Kynkaanniemi et al.: precision = generated samples inside the real manifold, recall = real samples
    inside the generated one, k = 3; the two sets differ in size and spread, so swapping them or taking
    another k changes the numbers."""
    g = torch.Generator().manual_seed(seed)
    real, gen = torch.randn(40, 4, generator=g), torch.randn(30, 4, generator=g) * 1.3 + 0.4
    out = precision_recall(gen, real)
    assert out["precision"] == pytest.approx(_inside_share(gen, real, 3), abs=1e-6)
    assert out["recall"] == pytest.approx(_inside_share(real, gen, 3), abs=1e-6)
    assert _inside_share(gen, real, 4) != pytest.approx(out["precision"], abs=1e-6)  # k matters here


def test_extra_metrics_pass_the_generated_features_first():
    """`extra_metrics` gives pr the recorder's (generated) features first, the real ones second: half the
    generated samples are far from the real ones (precision 0.5), every real one is covered (recall 1)."""
    g = torch.Generator().manual_seed(0)
    real = torch.randn(20, 4, generator=g)
    recorder = FeatureRecorder.__new__(FeatureRecorder)
    recorder.all_features = lambda: torch.cat([real, real + 100.0])
    assert extra_metrics(["fid", "pr"], recorder, real) == {"precision": 0.5, "recall": 1.0}


def test_kid_and_is_cap_their_subsets_by_the_smaller_set():
    """KID's subset size is capped by the smaller of the two sets (here the real one, 12 < 20 < 30); IS
    takes at most as many splits as there are samples."""
    g = torch.Generator().manual_seed(0)
    gen, real = torch.randn(30, 5, generator=g).double(), torch.randn(12, 5, generator=g).double()
    capped = kernel_inception_distance(gen, real, subsets=4, subset_size=20)
    assert capped == kernel_inception_distance(gen, real, subsets=4, subset_size=12)
    logits = torch.randn(5, 1008, generator=g).double()
    five = inception_score(logits, splits=10)
    assert five == inception_score(logits, splits=5) and math.isfinite(five["is"])


def test_the_recorder_keeps_features_and_logits_of_one_pass():
    class Extractor(torch.nn.Module):
        num_features = 3
        calls = 0

        def features_and_logits(self, images, real=False):
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
    listed = r"metrics must list fid \(the run.s Fréchet distance; .* reported as fd\) and any of is, kid, pr"
    with pytest.raises(ValueError, match=listed):
        check_metrics(["fid", "lpips"], "inception")
    with pytest.raises(ValueError, match="metrics must list fid"):
        check_metrics(["kid"], "inception")
    with pytest.raises(ValueError, match=r"metrics=\[is\] needs eval.features=inception"):
        check_metrics(["fid", "is"], "digits")
    # improved precision/recall's 3-nearest-neighbour radii: torch-fidelity failed inside on 3 images
    few = r"metrics=\[...,pr\] with num_samples=3: .* 3 nearest neighbours, so they need at least 4 images"
    with pytest.raises(ValueError, match=few):
        check_metrics(["fid", "pr"], "inception", count=("num_samples", 3))
    assert check_metrics(["fid", "pr"], "inception", count=("num_samples", 4)) == ["fid", "pr"]
    assert check_metrics(["fid", "kid"], "inception", count=("num_samples", 2)) == ["fid", "kid"]
    generated, real = torch.randn(4, 8), torch.randn(4, 8)  # the least it takes, computed
    assert set(precision_recall(generated, real)) == {"precision", "recall"}
    with pytest.raises(RuntimeError):  # what the check spares a user, after the sampling
        precision_recall(generated[:3], real[:3])


class _Net(torch.nn.Module):
    """A stand-in feature network (a fixed projection of the image) that counts the images it sees."""

    def __init__(self, num_features: int, seed: int) -> None:
        super().__init__()
        self.num_features, self.seen = num_features, 0
        self.proj = torch.nn.Linear(3 * 8 * 8, num_features)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(seed))

    def forward(self, images, real=False):
        self.seen += images.shape[0]
        return self.proj(images.flatten(1))


@pytest.mark.parametrize(
    "metrics",
    [["fid"], ["fid", "kid"], ["fid", "fd_dinov2"], ["fid", "kid", "pr", "fd_dinov2"]],
)
def test_real_references_read_the_reference_once_for_kid_pr_and_fd_dinov2(metrics, tmp_path, monkeypatch):
    """What kid/pr (the FID network's features of real images) and fd_dinov2 (their DINOv2 statistics)
    compare with comes from one read of the reference's images, each network seeing each image once, and
    equals what each network computes on the images alone."""
    from act_lightning.metrics import reference
    from act_lightning.metrics.extra import real_references
    from act_lightning.metrics.frechet import statistics_of

    images = (np.random.default_rng(0).random((12, 8, 8, 3)) * 255).astype(np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=images)
    reads = []
    batches = reference.reference_image_batches
    monkeypatch.setattr(reference, "reference_image_batches", lambda *a: reads.append(a) or batches(*a))
    extractor = _Net(16, 0)
    dinov2 = _Net(24, 1) if "fd_dinov2" in metrics else None
    real, dino, count = real_references(
        metrics, str(tmp_path / "ref.npz"), None, extractor, dinov2, 10, 4, "cpu"
    )
    wants_real = "kid" in metrics
    assert count == (10 if wants_real or dinov2 is not None else None)
    assert len(reads) == (1 if wants_real or dinov2 is not None else 0)
    assert extractor.seen == (10 if wants_real else 0)
    alone = list(batches(tmp_path / "ref.npz", 4, 10))  # the same batches, each network on its own
    with torch.no_grad():
        if wants_real:
            torch.testing.assert_close(real, torch.cat([extractor(x) for x in alone]), rtol=0, atol=0)
        else:
            assert real is None
        if dinov2 is None:
            assert dino is None
        else:
            assert dinov2.seen == 10
            mu, sigma = statistics_of(torch.cat([dinov2(x) for x in alone]))
            np.testing.assert_array_equal(dino[0], mu)
            np.testing.assert_array_equal(dino[1], sigma)


def test_a_reference_with_fewer_images_than_the_samples_is_said_and_counted(tmp_path, caplog):
    """An ADM reference batch holds 10,000 images: kid, pr and fd_dinov2 then compare 50,000 generated
    images with 10,000 real ones, which the log says and evaluate's JSON records (num_real)."""
    from act_lightning.metrics.extra import real_references

    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((12, 8, 8, 3), dtype=np.uint8))
    with caplog.at_level("WARNING"):
        real, dino, count = real_references(
            ["fid", "kid", "fd_dinov2"],
            str(tmp_path / "ref.npz"),
            None,
            _Net(16, 0),
            _Net(24, 1),
            20,
            8,
            "cpu",
        )
    assert count == 12 and real.shape == (12, 16) and dino[0].shape == (24,)
    assert (
        f"eval.reference={tmp_path / 'ref.npz'} holds 12 real images, fewer than the 20 generated"
        in caplog.text
    )
    assert "kid, fd_dinov2 compare 20 generated images with 12 real ones" in caplog.text
    caplog.clear()
    real_references(["fid", "kid"], str(tmp_path / "ref.npz"), None, _Net(16, 0), None, 12, 8, "cpu")
    assert caplog.text == ""  # as many as there are samples: nothing to say


def test_precision_and_recall_refuse_a_reference_of_three_images_or_fewer(tmp_path):
    """As the generated images' count is checked: each real image's radius is its third neighbour's
    distance, so three real images failed inside torch (kthvalue out of range)."""
    from act_lightning.metrics.extra import real_references

    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((3, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(
        ValueError, match=r"ref.npz holds 3 real image\(s\): precision and recall .* at least 4"
    ):
        real_references(["fid", "pr"], str(tmp_path / "ref.npz"), None, _Net(16, 0), None, 8, 8, "cpu")
    real_references(["fid", "kid"], str(tmp_path / "ref.npz"), None, _Net(16, 0), None, 8, 8, "cpu")
