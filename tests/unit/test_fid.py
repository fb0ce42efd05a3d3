"""FID machinery: the Fréchet distance, feature statistics, the Inception extractor and its weights,
reference files and caches, and the sharding that makes many processes agree with one."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from act_lightning.data.base import to_signed
from act_lightning.metrics import frechet
from act_lightning.metrics.fid import (
    EvaluationStopped,
    evaluation_noise,
    feature_statistics,
    reference_statistics,
    sample_chunks,
    sample_statistics,
    sample_subset_statistics,
)
from act_lightning.metrics.frechet import FeatureStatistics, frechet_distance, sqrtm_psd, statistics_of
from act_lightning.metrics.inception import (
    WEIGHTS_FILE,
    WEIGHTS_URL,
    InceptionFeatures,
    WeightsError,
    resolve_inception_weights,
    to_uint8,
)
from act_lightning.metrics.reference import (
    ReferenceStatisticsError,
    check_reference_images,
    image_batches,
    load_reference,
    reference_image_features,
    save_reference,
)
from tests.helpers_ddp import TinyFeatures, fid_of_samples, run_two_ranks


def scipy_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """The textbook computation (pytorch-fid / TTUR), independent of ours: np.cov and scipy's sqrtm."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.fixture(scope="module")
def features():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(600, 48))
    b = rng.normal(size=(500, 48)) @ rng.normal(size=(48, 48)) * 0.3 + 0.2
    return a, b


# -- the distance and the statistics ------------------------------------------------------------------
def test_fid_of_a_set_against_itself_is_zero(features):
    a, _ = features
    stats = statistics_of(torch.from_numpy(a))
    assert abs(frechet_distance(*stats, *stats)) < 1e-8


def test_fid_equals_an_independent_numpy_scipy_computation(features):
    a, b = features
    ours = frechet_distance(*statistics_of(torch.from_numpy(a)), *statistics_of(torch.from_numpy(b)))
    assert ours > 1  # the sets differ
    assert ours == pytest.approx(scipy_fid(a, b), rel=1e-9)
    mu2, sigma2 = statistics_of(torch.from_numpy(b))  # the reference's root computed once (evaluate does)
    reused = frechet_distance(*statistics_of(torch.from_numpy(a)), mu2, sigma2, sqrtm_psd(sigma2))
    assert reused == ours


def test_fid_with_fewer_samples_than_features_matches_scipy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(20, 64)), rng.normal(size=(30, 64)) + 0.5  # singular covariances
    ours = frechet_distance(*statistics_of(torch.from_numpy(a)), *statistics_of(torch.from_numpy(b)))
    assert np.isfinite(ours) and ours == pytest.approx(scipy_fid(a, b), rel=1e-6)


def _fd_through_full_roots(mu1, sigma1, mu2, sigma2) -> float:
    root = sqrtm_psd(sigma2)
    m = root @ sigma1 @ root
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    return float(
        ((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum()
    )


@pytest.mark.parametrize(("n1", "n2"), [(8, 16), (300, 40), (40, 300), (700, 600)])
def test_few_samples_take_the_low_rank_path_to_the_same_distance(n1, n2):
    """At 1,024 features: either covariance of rank below 256 gives the trace from a small matrix (the
    reference's root is then never computed); two of rank >= 256 take the eigen-decomposition."""
    rng = np.random.default_rng(2)
    mix = rng.normal(size=(1024, 1024)) * 0.1
    a, b = rng.normal(size=(n1, 1024)) @ mix, rng.normal(size=(n2, 1024)) @ mix + 0.3
    (mu1, sigma1), (mu2, sigma2) = statistics_of(torch.from_numpy(a)), statistics_of(torch.from_numpy(b))
    root = frechet.LazyRoot(sigma2)
    ours = frechet_distance(mu1, sigma1, mu2, sigma2, root)
    assert ours == pytest.approx(_fd_through_full_roots(mu1, sigma1, mu2, sigma2), rel=1e-6)
    low_rank = min(n1, n2) - 1 < frechet.LOW_RANK_MAX
    assert (root._root is None) == low_rank
    factor = frechet.low_rank_factor(sigma1)
    assert (factor is not None) == (n1 - 1 < frechet.LOW_RANK_MAX)
    if factor is not None:
        q, small = factor
        assert q.shape == (1024, n1 - 1)  # the covariance's rank: n - 1
        np.testing.assert_allclose(q @ small @ q.T, sigma1, atol=1e-9 * np.abs(sigma1).max())
    assert abs(frechet_distance(mu1, sigma1, mu1, sigma1)) < 1e-6 * np.trace(sigma1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_statistics_that_are_not_finite_give_nan_not_an_eigen_decompositions_error(features, bad):
    """A diverged network's samples (NaN after the clip) give NaN features; the distance failed with
    'Eigenvalues did not converge' inside the training's evaluation."""
    a, _ = features
    mu, sigma = statistics_of(torch.from_numpy(a))
    broken = torch.from_numpy(a).clone()
    broken[0, 0] = bad
    mu_bad, sigma_bad = statistics_of(broken)
    assert math.isnan(frechet_distance(mu_bad, sigma_bad, mu, sigma))
    assert math.isnan(frechet_distance(mu, sigma, mu_bad, sigma_bad))


def test_statistics_accumulated_in_batches_equal_numpy_float64(features):
    a, _ = features
    stats = FeatureStatistics(48)
    for chunk in torch.from_numpy(a).float().split(70):  # float32 features, as extractors give
        stats.update(chunk)
    mu, sigma = stats.compute()
    a32 = a.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mu, a32.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(a32, rowvar=False), rtol=0, atol=1e-10)
    assert stats.total.dtype == torch.float64


def test_statistics_reject_wrong_shapes():
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        FeatureStatistics(8).update(torch.zeros(4, 9))
    one = FeatureStatistics(8)
    with pytest.raises(ValueError, match="at least 2"):
        one.compute()
    one.update(torch.zeros(1, 8))
    with pytest.raises(ValueError, match="need at least 2 feature vectors for a covariance, got 1"):
        one.compute()  # a covariance of one vector divides by n - 1 = 0


# -- the Inception extractor -----------------------------------------------------------------------------
def test_images_are_quantised_by_rounding_not_truncation():
    values = torch.tensor([10.6, 10.4, 254.7, -3.0, 300.0]) / 127.5 - 1  # pixel values before quantisation
    assert to_uint8(values).tolist() == [11, 10, 255, 0, 255]
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert torch.equal(to_uint8(x.float() / 127.5 - 1), x)  # the exact inverse of reading a uint8 image


def test_real_images_keep_their_8_bit_levels_when_generated_ones_are_truncated():
    """eval.quantize=truncate (the ACT reference's and ADM's conversion of samples) applied to a data
    set's images read as v / 127.5 - 1 gave v - 1 for v in 1..63 (float rounding leaves (x + 1) * 127.5
    just below v): the reference was darkened. Real images are read at their levels whatever it says."""
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    real = to_signed(levels)
    darkened = to_uint8(real, "truncate") != levels
    assert levels[darkened].tolist() == list(range(1, 64))  # what truncation does to them
    round_, truncate = (InceptionFeatures("random", quantize=q, resize=75) for q in ("round", "truncate"))
    truncate.load_state_dict(round_.state_dict())
    fed = []
    truncate.net.register_forward_pre_hook(lambda net, args: fed.append(args[0].clone()))
    truncate(real, real=True)
    assert torch.equal(fed[-1], levels.expand(-1, 3, -1, -1))  # the network sees the image's own levels
    torch.testing.assert_close(truncate(real, real=True), round_(real), rtol=0, atol=0)
    truncate(real)  # generated images: truncated as asked
    assert torch.equal(fed[-1][:, :1] != levels, darkened)


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints" / WEIGHTS_FILE


def test_missing_inception_weights_name_the_file_the_place_and_the_url(empty_hub):
    with pytest.raises(WeightsError) as err:
        resolve_inception_weights(None, download=False)
    message = str(err.value)
    assert WEIGHTS_FILE in message and str(empty_hub) in message and WEIGHTS_URL in message
    assert "eval.inception_weights" in message
    with pytest.raises(WeightsError, match="eval.inception_weights=/nowhere/w.pth: no such file"):
        resolve_inception_weights("/nowhere/w.pth")


def test_a_failed_download_says_where_to_put_the_file(empty_hub, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError, match=f"Put {WEIGHTS_FILE}.*at {empty_hub}"):
        resolve_inception_weights(None, download=True)


@pytest.fixture(scope="module")
def random_inception():
    return InceptionFeatures("random")


def test_inception_features_from_a_weights_file_in_the_hub_cache(random_inception, empty_hub):
    state = random_inception.net.state_dict()
    perturbed = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    empty_hub.parent.mkdir(parents=True)
    torch.save(perturbed, empty_hub)
    loaded = InceptionFeatures(None)  # found in the hub cache
    assert loaded.pretrained and not random_inception.pretrained
    assert (loaded.cache_key, random_inception.cache_key) == ("pretrained at 299", "random at 299")
    for k, v in loaded.net.state_dict().items():
        torch.testing.assert_close(v, perturbed[k], rtol=0, atol=0)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    f = loaded(x)
    assert f.shape == (3, 2048) and torch.isfinite(f).all()
    assert not torch.allclose(f, random_inception(x))


class NotWeights:
    pass


def test_inception_weights_are_never_unpickled(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"Mixed_7c.branch_pool.conv.weight": NotWeights()}, evil)
    with pytest.raises(WeightsError, match="not a readable weights file .it holds pickled Python objects"):
        InceptionFeatures(str(evil))
    junk = tmp_path / "junk.pth"  # random bytes: said in words, never with torch's weights_only=False advice
    junk.write_bytes(bytes(range(7, 250)))
    with pytest.raises(
        WeightsError, match=r"junk.pth: not a readable weights file \(not a checkpoint"
    ) as refused:
        InceptionFeatures(str(junk))
    assert "weights_only" not in str(refused.value)
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(WeightsError, match="not the TF-Inception state dict"):
        InceptionFeatures(str(other))


def test_torchvisions_inception_is_named_as_another_network_not_a_load_traceback(random_inception, tmp_path):
    """torchvision's inception_v3_google-*.pth, which sits beside the TF-Inception in the hub cache, has the
    same layer names but 1000 classes: it failed in load_state_dict with a size-mismatch traceback."""
    state = dict(random_inception.net.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    wrong = tmp_path / "inception_v3_google-0cc3c7bd.pth"
    torch.save(state, wrong)
    with pytest.raises(WeightsError, match=r"fc.weight of shape \(1000, 2048\), not the TF-Inception's"):
        InceptionFeatures(str(wrong))


def test_inception_pipeline_self_fid_is_zero_and_grey_images_work(random_inception):
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    stats = feature_statistics(random_inception, images.split(4), "cpu")
    # zero up to the round-off of the square roots of ~2000 zero eigenvalues, relative to the covariance
    assert abs(frechet_distance(*stats, *stats)) < 1e-5 * np.trace(stats[1])  # 6 samples: rank 5 of 2048
    other = feature_statistics(random_inception, (torch.rand(6, 3, 32, 32) * 0.2).split(4), "cpu")
    assert frechet_distance(*stats, *other) > 1e-3
    assert random_inception(torch.zeros(2, 1, 8, 8)).shape == (2, 2048)  # one channel -> three


def test_the_random_inception_is_the_same_in_every_process(random_inception):
    again = InceptionFeatures("random")
    for (k, a), b in zip(random_inception.net.state_dict().items(), again.net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def _stem_input_side(extractor, images) -> int:
    """The side of the images Inception's first convolution receives (after the resize)."""
    seen = []
    hook = extractor.net.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    try:
        features = extractor(images)
    finally:
        hook.remove()
    assert features.shape == (len(images), 2048) and torch.isfinite(features).all()
    assert seen[0][2] == seen[0][3]
    return seen[0][2]


def test_the_random_inception_of_smoke_runs_may_see_smaller_images(random_inception):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    small = InceptionFeatures("random", resize=75)
    assert _stem_input_side(random_inception, images) == 299  # the protocol's
    assert _stem_input_side(small, images) == 75
    for a, b in zip(random_inception.net.state_dict().values(), small.net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same network, only its input differs
    assert not torch.allclose(small(images), random_inception(images))
    stats = feature_statistics(small, images.split(1), "cpu")
    assert abs(frechet_distance(*stats, *stats)) < 1e-5 * np.trace(stats[1])


@pytest.mark.parametrize("resize", [74, 0, "75", 75.0, True])
def test_inception_resize_must_be_an_integer_of_at_least_75(resize):
    with pytest.raises(ValueError, match=r"eval.inception_resize must be null .*>= 75"):
        InceptionFeatures("random", resize=resize)


def test_a_pretrained_inception_is_refused_a_resize_other_than_299(tmp_path):
    # before any file is looked at: the message names both keys and the protocol's size
    with pytest.raises(
        ValueError, match=r"eval.inception_resize=75 needs eval.inception_weights=random.*299"
    ):
        InceptionFeatures(str(tmp_path / "absent.pth"), resize=75)
    with pytest.raises(ValueError, match="eval.inception_resize=100 needs"):
        InceptionFeatures(None, resize=100)
    with pytest.raises(WeightsError, match="no such file"):  # 299 is the protocol: allowed, then the file
        InceptionFeatures(str(tmp_path / "absent.pth"), resize=299)


# -- reference files ---------------------------------------------------------------------------------------
def test_reference_with_mu_sigma_and_with_images(tmp_path, random_inception):
    mu, sigma = np.arange(4.0), np.eye(4) * 2
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    got = load_reference(tmp_path / "stats.npz", 4)
    np.testing.assert_array_equal(got[0], mu)
    np.testing.assert_array_equal(got[1], sigma)

    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)  # NHWC, as published
    np.savez(tmp_path / "batch.npz", arr_0=images)

    def extract(batches):
        return feature_statistics(random_inception, batches, "cpu", sync=False)

    got = load_reference(tmp_path / "batch.npz", 2048, extract, batch_size=2)
    direct = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    want = feature_statistics(random_inception, [direct], "cpu")
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-9)


def test_bad_reference_files_are_named(tmp_path):
    with pytest.raises(
        ReferenceStatisticsError, match="https://openaipublic.*VIRTUAL_imagenet64_labeled.npz"
    ):
        load_reference(tmp_path / "VIRTUAL_imagenet64_labeled.npz", 2048)
    (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ReferenceStatisticsError, match="cut.npz: not a readable .npz"):
        load_reference(tmp_path / "cut.npz", 2048)
    np.savez(tmp_path / "keys.npz", features=np.zeros(3))
    with pytest.raises(ReferenceStatisticsError, match=r"expected arrays `mu` and `sigma`.*\['features'\]"):
        load_reference(tmp_path / "keys.npz", 2048)
    np.savez(tmp_path / "dims.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ReferenceStatisticsError, match="64-d features, but the feature extractor gives 2048"):
        load_reference(tmp_path / "dims.npz", 2048)
    np.savez(tmp_path / "obj.npz", arr_0=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ReferenceStatisticsError, match="never unpickled"):
        load_reference(tmp_path / "obj.npz", 2048)
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ReferenceStatisticsError, match=r"uint8 images of shape \(N, H, W, C\)"):
        load_reference(tmp_path / "float.npz", 2048, extract=lambda b: None)


class FakeData:
    """What reference_statistics needs of a datamodule."""

    image_size = 4

    def __init__(self, n: int) -> None:
        self.images = torch.rand(n, 1, 4, 4) * 2 - 1
        self.reads = 0

    def build_reference_dataset(self):
        return torch.utils.data.TensorDataset(self.images, torch.zeros(len(self.images)))

    def reference_dataloader(self, batch_size, rank, world_size, dataset, max_images):
        self.reads += 1
        from act_lightning.data.base import reference_indices

        idx = reference_indices(len(dataset), max_images)
        return [(self.images[idx], None)]


def test_training_set_statistics_are_cached_and_recomputed_when_the_data_changes(tmp_path):
    extractor = TinyFeatures(16)
    cache = tmp_path / "stats" / "ref.npz"
    data = FakeData(40)
    first = reference_statistics(extractor, "train", data, "tiny", cache=cache)
    assert cache.is_file() and data.reads == 1
    second = reference_statistics(extractor, "train", data, "tiny", cache=cache)
    assert data.reads == 1  # read from the cache
    np.testing.assert_array_equal(first[0], second[0])
    reference_statistics(extractor, "train", FakeData(41), "tiny", cache=cache)  # another data set size
    reference_statistics(extractor, "train", data, "other", cache=cache)  # another extractor
    with np.load(cache) as npz:
        assert str(npz["features"]) == "other" and int(npz["num_images"]) == 40
    # the same extractor with other weights or input size (InceptionFeatures.cache_key): recomputed, so
    # statistics of a random Inception at 75 are never read by a run with the real one at 299
    reads = data.reads
    extractor.cache_key = "random at 75"
    reference_statistics(extractor, "train", data, "other", cache=cache)
    extractor.cache_key = "pretrained at 299"
    reference_statistics(extractor, "train", data, "other", cache=cache)
    reference_statistics(extractor, "train", data, "other", cache=cache)
    assert data.reads == reads + 2
    # fewer images (eval.reference_max_images): other statistics, recomputed; the same number again: cached
    fewer = reference_statistics(extractor, "train", data, "other", cache=cache, max_images=20)
    reference_statistics(extractor, "train", data, "other", cache=cache, max_images=20)
    assert data.reads == reads + 3
    with np.load(cache) as npz:
        assert int(npz["num_images"]) == 20
    assert not np.allclose(fewer[0], reference_statistics(extractor, "train", data, "other")[0])
    # the same images read with other channels (data.channels=1 on a colour set): recomputed, where the
    # colour statistics were read back for the grey run
    reads = data.reads
    reference_statistics(extractor, "train", data, "other", cache=cache, max_images=20)
    data.channels = 1
    reference_statistics(extractor, "train", data, "other", cache=cache, max_images=20)
    assert data.reads == reads + 1
    with np.load(cache) as npz:
        assert int(npz["channels"]) == 1


def test_cached_statistics_are_computed_anew_when_the_datas_fingerprint_changes(tmp_path):
    # a folder's images replaced by others at the same count (`reference_fingerprint`): the cache's sizes
    # and extractor all match, its statistics are another data set's
    data, cache = FakeData(8), tmp_path / "ref.npz"
    data.reference_fingerprint = lambda: "images as first written"
    first = reference_statistics(TinyFeatures(16), "train", data, "tiny", cache=cache)
    reference_statistics(TinyFeatures(16), "train", data, "tiny", cache=cache)
    assert data.reads == 1
    data.images = torch.rand_like(data.images) * 2 - 1
    data.reference_fingerprint = lambda: "images replaced"
    second = reference_statistics(TinyFeatures(16), "train", data, "tiny", cache=cache)
    assert data.reads == 2 and not np.allclose(first[0], second[0])
    reference_statistics(TinyFeatures(16), "train", data, "tiny", cache=cache)
    assert data.reads == 2  # kept with the new digest


def test_an_image_batch_rewritten_at_the_same_size_is_computed_anew(tmp_path):
    """An uncompressed .npz of other images of the same shape has the same byte size: its cached
    statistics were read back (FID 7.76 where 6.57 was right)."""
    batch, cache = tmp_path / "ref.npz", tmp_path / "cache.npz"
    rng = np.random.default_rng(0)
    np.savez(batch, arr_0=rng.integers(0, 256, (12, 4, 4, 3), dtype=np.uint8))
    first = reference_statistics(TinyFeatures(48), str(batch), cache=cache)
    np.savez(batch, arr_0=rng.integers(0, 256, (12, 4, 4, 3), dtype=np.uint8))
    stat = batch.stat()
    os.utime(batch, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a later write, same size
    second = reference_statistics(TinyFeatures(48), str(batch), cache=cache)
    assert not np.allclose(first[0], second[0])
    np.testing.assert_array_equal(second[0], reference_statistics(TinyFeatures(48), str(batch))[0])


def test_samples_that_are_not_finite_give_nan_inception_features_not_a_black_images():
    """uint8 quantisation turned NaN samples into black images (0): a diverged network scored a finite FID
    (0.98 against random reals), where the evaluation's 'not finite' warning should have said so."""
    net = InceptionFeatures("random", resize=75)
    images = torch.rand(3, 3, 8, 8) * 2 - 1
    broken = images.clone()
    broken[0] = float("nan")
    broken[2, 1, 0, 0] = float("inf")
    features, logits = net.features_and_logits(broken)
    assert features[[0, 2]].isnan().all() and logits[[0, 2]].isnan().all()
    torch.testing.assert_close(features[1], net(images)[1])  # the finite sample scored as before
    mu, _ = statistics_of(net(broken).double())
    assert np.isnan(mu).all()  # so the distance is NaN, and the evaluation says the samples are not finite


def test_the_digits_features_cache_key_is_their_weights(monkeypatch):
    """The classifier is trained on each machine: another processor's rounding gives other weights, whose
    features a shared reference cache must not serve."""
    from act_lightning.metrics.digits import DigitsClassifier, DigitsFeatures

    torch.manual_seed(0)
    one, other = DigitsClassifier(), DigitsClassifier()
    assert DigitsFeatures(one).cache_key != DigitsFeatures(other).cache_key
    copy = DigitsClassifier()
    copy.load_state_dict(one.state_dict())
    assert DigitsFeatures(copy).cache_key == DigitsFeatures(one).cache_key


def test_reference_statistics_read_real_images_and_caches_from_before_that_are_made_again(tmp_path):
    seen = []

    class Recording(TinyFeatures):
        def forward(self, x, real=False):
            seen.append(real)
            return super().forward(x)

    data, cache = FakeData(8), tmp_path / "ref.npz"
    reference_statistics(Recording(16), "train", data, "tiny", cache=cache)
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((3, 4, 4, 1), dtype=np.uint8))
    reference_statistics(Recording(16), str(tmp_path / "images.npz"), None, "tiny")
    assert seen and all(seen)  # both sources: a data set's images, read at their 8-bit levels
    with np.load(cache) as npz:  # a cache written before real images kept their levels (no `levels`)
        older = {k: npz[k] for k in npz.files if k != "levels"}
    np.savez(cache, **older)
    reference_statistics(Recording(16), "train", data, "tiny", cache=cache)
    assert data.reads == 2  # made again (with eval.quantize=truncate it held darkened images)
    reference_statistics(Recording(16), "train", data, "tiny", cache=cache)
    assert data.reads == 2


def test_published_mu_sigma_are_not_cached(tmp_path):
    save_reference(tmp_path / "published.npz", np.zeros(32), np.eye(32))
    cache = tmp_path / "cache.npz"
    mu, sigma = reference_statistics(TinyFeatures(16), str(tmp_path / "published.npz"), cache=cache)
    assert mu.shape == (32,) and not cache.exists()


# -- many processes agree with one -------------------------------------------------------------------------
def test_chunks_of_all_ranks_are_the_chunks_of_one_process():
    one = sample_chunks(1000, 64)
    assert sum(size for _, size in one) == 1000
    for world in (2, 3, 8, 20):
        shards = [sample_chunks(1000, 64, r, world) for r in range(world)]
        assert sorted(c for shard in shards for c in shard) == one
    a, _ = evaluation_noise(0, range(20, 24), (1, 2, 2), None)
    b, labels = evaluation_noise(0, range(20, 24), (1, 2, 2), 10)
    assert torch.equal(a, b) and labels.shape == (4,)  # the noise does not depend on who draws it
    assert not torch.equal(a, evaluation_noise(0, range(24, 28), (1, 2, 2), None)[0])  # each sample its own
    assert not torch.equal(a, evaluation_noise(1, range(20, 24), (1, 2, 2), None)[0])  # and each seed
    # the labels of the evaluation's samples are uniform over every class, the last one included
    many = evaluation_noise(0, range(2000), (1,), 10)[1]
    counts = torch.bincount(many, minlength=11)
    assert counts[10] == 0 and (counts[:10] > 150).all()  # 200 expected per class


def test_an_evaluation_draws_the_same_samples_at_any_batch_size():
    """Sample i's noise and label are its own (seed, i): `evaluate batch_size=...` reproduces a training
    run's val/fid, drawn at eval.batch_size; per chunk, only the first chunk's samples were the same."""
    whole, labels = evaluation_noise(3, range(23), (1, 2, 2), 10)
    for batch_size in (1, 4, 23):
        chunks = [
            evaluation_noise(3, range(c * batch_size, c * batch_size + n), (1, 2, 2), 10)
            for c, n in sample_chunks(23, batch_size)
        ]
        assert torch.equal(torch.cat([z for z, _ in chunks]), whole)
        assert torch.equal(torch.cat([y for _, y in chunks]), labels)
    seen = {}
    extractor, shape = TinyFeatures(4), (1, 2, 2)

    def sample(noise, labels, indices):
        seen.setdefault(batch, []).append(indices)
        return noise.clamp(-1, 1)

    stats = []
    for batch in (4, 7):
        stats.append(sample_statistics(sample, extractor, 21, batch, shape, seed=3))
    assert [list(r) for r in seen[7]] == [list(range(0, 7)), list(range(7, 14)), list(range(14, 21))]
    # the same images; the features differ by float32 rounding of other batch shapes only
    np.testing.assert_allclose(stats[0][0], stats[1][0], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(stats[0][1], stats[1][1], rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_two_processes_under_ddp_give_the_same_fid_as_one(tmp_path):
    shape, num_samples, batch_size = (1, 6, 6), 90, 16  # 6 chunks, the last one short
    reference = (np.zeros(32), np.eye(32) * 0.1)
    mu1, sigma1, fid1 = fid_of_samples(0, 1, num_samples, batch_size, shape, reference)
    out, store = tmp_path / "ddp.npz", tmp_path / "store"
    spec = {"world_size": 2, "store": str(store), "out": str(out), "num_samples": num_samples}
    spec |= {"batch_size": batch_size, "shape": list(shape), "reference": [a.tolist() for a in reference]}
    run_two_ranks(spec, timeout=300)
    with np.load(out) as got:
        np.testing.assert_allclose(got["mu"], mu1, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(got["sigma"], sigma1, rtol=1e-10, atol=1e-13)
        assert float(got["fid"]) == pytest.approx(fid1, rel=1e-10)


@pytest.mark.slow
def test_ranks_that_disagree_about_the_cache_all_compute_the_reference_and_none_waits(tmp_path):
    """Rank 0 read its node's cache and returned; rank 1, whose node had none, waited in the all-reduce of
    the statistics it computes with the others, for good (multi-node runs on node-local data)."""
    from tests.helpers_ddp import RankData

    cache0 = tmp_path / "node0" / "ref.npz"
    mu1, sigma1 = reference_statistics(TinyFeatures(16), "train", RankData(), "tiny", cache=cache0)
    assert cache0.is_file()  # rank 0's node has the cache, rank 1's not
    out, store = tmp_path / "ref", tmp_path / "store"
    spec = {"mode": "reference", "world_size": 2, "store": str(store), "out": str(out)}
    spec["caches"] = [str(cache0), str(tmp_path / "node1" / "ref.npz")]
    run_two_ranks(spec)
    for rank in (0, 1):  # computed together: all 12 images' (float32 features of other batch shapes)
        with np.load(f"{out}.{rank}.npz") as got:
            np.testing.assert_allclose(got["mu"], mu1, rtol=1e-6, atol=1e-8)
            np.testing.assert_allclose(got["sigma"], sigma1, rtol=1e-6, atol=1e-8)


def test_sample_statistics_reports_progress():
    seen = []
    sample_statistics(lambda n, y, i: n.clamp(-1, 1), TinyFeatures(4), 10, 4, (1, 2, 2), progress=seen.append)
    assert seen == [4, 4, 2]


def test_every_rank_asks_stop_after_each_round_alike_and_all_give_up_when_it_says_so():
    # 7 chunks over 3 ranks: 3 rounds, the last with one chunk; `stop` may be a collective, so every rank
    # calls it once per round but the last, a rank without a chunk in the round too: a finished
    # evaluation is kept
    sample = lambda noise, labels, indices: noise.clamp(-1, 1)  # noqa: E731
    extractor, shape = TinyFeatures(4), (1, 2, 2)

    def run(rank, stop):
        return sample_subset_statistics(
            sample, extractor, 1, 13, 2, shape, rank=rank, world_size=3, stop=stop
        )

    for rank in range(3):
        asked = []
        kept = run(rank, lambda asked=asked: asked.append(1) and False)[0]
        assert len(asked) == 2  # after 2 of 3 rounds, whatever the rank's number of chunks (3, 2, 2)
        for a, b in zip(kept, run(rank, None)[0], strict=True):  # asking changes nothing
            assert np.array_equal(a, b)
        calls = []  # a stop that says yes from its third call on: after the last round, where none is made
        finished = run(rank, lambda calls=calls: calls.append(1) or len(calls) >= 3)
        assert len(calls) == 2 and len(finished) == 1
    drawn = []
    with pytest.raises(EvaluationStopped, match="after 2 rounds"):
        sample_subset_statistics(
            lambda noise, labels, indices: drawn.append(indices) or noise.clamp(-1, 1),
            extractor,
            1,
            13,
            2,
            shape,
            stop=lambda: len(drawn) == 2,
        )
    assert len(drawn) == 2  # of 7 chunks: it gave up after the round in which stop said so


def test_subset_statistics_are_those_of_consecutive_samples_across_chunk_boundaries():
    # 3 sets of 7 samples drawn in chunks of 4: sets and chunks do not line up
    extractor, shape = TinyFeatures(4), (1, 2, 2)
    sample = lambda noise, labels, indices: noise.clamp(-1, 1)  # noqa: E731
    parts = sample_subset_statistics(sample, extractor, 3, 7, 4, shape, seed=5)
    chunks = [evaluation_noise(5, range(4 * c, 4 * c + n), shape, None)[0] for c, n in sample_chunks(21, 4)]
    features = torch.cat([extractor(noise.clamp(-1, 1)) for noise in chunks])  # as drawn, chunk by chunk
    for s, (mu, sigma) in enumerate(parts):
        expected_mu, expected_sigma = statistics_of(features[7 * s : 7 * (s + 1)])
        np.testing.assert_allclose(mu, expected_mu, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-10, atol=1e-12)
    # one set of all samples is exactly what sample_statistics computes
    whole = sample_subset_statistics(sample, extractor, 1, 21, 4, shape, seed=5)[0]
    for a, b in zip(whole, sample_statistics(sample, extractor, 21, 4, shape, seed=5), strict=True):
        assert np.array_equal(a, b)


@pytest.mark.slow
def test_the_digits_classifier_is_trained_once_per_process_and_each_caller_gets_its_own_copy(
    monkeypatch, tmp_path
):
    from act_lightning.data.digits import load_digits_split
    from act_lightning.metrics import digits

    monkeypatch.setattr(digits, "_TRAINED", {})
    monkeypatch.setenv("ACT_LIGHTNING_CACHE", str(tmp_path / "cache"))  # empty: trained here
    calls = []
    train = digits.train_digits_classifier
    monkeypatch.setattr(digits, "train_digits_classifier", lambda *a, **k: calls.append(k) or train(*a, **k))
    rng = torch.get_rng_state()
    first = digits.DigitsFeatures.trained(seed=0)
    assert calls == [{"seed": 0}]
    with torch.no_grad():
        first.classifier.features[0].weight.zero_()  # one caller's network is its own
    second = digits.DigitsFeatures.trained(seed=0)
    assert calls == [{"seed": 0}] and torch.equal(torch.get_rng_state(), rng)  # no draw from the run's stream
    x, y, _, _ = load_digits_split()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        again = train(x, y, seed=0)  # what training anew gives: the same weights, exactly
        assert torch.get_num_threads() == 2  # trained on one thread, the caller's count given back
    finally:
        torch.set_num_threads(threads)
    for (name, a), b in zip(second.classifier.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not second.classifier.training and not any(p.requires_grad for p in second.parameters())

    # Another process (the in-process memo emptied) reads the weights from the cache: no training.
    (cached,) = (tmp_path / "cache").glob("digits_classifier_seed0_*.pt")
    monkeypatch.setattr(digits, "_TRAINED", {})
    rng = torch.get_rng_state()
    third = digits.DigitsFeatures.trained(seed=0)
    assert calls == [{"seed": 0}] and torch.equal(torch.get_rng_state(), rng)  # read: no draw either
    for (name, a), b in zip(third.classifier.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


class Tampered:
    def __reduce__(self):  # unpickling it would run code
        return (os.system, ("touch tampered",))


def test_a_bad_cache_file_is_trained_over_never_unpickled_and_an_unwritable_folder_only_slows(
    monkeypatch, tmp_path, caplog
):
    from act_lightning.data.digits import load_digits_split
    from act_lightning.metrics import digits

    x, y, _, _ = load_digits_split()
    torch.manual_seed(3)
    trained = digits.DigitsClassifier()  # stands in for training (the test above trains for real)
    good = {k: v.clone() for k, v in trained.state_dict().items()}
    calls = []
    monkeypatch.setattr(digits, "train_digits_classifier", lambda *a, **k: calls.append(k) or trained)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ACT_LIGHTNING_CACHE", str(tmp_path / "cache"))
    path = digits.cache_path(0, x, y)
    path.parent.mkdir()
    other = {**good, "head.1.weight": torch.zeros(3, 64)}
    for bad in (b"not a checkpoint", {"conv.weight": torch.zeros(1)}, other, {"x": Tampered()}):
        if isinstance(bad, bytes):
            path.write_bytes(bad)
        else:
            torch.save(bad, path)
        monkeypatch.setattr(digits, "_TRAINED", {})
        with caplog.at_level("WARNING", logger=digits.__name__):
            features = digits.DigitsFeatures.trained(seed=0)
        assert str(path) in caplog.text and "training" in caplog.text
        caplog.clear()
        for name, value in features.classifier.state_dict().items():
            assert torch.equal(value, good[name]), name
        assert torch.load(path, weights_only=True).keys() == good.keys()  # written over with the weights
    assert len(calls) == 4 and not (tmp_path / "tampered").exists()

    # a folder that cannot be written: trained, a warning that names the variable, no error
    monkeypatch.setenv("ACT_LIGHTNING_CACHE", str(tmp_path / "file" / "cache"))
    (tmp_path / "file").write_text("a file where the folder would be")
    monkeypatch.setattr(digits, "_TRAINED", {})
    with caplog.at_level("WARNING", logger=digits.__name__):
        digits.DigitsFeatures.trained(seed=0)
    assert "ACT_LIGHTNING_CACHE" in caplog.text and len(calls) == 5

    # the file's name changes with what training depends on
    assert digits.cache_path(0, x, y) != digits.cache_path(0, x, (y + 1) % 10) != digits.cache_path(1, x, y)


def test_inception_weights_in_the_hub_cache_are_not_downloaded_again(empty_hub, monkeypatch):
    fetched = []

    def download(url, dst, hash_prefix=None, progress=True):
        fetched.append((url, hash_prefix))
        Path(dst).write_bytes(b"weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    assert resolve_inception_weights(None, download=True) == str(empty_hub)
    assert fetched == [(WEIGHTS_URL, "6726825d")]  # checked against the release's SHA-256 prefix
    assert resolve_inception_weights(None, download=True) == str(empty_hub) and len(fetched) == 1


def test_to_uint8_truncates_on_request_and_refuses_other_quantizations():
    values = torch.tensor([10.6, 10.4, 254.7, -3.0, 300.0]) / 127.5 - 1
    assert to_uint8(values, "truncate").tolist() == [10, 10, 254, 0, 255]
    with pytest.raises(ValueError, match="eval.quantize must be one of round, truncate; got 'floor'"):
        to_uint8(values, "floor")
    with pytest.raises(ValueError, match="eval.quantize must be one of round, truncate; got 'floor'"):
        InceptionFeatures("random", quantize="floor")


def test_a_reference_with_statistics_and_images_uses_the_statistics_in_float64(tmp_path):
    images = np.zeros((2, 8, 8, 3), np.uint8)
    np.savez(
        tmp_path / "both.npz", mu=np.ones(4, np.float32), sigma=np.eye(4, dtype=np.float32), arr_0=images
    )
    mu, sigma = load_reference(tmp_path / "both.npz", 4, extract=lambda batches: pytest.fail("extracted"))
    assert mu.dtype == sigma.dtype == np.float64 and mu.tolist() == [1.0] * 4
    np.testing.assert_array_equal(sigma, np.eye(4))


def test_a_reference_batch_of_one_image_or_channels_first_is_named(tmp_path):
    """One image failed with 'need at least 2 feature vectors for a covariance' (no key, no file); images
    kept channels first were said to be another size ('images of 3x32 with 32 channel(s)')."""
    one = tmp_path / "one.npz"
    np.savez(one, arr_0=np.zeros((1, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(ReferenceStatisticsError, match=rf"eval.reference={one}: arr_0 holds 1 image\(s\)"):
        check_reference_images(one, 8, 3)
    nchw = tmp_path / "nchw.npz"
    np.savez(nchw, arr_0=np.zeros((4, 3, 8, 8), dtype=np.uint8))
    with pytest.raises(ReferenceStatisticsError, match=r"holds channels first; .* \(N, 8, 8, 3\)"):
        check_reference_images(nchw, 8, 3)
    fine = tmp_path / "fine.npz"
    np.savez(fine, arr_0=np.zeros((4, 8, 8, 3), dtype=np.uint8))
    check_reference_images(fine, 8, 3)


def test_reference_images_of_other_than_one_or_three_channels_are_named(tmp_path):
    np.savez(tmp_path / "rgba.npz", arr_0=np.zeros((2, 8, 8, 4), np.uint8))
    with pytest.raises(
        ReferenceStatisticsError, match=r"with C = 1 or 3; found uint8 of shape \(2, 8, 8, 4\)"
    ):
        load_reference(tmp_path / "rgba.npz", 4, extract=lambda batches: pytest.fail("extracted"))


def test_reference_statistics_of_the_wrong_size_are_named_by_either_array(tmp_path):
    np.savez(tmp_path / "sigma.npz", mu=np.zeros(4), sigma=np.eye(3))
    with pytest.raises(ReferenceStatisticsError, match=r"mu \(4,\), sigma \(3, 3\)"):
        load_reference(tmp_path / "sigma.npz", 4)
    np.savez(tmp_path / "mu.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ReferenceStatisticsError, match=r"statistics of 3-d features, but .* gives 4-d"):
        load_reference(tmp_path / "mu.npz", 4)


def test_reference_images_become_batches_of_exact_values_in_minus_one_to_one():
    images = np.array([0, 255, 128, 1, 254, 7], np.uint8).reshape(1, 1, 2, 3)  # (N, H, W, C)
    (batch,) = image_batches(images, 4)
    assert batch.shape == (1, 3, 1, 2) and batch.dtype == torch.float32
    assert torch.equal(batch[0, :, 0, 0], torch.tensor([0.0, 255.0, 128.0]) / 127.5 - 1)
    assert batch[0, :2, 0, 0].tolist() == [-1.0, 1.0]
    assert torch.equal(to_uint8(batch), torch.from_numpy(images).permute(0, 3, 1, 2))


def test_reference_image_features_of_the_training_set_or_of_an_npz_batch(tmp_path):
    class Data:
        def __init__(self):
            self.calls = []

        def reference_dataloader(self, batch_size, max_images=None):
            self.calls.append((batch_size, max_images))
            images = torch.linspace(-1, 1, 5 * 3 * 2 * 2).reshape(5, 3, 2, 2)[:max_images]
            return [(x, None) for x in images.split(batch_size)]

    def extractor(x, real=False):
        assert real  # the reference's images are read as real ones
        return x.flatten(1)[:, :4]

    data = Data()
    features = reference_image_features("train", data, extractor, 3, 2, "cpu")
    assert data.calls == [(2, 3)] and features.shape == (3, 4)
    images = np.arange(4 * 2 * 2 * 3, dtype=np.uint8).reshape(4, 2, 2, 3)
    np.savez(tmp_path / "ref.npz", arr_0=images)
    features = reference_image_features(str(tmp_path / "ref.npz"), None, extractor, 3, 2, "cpu")
    assert torch.equal(features, torch.cat(list(image_batches(images[:3], 3))).flatten(1)[:, :4])
    np.savez(tmp_path / "stats.npz", mu=np.zeros(4), sigma=np.eye(4))
    with pytest.raises(ReferenceStatisticsError, match=r"stats\.npz: holds statistics only \(mu, sigma\)"):
        reference_image_features(str(tmp_path / "stats.npz"), None, extractor, 3, 2, "cpu")


def test_saved_reference_statistics_keep_their_metadata(tmp_path):
    save_reference(tmp_path / "ref.npz", np.zeros(2), np.eye(2), source="train", count=5)
    with np.load(tmp_path / "ref.npz") as npz:
        assert str(npz["source"]) == "train" and int(npz["count"]) == 5
        assert sorted(npz.files) == ["count", "mu", "sigma", "source"]


def test_a_reference_without_known_arrays_is_not_blamed_on_object_arrays(tmp_path):
    np.savez(tmp_path / "keys.npz", features=np.zeros(3))
    with pytest.raises(ReferenceStatisticsError) as err:
        load_reference(tmp_path / "keys.npz", 4)
    assert str(err.value).startswith(f"{tmp_path / 'keys.npz'}: expected arrays `mu` and `sigma`")
    assert "object arrays" not in str(err.value)
