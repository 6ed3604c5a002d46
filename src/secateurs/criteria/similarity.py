"""Distances between two representations of the same tokens, X and Y of shape (tokens, features).

Each function answers "how much did the representation change?" with 0 for identical inputs, so
that for layer pruning a small value means "removing this layer changes little". They differ in
what they ignore, which is why Consensus combines them:

==============  ==========================================  ============================
distance        invariant to                                symmetric
==============  ==========================================  ============================
cka             rotation, isotropic scale, translation      yes
cka-unbiased    same (unbiased HSIC; less inflated when     yes
                features outnumber tokens)
cosine          per-token positive scale                    yes
angular         per-token positive scale                    yes
wasserstein     a common translation; the order of values   yes
procrustes      rotation (after centring + unit norm),      yes
                isotropic scale, translation
permutation     feature permutation (after centring +       yes
                unit norm), isotropic scale, translation
==============  ==========================================  ============================

All computations are in float64. Inputs hold only real tokens (the callers drop padding).
"""

from __future__ import annotations

import math

import torch
from scipy.linalg import svdvals
from scipy.optimize import linear_sum_assignment

from secateurs.errors import SecateursError


def _pair(x: torch.Tensor, y: torch.Tensor, min_tokens: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() != 2 or x.shape != y.shape:
        raise SecateursError(f"representations must be two (tokens, features) matrices of one shape, got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < min_tokens:
        raise SecateursError(f"this distance needs at least {min_tokens} tokens, got {x.shape[0]}")
    x, y = x.detach().double(), y.detach().double()
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise SecateursError("representations hold NaN or inf values")
    return x, y


def _centre(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(0, keepdim=True)


def _shape_normalise(x: torch.Tensor) -> torch.Tensor:
    """Centre the tokens and scale to unit Frobenius norm (the 'shape' of the point cloud)."""
    x = _centre(x)
    norm = torch.linalg.matrix_norm(x)
    return x / norm if norm > 0 else x


def _common_basis(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Express X and Y in an orthonormal basis of their joint row space when features outnumber
    2 x tokens: rotation-invariant distances are unchanged and the work scales with tokens, not
    with the hidden size (8192 for 70B models)."""
    n, d = x.shape
    if d <= 2 * n:
        return x, y
    basis, _ = torch.linalg.qr(torch.cat([x, y]).T)  # (d, 2n), orthonormal columns
    return x @ basis, y @ basis


def _angle(cos: torch.Tensor) -> torch.Tensor:
    return torch.arccos(cos.clamp(-1.0, 1.0))


# -- CKA -----------------------------------------------------------------------------------------

def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019): ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), in [0, 1]."""
    x, y = _pair(x, y, 2)
    x, y = _common_basis(_centre(x), _centre(y))
    xy = torch.linalg.matrix_norm(y.T @ x) ** 2
    xx = torch.linalg.matrix_norm(x.T @ x)
    yy = torch.linalg.matrix_norm(y.T @ y)
    if xx == 0 or yy == 0:
        return 1.0 if xx == yy else 0.0
    return float(xy / (xx * yy))


def _unbiased_hsic(k: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Song et al. (2012) unbiased HSIC estimator on Gram matrices with zeroed diagonals."""
    n = k.shape[0]
    k = k - torch.diag(torch.diag(k))
    g = g - torch.diag(torch.diag(g))
    ones = torch.ones(n, dtype=k.dtype)
    kl = k @ g
    term = torch.trace(kl) + (ones @ k @ ones) * (ones @ g @ ones) / ((n - 1) * (n - 2)) \
        - 2.0 / (n - 2) * (ones @ kl @ ones)
    return term / (n * (n - 3))


def unbiased_linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA from the unbiased HSIC estimator (Nguyen et al. 2021): plain CKA is biased towards
    1 when features outnumber tokens; this one is not. Needs at least 4 tokens; O(tokens^2) memory."""
    x, y = _pair(x, y, 4)
    k, g = x @ x.T, y @ y.T
    kl, kk, ll = _unbiased_hsic(k, g), _unbiased_hsic(k, k), _unbiased_hsic(g, g)
    if kk <= 0 or ll <= 0:
        return 1.0 if torch.equal(x, y) else 0.0
    return float(kl / torch.sqrt(kk * ll))


def cka_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - linear CKA."""
    return max(0.0, 1.0 - linear_cka(x, y))


def unbiased_cka_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - unbiased linear CKA (may go slightly below 0 or above 1: it is an unbiased estimate)."""
    return 1.0 - unbiased_linear_cka(x, y)


# -- per-token directions -----------------------------------------------------------------------

def _token_cosines(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    nx, ny = torch.linalg.vector_norm(x, dim=1), torch.linalg.vector_norm(y, dim=1)
    cos = (x * y).sum(1) / (nx * ny)
    # two zero vectors are the same point; one zero vector is as far as it gets
    both_zero = (nx == 0) & (ny == 0)
    return torch.where(both_zero, torch.ones_like(cos), torch.nan_to_num(cos, nan=0.0))


def cosine_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over tokens of 1 - cos(x_t, y_t), in [0, 2] (ShortGPT's block influence on outputs)."""
    x, y = _pair(x, y)
    return float((1.0 - _token_cosines(x, y)).mean().clamp_min(0.0))


def token_angles(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Angle between x_t and y_t for every token, as 2 atan2(|u - v|, |u + v|) of the unit vectors:
    exact near 0, where arccos(cos) loses half the digits."""
    nx, ny = torch.linalg.vector_norm(x, dim=-1, keepdim=True), torch.linalg.vector_norm(y, dim=-1, keepdim=True)
    u, v = x / nx, y / ny
    angle = 2 * torch.atan2(torch.linalg.vector_norm(u - v, dim=-1), torch.linalg.vector_norm(u + v, dim=-1))
    both_zero = (nx == 0).squeeze(-1) & (ny == 0).squeeze(-1)
    angle = torch.where(both_zero, torch.zeros_like(angle), angle)
    return torch.nan_to_num(angle, nan=math.pi / 2)  # one zero vector: orthogonal to everything


def angular_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over tokens of angle(x_t, y_t) / pi, in [0, 1] (Gromov et al. 2024): a true
    metric on directions, more sensitive than 1 - cos to small angles."""
    x, y = _pair(x, y)
    return float((token_angles(x, y) / math.pi).mean())


# -- value distributions ------------------------------------------------------------------------

def wasserstein_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """1-D Wasserstein-1 distance between the distributions of all values in X and in Y (the same
    count, so the mean absolute difference of the sorted values). Blind to where a value sits,
    it sees changes of scale and of tails that direction-based distances miss."""
    x, y = _pair(x, y)
    return float((torch.sort(x.reshape(-1)).values - torch.sort(y.reshape(-1)).values).abs().mean())


# -- aligned shape distances --------------------------------------------------------------------

def procrustes_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Angular Procrustes shape distance (Williams et al. 2021): arccos of max over rotations Q of
    <X, YQ> after centring and unit-norm scaling, in radians, [0, pi/2] for real data. The best
    rotation's score is the nuclear norm of X^T Y (what scipy's orthogonal_procrustes returns as
    its scale; its singular values alone are several times cheaper than the rotation)."""

    x, y = _pair(x, y, 2)
    x, y = _common_basis(_shape_normalise(x), _shape_normalise(y))
    nuclear = svdvals((x.T @ y).numpy()).sum()
    return float(_angle(torch.tensor(nuclear, dtype=torch.float64)))


def permutation_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Angular shape distance after the best one-to-one matching of Y's features to X's (scipy's
    linear_sum_assignment on the cross-covariance): a layer that only reorders or relabels
    features scores 0; unlike Procrustes, mixing features is not forgiven."""

    x, y = _pair(x, y, 2)
    x, y = _shape_normalise(x), _shape_normalise(y)
    cross = (x.T @ y).numpy()  # (features, features): <x_i, y_j>
    rows, cols = linear_sum_assignment(cross, maximize=True)
    return float(_angle(torch.tensor(cross[rows, cols].sum(), dtype=torch.float64)))


DISTANCES = {
    "cka": cka_distance,
    "cka-unbiased": unbiased_cka_distance,
    "cosine": cosine_distance,
    "angular": angular_distance,
    "wasserstein": wasserstein_distance,
    "procrustes": procrustes_distance,
    "permutation": permutation_distance,
}


def distances(x: torch.Tensor, y: torch.Tensor, names) -> dict[str, float]:
    """Several distances of one pair (unknown names fail before any work)."""
    unknown = [n for n in names if n not in DISTANCES]
    if unknown:
        raise SecateursError(f"unknown distance(s) {unknown}; available: {', '.join(DISTANCES)}")
    return {n: DISTANCES[n](x, y) for n in names}


__all__ = ["DISTANCES", "distances", "linear_cka", "unbiased_linear_cka", "cka_distance", "unbiased_cka_distance",
           "cosine_distance", "angular_distance", "wasserstein_distance", "procrustes_distance",
           "permutation_distance"]
