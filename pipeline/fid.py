"""Evaluation core: preprocessing for the FID network, feature extraction, FID / KID / precision-recall,
and the protocol every number is recorded with.

Stages (`evaluate`, `fid_ref`) own the I/O; this module is pure computation on arrays.

Resize conventions (`mode`, recorded in the protocol because FID changes with it):
- "tf_bilinear": what the original TF FID graph did and torch-fidelity reproduces. TF 1.x ResizeBilinear with
  align_corners=False and no half-pixel centres: output pixel i samples the input at src = i * (in / out),
  computed in float32, from the pixels floor(src) and floor(src) + 1 (clamped to the last one), without
  antialiasing. This is NOT torch's align_corners=False (which samples at (i + 0.5) * in / out - 0.5): TF's
  grid is anchored at the top-left corner, so upsampling shifts content by up to half an input pixel and the
  last output rows repeat the border (32 -> 299: the last 9). Interpolation runs on float32 values 0..255 and
  is a convex combination, so the output stays inside 0..255.
- "clean_bicubic": clean-fid's "clean" mode, i.e. PIL bicubic on float32 channels. torch's antialiased bicubic
  uses PIL's kernel (a = -0.5, support widened when downsampling); it matches PIL within 4e-4 (upsampling) and
  3e-3 (downsampling) grey levels on 0..255. Like clean-fid we neither quantise back to uint8 nor clip after
  the resize, so bicubic overshoot at sharp edges can leave the nominal input range (little on natural
  images; at most ~0.56 of the range on pixel noise).
Both modes then scale x / 128 - 1, which maps 0..255 to the network's [-1, 0.9921875].
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

INPUT_SIZE = 299
RESIZE_MODES = ("tf_bilinear", "clean_bicubic")
ResizeMode = Literal["tf_bilinear", "clean_bicubic"]

ImageBatch = torch.Tensor | np.ndarray


# ----------------------------------------------------------------------------- preprocessing

def _check_mode(mode: str) -> None:
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {', '.join(RESIZE_MODES)}")


def _as_nchw_uint8(images: ImageBatch) -> torch.Tensor:
    """Validate a batch of uint8 images, N x H x W x C or N x C x H x W with C in {1, 3}; return N x C x H x W."""
    if isinstance(images, np.ndarray):
        # torch.from_numpy warns on read-only arrays (as PIL gives) and rejects negative strides: copy those.
        if not images.flags.writeable or min(images.strides, default=0) < 0:
            images = np.array(images)
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor or numpy array, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        if images.is_floating_point() and torch.isnan(images).any():
            raise ValueError(f"images contain NaN values (dtype {images.dtype}); expected uint8 images 0..255")
        raise ValueError(f"images have dtype {images.dtype}; expected uint8 images 0..255 "
                         "(convert decoded float images with (x * 255).round().clamp(0, 255).to(torch.uint8))")
    if images.ndim != 4:
        raise ValueError(f"images must be a 4-d batch N x H x W x C or N x C x H x W, got shape "
                         f"{tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("empty image set: got a batch of 0 images")
    # Channels-last is how images are stored (HxWxC PNGs); channels-first is how models emit them.
    last, second = images.shape[-1] in (1, 3), images.shape[1] in (1, 3)
    if last and second:
        raise ValueError(f"ambiguous image layout {tuple(images.shape)}: both dim 1 and dim 3 look like channels")
    if not (last or second):
        raise ValueError(f"images must have 1 (grey) or 3 (RGB) channels, got shape {tuple(images.shape)}; "
                         "composite RGBA onto a background first")
    if last:
        images = images.permute(0, 3, 1, 2)
    if min(images.shape[2:]) < 1:
        raise ValueError(f"images have an empty spatial size: shape {tuple(images.shape)}")
    return images


def _tf1_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF 1.x ResizeBilinear (align_corners=False, half_pixel_centers=False) of float N x C x H x W to size^2."""

    def taps(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # float32 throughout, like TF: scale = in / out, src = i * scale.
        scale = torch.tensor(np.float32(n_in) / np.float32(size), dtype=torch.float32)
        src = torch.arange(size, dtype=torch.float32, device=x.device) * scale.to(x.device)
        lo = src.floor().long()
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (src - lo.to(torch.float32)).to(x.dtype)

    x_lo, x_hi, fx = taps(x.shape[3])
    y_lo, y_hi, fy = taps(x.shape[2])
    # Separable: interpolating every row horizontally first, then picking rows, performs exactly TF's
    # top = tl + (tr - tl) * fx; bottom = bl + (br - bl) * fx; out = top + (bottom - top) * fy.
    left, right = x[..., x_lo], x[..., x_hi]
    rows = left + (right - left) * fx
    top, bottom = rows[..., y_lo, :], rows[..., y_hi, :]
    return top + (bottom - top) * fy[:, None]


def to_inception_input(images_uint8: ImageBatch, mode: ResizeMode = "tf_bilinear",
                       size: int = INPUT_SIZE) -> torch.Tensor:
    """uint8 images (N x H x W x C or N x C x H x W, C = 1 or 3) -> float32 N x 3 x 299 x 299 in the FID network's
    range (x / 128 - 1). Runs on the input's device."""
    _check_mode(mode)
    return _resize_and_scale(_as_nchw_uint8(images_uint8), mode, size)


def _resize_and_scale(images: torch.Tensor, mode: ResizeMode, size: int = INPUT_SIZE) -> torch.Tensor:
    """to_inception_input on an already validated N x C x H x W uint8 batch."""
    x = images.to(torch.float32)
    if x.shape[2:] != (size, size):
        if mode == "tf_bilinear":
            x = _tf1_bilinear(x, size)
        else:
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    # Grey -> RGB after the resize: the resize is per channel, so this gives the same result at a third of the cost.
    x = x.expand(-1, 3, -1, -1)
    return (x / 128.0 - 1.0).contiguous()


# ----------------------------------------------------------------------------- feature extraction

def _rebatch(images_iter: Iterable[ImageBatch] | ImageBatch, batch_size: int) -> Iterable[torch.Tensor]:
    """Yield validated N x C x H x W uint8 batches of exactly batch_size (the last may be smaller), whatever
    batch sizes the source yields, so the network always sees full batches."""
    if isinstance(images_iter, (torch.Tensor, np.ndarray)):
        images_iter = [images_iter]
    pending: list[torch.Tensor] = []
    n_pending = 0
    for chunk in images_iter:
        chunk = _as_nchw_uint8(chunk)
        if pending and chunk.shape[1:] != pending[0].shape[1:]:
            # Mixed sizes cannot share a tensor before resizing: flush what we have.
            yield torch.cat(pending)
            pending, n_pending = [], 0
        pending.append(chunk)
        n_pending += chunk.shape[0]
        while n_pending >= batch_size:
            merged = torch.cat(pending) if len(pending) > 1 else pending[0]
            yield merged[:batch_size]
            rest = merged[batch_size:]
            pending, n_pending = ([rest], rest.shape[0]) if rest.shape[0] else ([], 0)
    if pending:
        yield torch.cat(pending)


@torch.inference_mode()
def extract_features(images_iter: Iterable[ImageBatch] | ImageBatch, net: torch.nn.Module, batch_size: int = 50,
                     mode: ResizeMode = "tf_bilinear", device: str | torch.device = "cpu",
                     total: int | None = None, progress: bool = True) -> np.ndarray:
    """Stream uint8 image batches (any batch sizes, or one array) through resize + `net`; return N x D float64.

    `total` (number of images) only sizes the progress bar, which goes to stderr.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_mode(mode)
    device = torch.device(device)
    feats: list[np.ndarray] = []
    with tqdm(total=total, desc="features", unit="img", file=sys.stderr, disable=not progress) as bar:
        for batch in _rebatch(images_iter, batch_size):
            # Resize on the device: on a GPU it is then nearly free; uint8 keeps the transfer 4x smaller.
            x = _resize_and_scale(batch.to(device, non_blocking=True), mode)
            feats.append(net(x).to("cpu", torch.float64).numpy())
            bar.update(batch.shape[0])
    if not feats:
        raise ValueError("empty image set: the image source yielded no images")
    out = np.concatenate(feats)
    if not np.isfinite(out).all():
        raise ValueError("feature network produced non-finite features; check the input images")
    return out


# ----------------------------------------------------------------------------- Fréchet distance

def _check_features(feats: np.ndarray, name: str, min_rows: int = 1) -> np.ndarray:
    feats = np.asarray(feats)
    if feats.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array N x D, got shape {feats.shape}")
    if feats.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} samples, got {feats.shape[0]}")
    if not np.isfinite(feats).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return feats.astype(np.float64, copy=False)


def stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, N - 1) covariance of N x D features, float64."""
    feats = _check_features(features, "features", min_rows=2)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _check_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"inconsistent statistics: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, "
                         f"sigma2 {sigma2.shape}")
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    return mu1, sigma1, mu2, sigma2


def _factor_one(sigma1: np.ndarray, sigma2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(F, other) with F F^T one of the two covariances and `other` the other one.

    Cholesky when either covariance allows it: ~10x cheaper than an eigendecomposition and backward stable
    whenever it completes. The roles may swap because S1 S2 and S2 S1 have the same eigenvalues; that keeps
    the fast path for the usual case of a full-rank reference against fewer generated samples than
    dimensions. If both are singular: F = U diag(sqrt(l)) from eigh, rounding negatives clipped to 0.
    """
    for sigma, other in ((sigma1, sigma2), (sigma2, sigma1)):
        try:
            return np.linalg.cholesky(sigma), other
        except np.linalg.LinAlgError:
            pass
    evals, evecs = np.linalg.eigh(sigma1)
    return evecs * np.sqrt(np.clip(evals, 0.0, None)), sigma2


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), float64.

    tr sqrt(S1 S2) without a non-symmetric matrix square root (scipy's sqrtm is slow and returns complex
    noise): for any factor S1 = F F^T (e.g. F = U diag(sqrt(l)) from S1 = U diag(l) U^T), S1 S2 = F (F^T S2)
    has the same non-zero eigenvalues as F^T S2 F, which is symmetric PSD. So tr sqrt(S1 S2) =
    sum sqrt(eigvalsh(F^T S2 F)): real arithmetic, symmetric solvers only, and rank-deficient covariances are
    fine (eigenvalues that are 0 in exact arithmetic come out as +-rounding and are clipped at 0).
    """
    mu1, sigma1, mu2, sigma2 = _check_stats(mu1, sigma1, mu2, sigma2)
    # Covariances are symmetric in exact arithmetic; cholesky/eigh read one triangle, so symmetrise explicitly.
    sigma1 = (sigma1 + sigma1.T) / 2
    sigma2 = (sigma2 + sigma2.T) / 2
    factor, other = _factor_one(sigma1, sigma2)
    inner = factor.T @ other @ factor
    evals = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = np.sqrt(np.clip(evals, 0.0, None)).sum()
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean
    # A squared distance: tiny negatives are rounding (identical statistics), not information.
    return float(max(fd, 0.0))


def frechet_distance_reference(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Plain float64 reference for tests and the benchmark: eigenvalues of the non-symmetric S1 S2 (real and
    >= 0 in exact arithmetic), imaginary parts dropped, negative real parts clipped."""
    mu1, sigma1, mu2, sigma2 = _check_stats(mu1, sigma1, mu2, sigma2)
    evals = np.linalg.eigvals(sigma1 @ sigma2)
    tr_covmean = np.sqrt(np.clip(evals.real, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


# ----------------------------------------------------------------------------- KID

def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def kid(feat_a: np.ndarray, feat_b: np.ndarray, n_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): the unbiased MMD^2 estimate with the cubic
    polynomial kernel k(x, y) = (x.y / d + 1)^3, on `n_subsets` random subsets of `subset_size` samples from
    each set (drawn without replacement; size clipped to the smaller set). Returns the mean and the
    (population) standard deviation over subsets. The estimate is unbiased, so it can be slightly negative.
    """
    a = _check_features(feat_a, "feat_a", min_rows=2)
    b = _check_features(feat_b, "feat_b", min_rows=2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if n_subsets < 1 or subset_size < 2:
        raise ValueError(f"need n_subsets >= 1 and subset_size >= 2, got {n_subsets}, {subset_size}")
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    estimates = np.empty(n_subsets)
    for i in range(n_subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        k_xx, k_yy, k_xy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
        # Unbiased: within-set sums leave out the diagonal (k(x, x) is not a sample of the cross term).
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        estimates[i] = within - 2.0 * k_xy.mean()
    return float(estimates.mean()), float(estimates.std())


# ----------------------------------------------------------------------------- precision / recall

def _knn_radii_sq(feats: np.ndarray, k: int, batch_rows: int) -> np.ndarray:
    """Squared distance from each point to its k-th nearest other point (exact, faiss IndexFlatL2)."""
    import faiss  # Imported here: only P&R needs it, and importing it costs ~0.5 s.

    index = faiss.IndexFlatL2(feats.shape[1])
    index.add(feats)
    radii = np.empty(len(feats), np.float32)
    for start in range(0, len(feats), batch_rows):
        # k + 1 neighbours: the nearest one is the point itself.
        dist_sq, _ = index.search(feats[start:start + batch_rows], k + 1)
        radii[start:start + batch_rows] = dist_sq[:, k]
    return radii


def _inside_fraction(queries: np.ndarray, centres: np.ndarray, radii_sq: np.ndarray, batch_rows: int) -> float:
    """Fraction of queries q with ||q - c_j||^2 <= r_j^2 for some centre j.

    The radii differ per centre, so this is not a k-NN query as such; but
    ||q - c||^2 - r^2 = ||q||^2 - <[q, 1], [2c, r^2 - ||c||^2]>, so the centre that best covers q is the
    maximum-inner-product neighbour of [q, 1] among the augmented centres: one exact faiss IndexFlatIP search.
    The winner is then re-checked in float64, so float32 rounding only matters for points on a ball's edge.
    """
    import faiss

    n, d = centres.shape
    index = faiss.IndexFlatIP(d + 1)
    # Built block by block: a float64 copy of 50k x 2048 features would be 800 MB.
    for start in range(0, n, batch_rows):
        c = centres[start:start + batch_rows].astype(np.float64)
        aug = np.empty((len(c), d + 1), np.float32)
        aug[:, :d] = 2.0 * c
        aug[:, d] = radii_sq[start:start + batch_rows] - (c ** 2).sum(1)
        index.add(aug)
    inside = 0
    for start in range(0, len(queries), batch_rows):
        q = queries[start:start + batch_rows]
        q_aug = np.hstack([q, np.ones((len(q), 1), np.float32)])
        _, best = index.search(q_aug, 1)
        best = best[:, 0]
        dist_sq = ((q.astype(np.float64) - centres[best].astype(np.float64)) ** 2).sum(1)
        inside += int((dist_sq <= radii_sq[best].astype(np.float64)).sum())
    return inside / len(queries)


def precision_recall(real_feats: np.ndarray, fake_feats: np.ndarray, k: int = 3,
                     batch_rows: int = 4096) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    Each set's manifold is the union of balls around its points with radius = distance to the k-th nearest
    neighbour in the same set. Precision: fraction of fake samples inside the real manifold; recall: fraction
    of real samples inside the fake manifold. Exact neighbours in float32 via faiss, queried `batch_rows` at a
    time so memory stays bounded (faiss itself tiles the database side).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    # faiss wants C-contiguous float32.
    real = np.ascontiguousarray(_check_features(real_feats, "real_feats", min_rows=k + 1), np.float32)
    fake = np.ascontiguousarray(_check_features(fake_feats, "fake_feats", min_rows=k + 1), np.float32)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
    real_radii = _knn_radii_sq(real, k, batch_rows)
    fake_radii = _knn_radii_sq(fake, k, batch_rows)
    precision = _inside_fraction(fake, real, real_radii, batch_rows)
    recall = _inside_fraction(real, fake, fake_radii, batch_rows)
    return precision, recall


# ----------------------------------------------------------------------------- protocol and metrics

@dataclass(frozen=True)
class Protocol:
    """How a set of metrics was made. Stored next to every number so that two numbers are only compared when
    their protocols agree (FID depends on sample counts, resize convention and feature network)."""
    n_gen: int
    n_ref: int
    ref_split: str
    resize_mode: str
    feature_network_hash: str
    seed: int
    kid_subset_size: int = 1000
    kid_subsets: int = 100
    pr_k: int = 3

    def __post_init__(self) -> None:
        _check_mode(self.resize_mode)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def with_protocol(values: Mapping[str, float], protocol: Protocol) -> dict[str, dict[str, Any]]:
    """{name: number} -> {name: {"value": number, "protocol": {...}}}: the shape our metrics JSON uses, so
    `dvc metrics diff` shows a protocol change next to the number it affects."""
    return {name: {"value": float(value), "protocol": protocol.as_dict()} for name, value in values.items()}


def compute_metrics(real_feats: np.ndarray, fake_feats: np.ndarray, protocol: Protocol,
                    real_stats: tuple[np.ndarray, np.ndarray] | None = None, prefix: str = "") -> dict[str, Any]:
    """FID, KID (mean, std), precision and recall of fake vs real features, each with its protocol.

    `real_stats` lets a caller reuse cached reference statistics. The protocol's sample counts must match the
    features; the KID subset size is recorded as actually used (clipped to the smaller set).
    """
    real = _check_features(real_feats, "real_feats", min_rows=2)
    fake = _check_features(fake_feats, "fake_feats", min_rows=2)
    if (protocol.n_ref, protocol.n_gen) != (len(real), len(fake)):
        raise ValueError(f"protocol says n_ref={protocol.n_ref}, n_gen={protocol.n_gen} but got "
                         f"{len(real)} reference and {len(fake)} generated features")
    used = dataclasses.replace(protocol, kid_subset_size=min(protocol.kid_subset_size, len(real), len(fake)))
    mu_r, sigma_r = real_stats if real_stats is not None else stats(real)
    mu_f, sigma_f = stats(fake)
    kid_mean, kid_std = kid(real, fake, used.kid_subsets, used.kid_subset_size, used.seed)
    precision, recall = precision_recall(real, fake, used.pr_k)
    values = {"fid": frechet_distance(mu_r, sigma_r, mu_f, sigma_f), "kid_mean": kid_mean, "kid_std": kid_std,
              "precision": precision, "recall": recall}
    return with_protocol({prefix + name: v for name, v in values.items()}, used)
