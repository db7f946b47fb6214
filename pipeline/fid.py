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
- "clean_bicubic": clean-fid's "clean" mode (cleanfid/resize.py, make_resizer("PIL", quantize_after=False,
  "bicubic")): each channel as a PIL float image (mode 'F'), resized with PIL's BICUBIC filter (a = -0.5,
  support widened by in/out when downsampling, i.e. antialiased), then clipped to 0..255 and kept in float32
  (no quantisation back to uint8). We compute PIL's resampler ourselves, on the input's device: the same
  per-output-pixel coefficients (double), a horizontal pass stored as float32 (PIL's intermediate 'F' image)
  then a vertical pass, each a double sum, so the result is PIL's to within 7e-5 grey levels (bit-identical
  but for ~1 pixel in a million; tests compare with PIL itself). The clip matters: bicubic overshoot at sharp
  edges (Fashion-MNIST's black background) goes below 0 by tens of grey levels, and clean-fid cuts it off.
Both modes then scale x / 128 - 1, which maps 0..255 to the network's [-1, 0.9921875].
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping

import numpy as np
import torch
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


def _pil_bicubic_weight(x: float) -> float:
    """PIL's bicubic kernel (a = -0.5), written in PIL's order of operations so the doubles are the same."""
    x = -x if x < 0.0 else x
    if x < 1.0:
        return ((1.5 * x - 2.5) * x) * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * -0.5
    return 0.0


@functools.lru_cache(maxsize=16)
def _pil_bicubic_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """PIL's resampling coefficients (precompute_coeffs in libImaging/Resample.c, BICUBIC, the whole image as the
    box) as a dense float64 n_out x n_in matrix: row i holds output pixel i's normalised weights."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)  # downsampling widens the kernel: the antialiasing
    support = 2.0 * filterscale
    inv_scale = 1.0 / filterscale
    matrix = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)  # int() truncates toward 0, like C's cast
        count = min(int(center + support + 0.5), n_in) - lo
        k = [_pil_bicubic_weight((x + lo - center + 0.5) * inv_scale) for x in range(count)]
        total = 0.0
        for v in k:  # summed in PIL's order, so the normalised weights are PIL's doubles
            total += v
        matrix[i, lo:lo + count] = [v / total for v in k] if total != 0.0 else k
    return torch.from_numpy(matrix)


def _pil_bicubic(x: torch.Tensor, size: int) -> torch.Tensor:
    """PIL Image.resize((size, size), BICUBIC) of every float32 H x W plane of N x C x H x W, as PIL does it for
    mode 'F': a horizontal pass into a float32 image, then a vertical pass, each output a double sum.

    The sums run as float64 matrix products (PIL's sparse taps; the zeros add nothing) instead of PIL's
    sequential loop, ~5x faster; the order of a double sum differs, so a result can land on the other side of a
    float32 rounding boundary: one ulp, carried through the second pass (< 7e-5 grey levels in all), and
    bit-identical for all but ~1 pixel in a million.
    """
    if x.shape[3] != size:  # PIL skips a pass whose size does not change
        x = (x.to(torch.float64) @ _pil_bicubic_matrix(x.shape[3], size).to(x.device).T).to(torch.float32)
    if x.shape[2] != size:
        x = (_pil_bicubic_matrix(x.shape[2], size).to(x.device) @ x.to(torch.float64)).to(torch.float32)
    return x


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
            # clean-fid clips after the float resize (bicubic overshoots at edges) and does not quantise.
            x = _pil_bicubic(x, size).clamp_(0.0, 255.0)
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


def frechet_distance_low_rank(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """The Fréchet distance of two feature sets (n1 x d, n2 x d) through the n1 x n2 cross-Gram matrix.

    With centred features A (n1 x d), B (n2 x d), S1 = A^T A / (n1 - 1) and S2 = B^T B / (n2 - 1):
      S1 S2 = A^T (A B^T B) / c,  c = (n1 - 1)(n2 - 1).
    XY and YX have the same non-zero eigenvalues with the same multiplicities, so with X = A^T, Y = A B^T B / c
    the non-zero eigenvalues of S1 S2 are those of Y X = (A B^T)(A B^T)^T / c = M M^T / c with M = A B^T, i.e.
    sigma_i(M)^2 / c. Zero eigenvalues add nothing to the trace of the square root, so
      tr sqrt(S1 S2) = sum_i sigma_i(A B^T) / sqrt(c),   tr S1 = ||A||_F^2 / (n1 - 1), likewise tr S2,
    and FID = ||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2) costs O(n1 n2 d + n1 n2 min(n1, n2)) instead
    of O(d^3 + (n1 + n2) d^2). The singular values of M come with absolute error ~ eps ||M||, so the eigenvalues
    that are zero (d - rank of them) cost nothing here, whereas the d x d route takes square roots of their
    rounding (~ sqrt(eps) each). Valid for any n1, n2 >= 2; cheaper when they are small against d.
    """
    a = _check_features(feats1, "feats1", min_rows=2)
    b = _check_features(feats2, "feats2", min_rows=2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    a, b = a - mu1, b - mu2
    n1, n2 = len(a), len(b)
    tr1, tr2 = np.einsum("ij,ij->", a, a) / (n1 - 1), np.einsum("ij,ij->", b, b) / (n2 - 1)
    tr_covmean = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    diff = mu1 - mu2
    return float(max(diff @ diff + tr1 + tr2 - 2.0 * tr_covmean, 0.0))


def frechet_distance_features(feats1: np.ndarray, feats2: np.ndarray,
                              stats1: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """FID of two feature sets by the cheaper exact route: the n1 x n2 cross-Gram (`frechet_distance_low_rank`)
    when the sets are small against the dimension, else d x d covariances (`stats1`: cached statistics of
    feats1, used only on that route). Both give the same number to rounding."""
    n1, n2, d = len(feats1), len(feats2), np.shape(feats1)[-1]
    # Flop counts: the Gram product + a singular-value-only SVD (~4 m n^2), against the covariances still to
    # compute + the d x d work (cholesky d^3/3, two products 4 d^3, eigvalsh ~4 d^3/3, eigh when both are
    # singular ~9 d^3: ~8 d^3 taken).
    gram = 2.0 * n1 * n2 * d + 4.0 * max(n1, n2) * min(n1, n2) ** 2
    full = 8.0 * d ** 3 + 2.0 * d * d * (n2 + (n1 if stats1 is None else 0))
    if gram < full:
        return frechet_distance_low_rank(feats1, feats2)
    mu1, sigma1 = stats1 if stats1 is not None else stats(feats1)
    return frechet_distance(mu1, sigma1, *stats(feats2))


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

# Distances are screened with one float64 matrix product per block (||q||^2 + ||c||^2 - 2 q.c on centred
# features) and every decision the screen cannot settle by its rounding bound is made on the differences
# themselves, so the result is the definition's on the given float64 features: ties and duplicates included.
_U64 = 2.0 ** -53  # unit roundoff of float64
_BLOCK_ELEMENTS = 1 << 22  # distance-matrix block: 32 MB of float64


def _gamma(n: int) -> float:
    """Higham's gamma_n in float64: |fl(x . y) - x . y| <= gamma_n sum_i |x_i y_i| in any summation order."""
    return n * _U64 / (1.0 - n * _U64)


def _sq_dists(point: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances from the differences, not ||a||^2 + ||b||^2 - 2ab: exactly 0 for duplicates,
    symmetric in the pair, and the same bits wherever the same pair is computed."""
    return np.square(rows - point).sum(axis=-1)


class _Screen:
    """Squared distances from query rows to a fixed set, by the expansion, with a bound on each one's error.

    Translating both sides by one centre changes no distance and shrinks the norms that rounding scales with.
    The bound: the dot product is off by at most gamma_{d+2} ||q|| ||c|| (inputs rounded by the centring count
    as two extra terms), the norms and the sum by a few more roundings of (||q|| + ||c||)^2; doubled.
    """

    def __init__(self, feats: np.ndarray):
        self.centre = feats.mean(axis=0)
        self.c = feats - self.centre
        self.c_norm_sq = np.einsum("ij,ij->i", self.c, self.c)
        self.c_norm = np.sqrt(self.c_norm_sq)
        self.gamma = 2.0 * _gamma(feats.shape[1] + 6)

    def __call__(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = queries - self.centre
        q_norm_sq = np.einsum("ij,ij->i", q, q)
        dist = q_norm_sq[:, None] + self.c_norm_sq[None, :] - 2.0 * (q @ self.c.T)
        error = self.gamma * (np.sqrt(q_norm_sq)[:, None] + self.c_norm[None, :]) ** 2
        return dist, error


def _block_rows(n_columns: int, batch_rows: int) -> int:
    return max(1, min(batch_rows, _BLOCK_ELEMENTS // max(n_columns, 1)))


def _knn_radii_sq(feats: np.ndarray, k: int, batch_rows: int) -> np.ndarray:
    """Squared distance from each point to its k-th nearest other point (duplicates count), exactly.

    With t the k-th smallest screened distance of a row and E the largest error bound in that row, the true
    k-th smallest distance is at most t + E (k points are screened at <= t), so a point screened above t + 2E
    cannot be among the k nearest: the rest are recomputed from the differences and the k-th taken.
    """
    n = len(feats)
    screen = _Screen(feats)
    radii = np.empty(n)
    step = _block_rows(n, batch_rows)
    for start in range(0, n, step):
        rows = np.arange(start, min(start + step, n))
        dist, error = screen(feats[rows])
        dist[np.arange(len(rows)), rows] = np.inf  # the point itself is not its own neighbour
        t = np.partition(dist, k - 1, axis=1)[:, k - 1]
        keep = dist <= (t + 2.0 * error.max(axis=1))[:, None]
        for r, i in enumerate(rows):
            cand = np.flatnonzero(keep[r])
            radii[i] = np.partition(_sq_dists(feats[i], feats[cand]), k - 1)[k - 1]
    return radii


def _inside_fraction(queries: np.ndarray, centres: np.ndarray, radii_sq: np.ndarray, batch_rows: int) -> float:
    """Fraction of queries q with ||q - c_j||^2 <= r_j^2 for some centre j, exactly.

    A pair whose screened margin r_j^2 - ||q - c_j||^2 exceeds its error bound is inside, one below minus the
    bound outside; only the pairs in between (ties with the radius, duplicates at radius 0) are recomputed from
    the differences.
    """
    screen = _Screen(centres)
    inside = 0
    step = _block_rows(len(centres), batch_rows)
    for start in range(0, len(queries), step):
        q = queries[start:start + step]
        dist, error = screen(q)
        margin = radii_sq[None, :] - dist
        hit = (margin > error).any(axis=1)
        unsure = np.abs(margin) <= error
        for r in np.flatnonzero(~hit & unsure.any(axis=1)):
            cand = np.flatnonzero(unsure[r])
            hit[r] = bool((_sq_dists(q[r], centres[cand]) <= radii_sq[cand]).any())
        inside += int(hit.sum())
    return inside / len(queries)


def precision_recall(real_feats: np.ndarray, fake_feats: np.ndarray, k: int = 3,
                     batch_rows: int = 4096) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    Each set's manifold is the union of balls around its points with radius = distance to the k-th nearest
    neighbour in the same set (duplicates are neighbours at distance 0). Precision: fraction of fake samples
    inside the real manifold; recall: fraction of real samples inside the fake manifold. Decided exactly on the
    given float64 features (ties and duplicates included); distances are screened `batch_rows` queries at a
    time (fewer for large sets), so memory stays bounded.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    real = _check_features(real_feats, "real_feats", min_rows=k + 1)
    fake = _check_features(fake_feats, "fake_feats", min_rows=k + 1)
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
    their protocols agree: FID depends on sample counts, the reference images (split, subset seed, dataset
    content), resize convention and feature network, and a generated-sample metric on what made the samples.

    `seed` seeds the KID subsets; `ref_seed` is the seed of the reference's random subset of its split;
    `dataset_fingerprint` the prepared dataset's content hash; `sampler` identifies what produced the evaluated
    images (model fingerprint, sampler parameters and seed), None where that is not recorded.
    """
    n_gen: int
    n_ref: int
    ref_split: str
    resize_mode: str
    feature_network_hash: str
    seed: int
    kid_subset_size: int = 1000
    kid_subsets: int = 100
    pr_k: int = 3
    ref_seed: int | None = None
    dataset_fingerprint: str | None = None
    sampler: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _check_mode(self.resize_mode)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def protocol_id(protocol: Mapping[str, Any]) -> str:
    """A short hash of how a number was measured, leaving out `sampler` (what was measured): two gFIDs with equal
    ids are comparable, whatever models made them."""
    measured = {k: v for k, v in protocol.items() if k != "sampler"}
    return hashlib.sha256(json.dumps(measured, sort_keys=True).encode()).hexdigest()[:12]


def with_protocol(values: Mapping[str, float], protocol: Protocol) -> dict[str, dict[str, Any]]:
    """{name: number} -> {name: {"value": number, "protocol": {...}}}: the shape our metrics JSON uses, so
    `dvc metrics diff` shows a protocol change next to the number it affects."""
    return {name: {"value": float(value), "protocol": protocol.as_dict()} for name, value in values.items()}


def compute_metrics(real_feats: np.ndarray, fake_feats: np.ndarray, protocol: Protocol,
                    real_stats: tuple[np.ndarray, np.ndarray] | None = None, prefix: str = "") -> dict[str, Any]:
    """FID, KID (mean, std), precision and recall of fake vs real features, each with its protocol.

    `real_stats` lets a caller reuse cached reference statistics (of `real_feats`: used when the d x d route is
    the cheaper one, see `frechet_distance_features`). The protocol's sample counts must match the
    features; the KID subset size is recorded as actually used (clipped to the smaller set).
    """
    real = _check_features(real_feats, "real_feats", min_rows=2)
    fake = _check_features(fake_feats, "fake_feats", min_rows=2)
    if (protocol.n_ref, protocol.n_gen) != (len(real), len(fake)):
        raise ValueError(f"protocol says n_ref={protocol.n_ref}, n_gen={protocol.n_gen} but got "
                         f"{len(real)} reference and {len(fake)} generated features")
    used = dataclasses.replace(protocol, kid_subset_size=min(protocol.kid_subset_size, len(real), len(fake)))
    kid_mean, kid_std = kid(real, fake, used.kid_subsets, used.kid_subset_size, used.seed)
    precision, recall = precision_recall(real, fake, used.pr_k)
    values = {"fid": frechet_distance_features(real, fake, real_stats), "kid_mean": kid_mean, "kid_std": kid_std,
              "precision": precision, "recall": recall}
    return with_protocol({prefix + name: v for name, v in values.items()}, used)
