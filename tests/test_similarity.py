"""Representation distances: zero on identical inputs, the invariances each one promises (and no
more), symmetry, closed-form values, clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.linalg import orthogonal_procrustes
from scipy.stats import ortho_group

from secateurs.criteria.similarity import (
    DISTANCES,
    angular_distance,
    cka_distance,
    cosine_distance,
    distances,
    linear_cka,
    permutation_distance,
    procrustes_distance,
    unbiased_cka_distance,
    wasserstein_distance,
)
from secateurs.errors import SecateursError


def _xy(n=40, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, torch.randn(n, d, generator=g, dtype=torch.float64) + 0.5 * x


def _rotation(d, seed=0):
    return torch.from_numpy(ortho_group.rvs(d, random_state=seed))


@pytest.mark.parametrize("name", sorted(DISTANCES))
def test_identical_inputs_give_zero(name):
    x, _ = _xy()
    assert abs(DISTANCES[name](x, x.clone())) < 1e-9


@pytest.mark.parametrize("name", sorted(DISTANCES))
def test_symmetric_and_positive_on_different_inputs(name):
    x, y = _xy()
    assert DISTANCES[name](x, y) == pytest.approx(DISTANCES[name](y, x), rel=1e-9, abs=1e-12)
    assert DISTANCES[name](x, y) > 1e-3


@pytest.mark.parametrize("name", ["cka", "cka-unbiased", "procrustes"])
def test_rotation_and_isotropic_scale_leave_rotation_invariant_distances_at_zero(name):
    x, _ = _xy()
    y = 3.7 * x @ _rotation(x.shape[1]) + torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 1.0], dtype=torch.float64)
    assert abs(DISTANCES[name](x, y)) < 1e-7  # sqrt of a float64 rounding residue is ~1.5e-8


@pytest.mark.parametrize("name", ["cosine", "angular", "permutation", "wasserstein"])
def test_rotation_is_seen_by_distances_that_do_not_promise_rotation_invariance(name):
    x, _ = _xy()
    assert DISTANCES[name](x, x @ _rotation(x.shape[1], seed=3)) > 1e-2


def test_permutation_distance_forgives_feature_permutation_and_scale_but_not_mixing():
    x, _ = _xy()
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    assert permutation_distance(x, 2.0 * x[:, perm] + 1.0) < 1e-7
    assert procrustes_distance(x, x[:, perm]) < 1e-7  # a permutation is a rotation too
    assert permutation_distance(x, x @ _rotation(6, seed=3)) > 0.1


def test_cosine_and_angular_ignore_per_token_positive_scale_only():
    x, _ = _xy()
    scale = torch.rand(x.shape[0], 1, dtype=torch.float64) + 0.1
    assert cosine_distance(x, scale * x) < 1e-12 and angular_distance(x, scale * x) < 1e-12
    assert cosine_distance(x, -x) == pytest.approx(2.0) and angular_distance(x, -x) == pytest.approx(1.0)


def test_cosine_and_angular_closed_form():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)  # 90 and 45 degrees
    assert cosine_distance(x, y) == pytest.approx((1.0 + (1 - math.sqrt(0.5))) / 2)
    assert angular_distance(x, y) == pytest.approx((0.5 + 0.25) / 2)


def test_wasserstein_closed_form_and_what_it_ignores():
    x, y = _xy()
    assert wasserstein_distance(x, x + 0.75) == pytest.approx(0.75)  # a shift moves every value by 0.75
    assert wasserstein_distance(x + 2.0, y + 2.0) == pytest.approx(wasserstein_distance(x, y))
    # only the multiset of values matters: shuffling entries costs nothing
    flat = x.reshape(-1)
    shuffled = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))].reshape(x.shape)
    assert wasserstein_distance(x, shuffled) < 1e-12
    assert wasserstein_distance(x, 2 * x) == pytest.approx(x.abs().mean().item())


def test_procrustes_matches_scipy_orthogonal_procrustes():
    x, y = _xy()
    xc = x - x.mean(0)
    yc = y - y.mean(0)
    xc, yc = xc / xc.norm(), yc / yc.norm()
    _, nuclear = orthogonal_procrustes(yc.numpy(), xc.numpy())
    assert procrustes_distance(x, y) == pytest.approx(math.acos(nuclear), rel=1e-10)


def test_wide_representations_use_a_common_basis_without_changing_the_value():
    # features (100) > 2 x tokens (10): computed in the joint row space; compare with direct formulas
    x, y = _xy(n=10, d=100, seed=2)
    xc, yc = x - x.mean(0), y - y.mean(0)
    direct_cka = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert linear_cka(x, y) == pytest.approx(direct_cka.item(), rel=1e-10)
    xs, ys = xc / xc.norm(), yc / yc.norm()
    direct = math.acos(torch.linalg.svdvals(xs.T @ ys).sum().item())
    assert procrustes_distance(x, y) == pytest.approx(direct, rel=1e-9)


def test_unbiased_cka_is_less_inflated_than_plain_cka_on_unrelated_wide_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 200, generator=g, dtype=torch.float64)
    y = torch.randn(30, 200, generator=g, dtype=torch.float64)
    # plain linear CKA of independent data with d >> n is far from 0 similarity; the unbiased one is near 0
    assert 1 - cka_distance(x, y) > 0.5
    assert abs(1 - unbiased_cka_distance(x, y)) < 0.1


def test_bad_input_is_refused():
    x, y = _xy()
    with pytest.raises(SecateursError, match="one shape"):
        cka_distance(x, y[:, :3])
    with pytest.raises(SecateursError, match="NaN"):
        cosine_distance(x, torch.full_like(x, float("nan")))
    with pytest.raises(SecateursError, match="at least 4 tokens"):
        unbiased_cka_distance(x[:3], y[:3])
    with pytest.raises(SecateursError, match="unknown distance"):
        distances(x, y, ["cka", "euclid"])
