"""The FID library's contract beyond the headline numbers (pipeline/fid.py): KID against a brute-force unbiased MMD,
defaults that equal the recorded protocol's, float64 arithmetic whatever the input dtype, the protocol values
actually reaching the computation, and errors that name the offending argument and its limit. Written from the
survivors of a mutation run (scripts/mutation.sh pipeline/fid.py)."""
from __future__ import annotations

import dataclasses
import inspect
import warnings

import numpy as np
import pytest
import torch

from pipeline.fid import (Protocol, _rebatch, compute_metrics, frechet_distance, kid, precision_recall, stats,
                          to_inception_input)

RNG = np.random.default_rng(11)
A = RNG.standard_normal((40, 6))
B = 0.8 * RNG.standard_normal((30, 6)) + 0.3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(u, v) = (u.v / d + 1)^3, written out pair by pair."""
    d = x.shape[1]

    def k(u, v):
        return (u @ v / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_with_whole_sets_is_the_unbiased_mmd():
    # subsets as large as the sets: every subset is the whole set (in some order), so each estimate is exact
    a, b = A[:30], B
    mean, std = kid(a, b, n_subsets=3, subset_size=30)
    assert mean == pytest.approx(mmd2_unbiased(a, b), rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    assert mean > 0.01  # the sets differ, so the kernel and its constants matter
    # a subset size above the smaller set is clipped to it: still the whole smaller set
    assert kid(a, b, n_subsets=2, subset_size=500) == pytest.approx((mean, 0.0), abs=1e-12)
    # sets of different sizes: clipped to the smaller one (40 and 30 -> 30)
    assert kid(A, B, n_subsets=2, subset_size=35) == kid(A, B, n_subsets=2, subset_size=30)
    # subsets smaller than the sets: estimates differ from subset to subset
    assert kid(A, B, n_subsets=4, subset_size=10)[1] > 0


def test_precision_recall_does_not_depend_on_the_batching():
    real, fake = RNG.standard_normal((50, 5)), RNG.standard_normal((45, 5)) + 0.5
    assert precision_recall(real, fake, k=2, batch_rows=7) == precision_recall(real, fake, k=2)


def test_defaults_are_the_recorded_protocol():
    p = Protocol(n_gen=1, n_ref=1, ref_split="val", resize_mode="tf_bilinear", feature_network_hash="x", seed=0)
    defaults = {name: v.default for name, v in inspect.signature(kid).parameters.items()}
    assert (defaults["n_subsets"], defaults["subset_size"], defaults["seed"]) == (p.kid_subsets, p.kid_subset_size, 0)
    # and by behaviour: each default changes the answer, so each is the one the protocol records
    assert kid(A, B, subset_size=10) == kid(A, B, p.kid_subsets, 10, 0) != kid(A, B, p.kid_subsets + 1, 10, 0)
    assert kid(A, B, p.kid_subsets, 10) != kid(A, B, p.kid_subsets, 10, seed=1)
    big_a, big_b = RNG.standard_normal((p.kid_subset_size + 1, 2)), RNG.standard_normal((p.kid_subset_size + 1, 2))
    assert kid(big_a, big_b, 1) == kid(big_a, big_b, 1, p.kid_subset_size) != kid(big_a, big_b, 1, len(big_a))
    assert precision_recall(A, B) == precision_recall(A, B, k=p.pr_k)
    assert precision_recall(A, B) != precision_recall(A, B, k=p.pr_k + 1)


def test_kid_and_precision_recall_limits_and_messages():
    with pytest.raises(ValueError, match="^feat_a needs at least 2 samples, got 1$"):
        kid(A[:1], B)
    with pytest.raises(ValueError, match="^feat_b needs at least 2 samples, got 1$"):
        kid(A, B[:1])
    kid(A[:2], B[:2], n_subsets=1, subset_size=2)  # the smallest allowed
    with pytest.raises(ValueError, match=r"^need n_subsets >= 1 and subset_size >= 2, got 0, 5$"):
        kid(A, B, n_subsets=0, subset_size=5)
    with pytest.raises(ValueError, match=r"^need n_subsets >= 1 and subset_size >= 2, got 5, 1$"):
        kid(A, B, n_subsets=5, subset_size=1)
    with pytest.raises(ValueError, match="^feature dimensions differ: 6 vs 4$"):
        kid(A, B[:, :4])
    with pytest.raises(ValueError, match="^k must be >= 1, got 0$"):
        precision_recall(A, B, k=0)
    precision_recall(A[:4], B[:4], k=3)  # k + 1 points: each has k others
    with pytest.raises(ValueError, match="^real_feats needs at least 4 samples, got 3$"):
        precision_recall(A[:3], B, k=3)
    with pytest.raises(ValueError, match="^fake_feats needs at least 4 samples, got 3$"):
        precision_recall(A, B[:3], k=3)
    with pytest.raises(ValueError, match=r"^feat_a must be a 2-d array N x D, got shape \(6,\)$"):
        kid(A[0], B)
    with pytest.raises(ValueError, match="^features needs at least 2 samples, got 1$"):
        stats(A[:1])


def protocol(n_ref: int, n_gen: int, **kw) -> Protocol:
    return Protocol(n_gen=n_gen, n_ref=n_ref, ref_split="val", resize_mode="tf_bilinear",
                    feature_network_hash="h", seed=0, **kw)


def test_compute_metrics_uses_the_protocol_it_records():
    p = protocol(40, 30, kid_subsets=3, kid_subset_size=1000, pr_k=2)
    m = compute_metrics(A, B, p)
    # KID subsets clipped to the smaller set and recorded as used; KID with whole sets is the exact MMD
    assert m["kid_mean"]["protocol"]["kid_subset_size"] == 30
    assert compute_metrics(A, B, protocol(40, 30, kid_subset_size=12))["kid_mean"]["protocol"]["kid_subset_size"] == 12
    assert compute_metrics(B, A, protocol(30, 40))["kid_mean"]["protocol"]["kid_subset_size"] == 30
    assert m["kid_mean"]["value"] == kid(A, B, 3, 30, 0)[0]
    assert (m["precision"]["value"], m["recall"]["value"]) == precision_recall(A, B, k=2)
    p12 = protocol(40, 30, kid_subset_size=12)
    assert (compute_metrics(A, B, dataclasses.replace(p12, seed=5))["kid_mean"]["value"]
            == kid(A, B, 100, 12, 5)[0] != kid(A, B, 100, 12, 0)[0])
    # cached reference statistics are used as given
    shifted = (A.mean(0) + 1.0, np.cov(A, rowvar=False))
    assert compute_metrics(A, B, p, real_stats=shifted)["fid"]["value"] > m["fid"]["value"] + 1.0
    assert compute_metrics(A, B, p, prefix="ema_").keys() == {"ema_" + k for k in m}


def test_compute_metrics_limits_and_messages():
    compute_metrics(A[:2], B[:2], protocol(2, 2, pr_k=1))  # two of each is enough
    with pytest.raises(ValueError, match="^real_feats needs at least 2 samples, got 1$"):
        compute_metrics(A[:1], B, protocol(1, 30))
    with pytest.raises(ValueError, match="^fake_feats needs at least 2 samples, got 1$"):
        compute_metrics(A, B[:1], protocol(40, 1))


def test_frechet_distance_runs_in_float64_whatever_the_input_dtype():
    # 64 dimensions of float32 inputs: float32 arithmetic on them would differ from float64 in the last digits
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((200, 64)) + 3.0, 1.3 * rng.standard_normal((200, 64))
    mu1, mu2 = x.mean(0).astype(np.float32), y.mean(0).astype(np.float32)
    s1, s2 = np.cov(x, rowvar=False).astype(np.float32), np.cov(y, rowvar=False).astype(np.float32)
    as64 = [x.astype(np.float64) for x in (mu1, s1, mu2, s2)]
    assert frechet_distance(mu1, s1, mu2, s2) == frechet_distance(*as64)
    assert frechet_distance(mu1.tolist(), s1.tolist(), mu2, s2) == frechet_distance(*as64)


@pytest.mark.parametrize("which", range(4))
def test_frechet_distance_names_the_inconsistent_or_bad_statistic(which):
    good = [np.zeros(3), np.eye(3), np.zeros(3), np.eye(3)]
    wrong_shape = [np.zeros(3), np.eye(3), np.zeros(3), np.eye(3)]
    wrong_shape[which] = np.zeros(2) if which % 2 == 0 else np.eye(2)
    if which == 0:  # d is read from mu1: make mu1 agree with nothing else
        wrong_shape = [np.zeros(2), np.eye(3), np.zeros(3), np.eye(3)]
    with pytest.raises(ValueError, match="^inconsistent statistics"):
        frechet_distance(*wrong_shape)
    bad = list(good)
    bad[which] = bad[which].copy()
    bad[which].flat[0] = np.inf
    name = ["mu1", "sigma1", "mu2", "sigma2"][which]
    with pytest.raises(ValueError, match=f"^{name} contains NaN or infinite values$"):
        frechet_distance(*bad)


def test_image_input_contract():
    img = np.random.default_rng(0).integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)
    ref = to_inception_input(img.copy(), size=8)
    readonly = img.copy()
    readonly.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps a read-only array
        assert torch.equal(to_inception_input(readonly, size=8), ref)
    flipped = img[:, ::-1].copy()[:, ::-1]  # negative strides, same pixels
    assert torch.equal(to_inception_input(flipped, size=8), ref)
    assert to_inception_input(np.zeros((1, 3, 1, 2), np.uint8), size=4).shape == (1, 3, 4, 4)  # 1 pixel high
    with pytest.raises(ValueError, match=r"^images must be a 4-d batch N x H x W x C or N x C x H x W, got shape \(\)"):
        to_inception_input(np.array(7, np.uint8))  # a 0-d array: no strides to inspect
    with pytest.raises(ValueError, match="^images must be a torch.Tensor or numpy array, got list$"):
        to_inception_input([img])
    with pytest.raises(ValueError, match=r"^images have dtype torch.float32; expected uint8 images 0..255 \(convert"):
        to_inception_input(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"^images contain NaN values \(dtype torch.float32\)"):
        to_inception_input(torch.full((1, 3, 4, 4), float("nan")))
    with pytest.raises(ValueError, match=r"^ambiguous image layout \(1, 3, 4, 3\): both dim 1 and dim 3"):
        to_inception_input(np.zeros((1, 3, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"got shape \(1, 4, 4, 4\); composite RGBA onto a background first$"):
        to_inception_input(np.zeros((1, 4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"^images have an empty spatial size: shape \(1, 3, 0, 4\)$"):
        to_inception_input(torch.zeros(1, 3, 0, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"^images have an empty spatial size: shape \(1, 3, 4, 0\)$"):
        to_inception_input(torch.zeros(1, 3, 4, 0, dtype=torch.uint8))
    with pytest.raises(ValueError, match="^empty image set: got a batch of 0 images$"):
        to_inception_input(torch.zeros(0, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="^unknown resize mode 'x'; choose one of tf_bilinear, clean_bicubic$"):
        to_inception_input(img, mode="x")


def test_rebatch_keeps_order_and_sizes_across_any_chunking():
    imgs = torch.arange(11 * 3 * 2 * 2, dtype=torch.int64).remainder(256).to(torch.uint8).view(11, 3, 2, 2)
    other = torch.zeros(2, 3, 5, 5, dtype=torch.uint8)
    for chunks in ([imgs[:4], imgs[4:8], imgs[8:]], [imgs[:1], imgs[1:2], imgs[2:11]], [imgs],
                   [imgs[:3], imgs[3:6], imgs[6:9], imgs[9:]]):
        out = list(_rebatch(chunks, 4))
        assert [len(b) for b in out] == [4, 4, 3] and torch.equal(torch.cat(out), imgs)
    # a change of image size flushes what is pending, then starts again from zero
    out = list(_rebatch([imgs[:3], other, imgs[3:8]], 2))
    assert [tuple(b.shape[:1] + b.shape[2:]) for b in out] == [(2, 2, 2), (1, 2, 2), (2, 5, 5), (2, 2, 2),
                                                               (2, 2, 2), (1, 2, 2)]
    assert torch.equal(torch.cat([b for b in out if b.shape[2] == 2]), imgs[:8])
    out = list(_rebatch([imgs[:3], other, imgs[3:4]], 2))
    assert [len(b) for b in out] == [2, 1, 2, 1]
    # the pending count restarts at zero after a flush and after a batch that used everything
    assert [len(b) for b in _rebatch([imgs[:3], other[:1], other[1:]], 2)] == [2, 1, 2]
    assert [len(b) for b in _rebatch([imgs[:2], imgs[2:3], imgs[3:4]], 2)] == [2, 2]
