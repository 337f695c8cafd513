"""The γ-energy mask and the matrix-free projector against their dense definitions."""

from __future__ import annotations

import pytest
import torch

from crispedit.curvature import LayerCurvature, eigenbasis
from crispedit.projector import build_projector, energy_threshold, resolve_method

D_IN, D_OUT = 7, 5
GAMMAS = (0.3, 0.5, 0.7, 0.9, 0.99)


def spd(d: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(rank or 3 * d, d, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, d)
    return (X.T @ X / len(X)).float()


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    return q


@pytest.fixture
def curvature() -> LayerCurvature:
    c = LayerCurvature(A=spd(D_IN, 1), B=spd(D_OUT, 2))
    c.U_A, c.U_B = random_orthogonal(D_IN, 3), random_orthogonal(D_OUT, 4)
    c.ekfac = torch.rand(D_OUT, D_IN, generator=torch.Generator().manual_seed(5)) ** 3
    return c


def eigen_products(c: LayerCurvature) -> torch.Tensor:
    s_A, _ = eigenbasis(c.A)
    s_B, _ = eigenbasis(c.B)
    return s_B.double()[:, None] * s_A.double()[None, :]


def dense(P) -> torch.Tensor:
    """The explicit (d_out·d_in)² projector (U_B⊗U_A) diag(vec M) (U_B⊗U_A)ᵀ, row-major vec."""
    U_B = torch.eye(D_OUT) if P.U_B is None else P.U_B  # nullspace: identity on the outputs
    K = torch.kron(U_B.double().contiguous(), P.U_A.double().contiguous())
    M = P.M.expand(D_OUT, D_IN).reshape(-1).double()
    return K @ torch.diag(M) @ K.T


@pytest.mark.parametrize("method", ["nullspace", "kfac", "ekfac"])
@pytest.mark.parametrize("gamma", GAMMAS)
def test_equals_dense_projection_and_is_idempotent(curvature, method, gamma):
    P = build_projector(curvature, method, gamma)
    G = torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(7))
    expected = (dense(P) @ G.double().reshape(-1)).reshape(D_OUT, D_IN)
    torch.testing.assert_close(P(G).double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(P(P(G)), P(G), atol=1e-5, rtol=1e-5)
    assert 0 < P.kept_fraction < 1


@pytest.mark.parametrize("method", ["nullspace", "kfac", "ekfac"])
def test_gamma_zero_is_identity(curvature, method):
    P = build_projector(curvature, method, 0.0)
    G = torch.randn(D_OUT, D_IN)
    torch.testing.assert_close(P(G), G, atol=1e-5, rtol=1e-5)
    assert P.kept_fraction == 1.0
    assert build_projector(curvature, "ft", 0.9) is None


@pytest.mark.parametrize("gamma", GAMMAS)
def test_blocked_energy_reaches_gamma_with_the_fewest_directions(curvature, gamma):
    for method, lam in (("kfac", eigen_products(curvature)), ("ekfac", curvature.ekfac.double())):
        P = build_projector(curvature, method, gamma)
        blocked = P.M == 0
        share = lam[blocked].sum() / lam.sum()
        assert share >= gamma
        # minimal: the top-k eigenvalues by a full sort need exactly as many directions
        desc = lam.flatten().sort(descending=True).values
        k = int((desc.cumsum(0) < gamma * lam.sum()).sum()) + 1
        assert int(blocked.sum()) == k
        assert set(lam[blocked].tolist()) == set(desc[:k].tolist())


def test_threshold_is_exact_on_a_large_matrix():
    lam = torch.rand(300, 257, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) ** 4
    for gamma in (0.1, 0.5, 0.95, 1.0):
        tau = energy_threshold(lambda i, j: lam[i:j], lam.shape[0], gamma)
        assert lam[lam >= tau].sum() >= gamma * lam.sum()
        # any larger threshold blocks too little
        above = lam[lam > tau]
        assert above.sum() < gamma * lam.sum()


def test_gamma_one_keeps_only_zero_curvature():
    c = LayerCurvature(A=spd(D_IN, 1, rank=3), B=spd(D_OUT, 2))
    P = build_projector(c, "kfac", 1.0)
    lam = eigen_products(c)
    assert torch.equal(P.M.bool(), lam == 0)


@pytest.mark.parametrize("gamma", (0.5, 0.9, 0.99, 0.999))
def test_proposition_1_nullspace_of_A_is_kept_by_kfac(gamma):
    """With fewer tokens than d_in, A is singular; every direction in its exact nullspace has
    zero K-FAC curvature, so kfac keeps it at any γ < 1."""
    d_in, n_tokens = 12, 5
    X = torch.randn(n_tokens, d_in, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = LayerCurvature(A=(X.T @ X / n_tokens).float(), B=spd(D_OUT, 2))
    null = torch.linalg.svd(X).Vh[n_tokens:].T.float()  # (d_in, d_in - n) basis of null(A)
    G = torch.randn(D_OUT, d_in - n_tokens, generator=torch.Generator().manual_seed(1)) @ null.T
    P = build_projector(c, "kfac", gamma)
    torch.testing.assert_close(P(G), G, atol=1e-4, rtol=1e-4)
    row_space = torch.randn(D_OUT, n_tokens, dtype=torch.float64) @ X
    assert (P(row_space.float()) - row_space.float()).norm() > 1e-3 * row_space.norm()


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("seed", range(3))
def test_kfac_keeps_at_least_as_much_as_nullspace(gamma, seed):
    c = LayerCurvature(A=spd(D_IN, 10 + seed), B=spd(D_OUT, 20 + seed))
    kfac = build_projector(c, "kfac", gamma)
    nullspace = build_projector(c, "nullspace", gamma)
    assert kfac.M.sum() >= D_OUT * nullspace.M.sum()


def test_methods_and_errors(curvature):
    assert resolve_method("crispedit") == "kfac"
    with pytest.raises(ValueError, match="unknown method"):
        resolve_method("rome")
    with pytest.raises(ValueError, match="gamma"):
        build_projector(curvature, "kfac", 1.5)
    with pytest.raises(ValueError, match="ekfac"):
        build_projector(LayerCurvature(A=curvature.A, B=curvature.B), "ekfac", 0.9)
