"""Improved precision / recall (pipeline/fid.py) against a brute-force numpy reference on random points.

The reference follows the definition directly (Kynkäänniemi et al. 2019): a set's manifold is the union of balls
around its points, each with radius = distance to its k-th nearest other point of the same set; precision is the
share of fakes inside the real manifold, recall the share of reals inside the fake manifold. Points are random
and continuous, so no distance ties and no point lies on a ball's edge within float32 rounding (the margin is
checked below): the answer does not depend on how ties are broken. The data are chosen so that neither value is
0 or 1 and the values move with k (a wrong neighbour count gives a different answer)."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.fid import precision_recall


def pairwise_sq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def kth_radius_sq(x: np.ndarray, k: int) -> np.ndarray:
    d = pairwise_sq(x, x)
    np.fill_diagonal(d, np.inf)  # a point is not its own neighbour
    return np.sort(d, axis=1)[:, k - 1]


def coverage(queries: np.ndarray, centres: np.ndarray, radii_sq: np.ndarray) -> tuple[float, float]:
    """(share of queries inside some ball, edge margin). A query's decision rests on m = max_j (r_j^2 - d_j^2):
    inside when m >= 0. The margin is min |m| over the queries: how far the closest call is from flipping."""
    m = (radii_sq[None, :] - pairwise_sq(queries, centres)).max(1)
    return float((m >= 0).mean()), float(np.abs(m).min())


def brute_force(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float, float]:
    """Precision, recall and the edge margin, in float64 on the float32-rounded points (what faiss sees)."""
    real, fake = (np.asarray(a, np.float32).astype(np.float64) for a in (real, fake))
    p, m1 = coverage(fake, real, kth_radius_sq(real, k))
    r, m2 = coverage(real, fake, kth_radius_sq(fake, k))
    return p, r, min(m1, m2)


def point_sets(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """300 reals and 250 fakes in 8 dimensions; the fakes are shifted and narrower, so precision and recall
    are both strictly between 0 and 1."""
    rng = np.random.default_rng(seed)
    real = rng.standard_normal((300, 8))
    fake = 0.9 * rng.standard_normal((250, 8)) + 0.8
    return real, fake


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("seed", [1, 2])
def test_precision_recall_equal_brute_force_knn(k, seed):
    real, fake = point_sets(seed)
    p_ref, r_ref, margin = brute_force(real, fake, k)
    # faiss works in float32: squared distances and the augmented inner products (terms of size <= ~100 here)
    # carry rounding of ~1e-5, so only a query within that of a ball's edge could flip. On these draws the
    # closest call is >= 4e-3 away, so the two must agree exactly.
    assert margin > 1e-3
    assert 0.05 < p_ref < 0.95 and 0.05 < r_ref < 0.95
    p, r = precision_recall(real, fake, k=k)
    assert (p, r) == (p_ref, r_ref)


def test_neighbour_count_changes_the_answer():
    """The k in the definition matters on these sets: each k gives its own values, so a wrong k is noticed."""
    real, fake = point_sets(1)
    values = {k: brute_force(real, fake, k)[:2] for k in (1, 2, 3, 4)}
    assert len(set(values.values())) == 4
    assert values[1] != precision_recall(real, fake, k=2)


def test_precision_and_recall_are_not_swapped():
    """A fake set that covers only part of the reals: precision high, recall low; swapping the roles flips them."""
    rng = np.random.default_rng(4)
    real = rng.standard_normal((300, 4))
    fake = 0.3 * rng.standard_normal((300, 4))  # inside the core of the real cloud
    p, r = precision_recall(real, fake, k=3)
    p_ref, r_ref, margin = brute_force(real, fake, 3)
    assert margin > 1e-3 and (p, r) == (p_ref, r_ref) and p > 0.9 and r < 0.5
