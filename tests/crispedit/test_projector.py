"""The γ-energy mask and the matrix-free projector against their dense definitions."""

from __future__ import annotations

import math

import pytest
import torch

from crispedit import projector
from crispedit.curvature import LayerCurvature, eigenbasis
from crispedit.projector import (
    KroneckerProjector,
    build_projector,
    energy_threshold,
    kfac_threshold,
    resolve_method,
    resolve_projector_dtype,
    winsorize,
)

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


# ---------------------------------------------------------------------------------------------
# The rule robust to outlier eigenvalues (clip)


def test_winsorize_caps_the_top_share_at_the_value_below_it():
    s = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 50.0, 900.0], dtype=torch.float64)
    assert torch.equal(winsorize(s, 0.0), s)
    assert torch.equal(winsorize(s, 0.1), s)  # 0.7 of a value rounds down to none
    assert winsorize(s, 0.2).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 50.0, 50.0]
    assert winsorize(s, 0.3).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 4.0, 4.0]
    for clip in (-0.1, 1.0):
        with pytest.raises(ValueError, match="clip"):
            winsorize(s, clip)


def outlier_curvature(d_in: int = 20, d_out: int = D_OUT) -> LayerCurvature:
    """A whose top eigenvalue holds 99.8 % of its trace (a massive activation), B spread."""
    s_A = torch.linspace(1.0, 2.0, d_in, dtype=torch.float64)
    s_A[-1] = 0.998 / 0.002 * float(s_A[:-1].sum())
    U_A = random_orthogonal(d_in, 7).double()
    return LayerCurvature(A=(U_A * s_A) @ U_A.T, B=spd(d_out, 2).double())


def test_clip_blocks_more_than_the_outlier_direction():
    """Plain energy rule: the outlier direction alone reaches γ, so every other input direction
    is kept; with clip what it blocked stays blocked, along with the most curved of the others."""
    c = outlier_curvature()
    plain = build_projector(c, "kfac", 0.9).M
    clipped = build_projector(c, "kfac", 0.9, clip=0.05).M
    assert plain[:, :-1].all() and not plain[:, -1].all()  # ascending: the outlier is last
    assert (~clipped).sum() > 3 * (~plain).sum()
    assert not (clipped & ~plain).any()  # what the plain rule blocks stays blocked


@pytest.mark.parametrize("clip", (0.05, 0.1, 0.3))
@pytest.mark.parametrize("gamma", (0.5, 0.9, 0.99))
def test_clipped_masks_are_the_energy_rule_on_winsorized_eigenvalues(clip, gamma):
    c = outlier_curvature()
    s_A, _ = eigenbasis(c.A)
    s_B, _ = eigenbasis(c.B)
    s_A, s_B = winsorize(s_A.double(), clip), winsorize(s_B.double(), clip)
    lam = s_B[:, None] * s_A[None, :]
    tau = energy_threshold(lambda i, j: lam[i:j], len(lam), gamma)
    assert torch.equal(build_projector(c, "kfac", gamma, clip=clip).M, lam < tau)
    lam_A = s_A.unsqueeze(0)
    tau_A = energy_threshold(lambda i, j: lam_A[i:j], 1, gamma)
    assert torch.equal(build_projector(c, "nullspace", gamma, clip=clip).M, lam_A < tau_A)


def test_clip_errors(curvature):
    with pytest.raises(ValueError, match="clip"):
        build_projector(curvature, "kfac", 0.9, clip=1.0)
    with pytest.raises(ValueError, match="not to 'ekfac'"):
        build_projector(curvature, "ekfac", 0.9, clip=0.1)
    assert build_projector(curvature, "ekfac", 0.9, clip=0.0) is not None


# ---------------------------------------------------------------------------------------------
# The fast paths: separable K-FAC threshold, radix select, rectangle cover, resident bases


def spectrum(d: int, seed: int, zeros: int = 0, ties: int = 0) -> torch.Tensor:
    """Ascending float32 eigenvalues with a heavy tail, `zeros` exact zeros and `ties` repeats."""
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(d, generator=g) ** 6 * 10
    s[:zeros] = 0
    if ties:
        s[-ties:] = s[-ties - 1]
    return s.sort().values


@pytest.mark.parametrize("gamma", (0.0, 0.2, 0.5, 0.8, 0.9, 0.99, 0.999, 1.0))
@pytest.mark.parametrize("seed", range(3))
def test_kfac_threshold_equals_the_search_over_all_products(gamma, seed):
    s_A = spectrum(61, seed, zeros=4, ties=5)
    s_B = spectrum(23, 100 + seed, zeros=2, ties=3)
    lam = s_B.double()[:, None] * s_A.double()[None, :]
    tau, k = kfac_threshold(s_A, s_B, gamma)
    cols = torch.arange(len(s_A))
    assert torch.equal(cols[None, :] < k[:, None], lam < tau)  # the counts are the mask
    total, rel = lam.sum(), 1e-12
    if gamma == 0.0:
        assert tau == math.inf
        return
    # the smallest top set reaching γ, up to the float64 rounding of the energy sums (the two
    # searches add the products in different orders: near-equal partial sums may tip apart)
    assert lam[lam >= tau].sum() >= gamma * total * (1 - rel)
    assert lam[lam > tau].sum() < gamma * total * (1 + rel)
    generic = energy_threshold(lambda i, j: lam[i:j], lam.shape[0], gamma)
    if tau != generic:
        assert abs(lam[lam >= tau].sum() - lam[lam >= generic].sum()) <= rel * total


def test_kept_counts_are_exact_at_every_product():
    """At τ equal to any product (where rounding would bite) the counts give exactly λ < τ."""
    s_A = spectrum(61, 7, zeros=4, ties=5)
    s_B = spectrum(23, 8, zeros=2, ties=3)
    lam = s_B.double()[:, None] * s_A.double()[None, :]
    cols = torch.arange(len(s_A))
    for tau in lam.flatten().unique().tolist():
        k = projector._kept_counts(s_A.double(), s_B.double(), tau)
        assert torch.equal(cols[None, :] < k[:, None], lam < tau)


def test_kfac_threshold_needs_ascending_eigenvalues():
    with pytest.raises(ValueError, match="ascending"):
        kfac_threshold(torch.tensor([2.0, 1.0]), torch.tensor([1.0]), 0.5)


@pytest.mark.parametrize("gamma", (0.1, 0.5, 0.9, 0.99, 1.0))
def test_radix_threshold_over_many_chunks_matches_a_full_sort(monkeypatch, gamma):
    """Ties, zeros and values far apart in magnitude, read 100 values at a time."""
    monkeypatch.setattr(projector, "CHUNK_ELEMENTS", 100)
    g = torch.Generator().manual_seed(1)
    lam = (torch.rand(37, 29, dtype=torch.float64, generator=g) ** 8).float().double()
    lam[::3, ::2] = 0.0
    lam[5] = lam[4]  # ties
    tau = energy_threshold(lambda i, j: lam[i:j], lam.shape[0], gamma)
    desc = lam.flatten().sort(descending=True).values
    k = int((desc.cumsum(0) < gamma * lam.sum()).sum()) + 1
    if gamma < 1.0:  # γ = 1: the last values cannot change the float64 sum; see the test above
        assert tau == desc[k - 1]
    assert lam[lam >= tau].sum() >= gamma * lam.sum() * (1 - 1e-12)


def explicit(P: KroneckerProjector, G: torch.Tensor) -> torch.Tensor:
    """U_B ((U_Bᵀ G U_A) ⊙ M) U_Aᵀ in float64, the definition the fast forms must equal."""
    U_A, M = P.U_A.double(), P.M.double()
    if P.U_B is None:
        return (G.double() @ U_A * M) @ U_A.T
    U_B = P.U_B.double()
    return U_B @ ((U_B.T @ G.double() @ U_A) * M) @ U_A.T


def test_rectangle_cover_equals_the_definition_at_every_gamma():
    """A layer large enough for multi-rectangle covers, in both the kept and the blocked form."""
    d_in, d_out = 96, 40
    c = LayerCurvature(A=spd(d_in, 31, rank=400), B=spd(d_out, 32, rank=400))
    G = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(0))
    forms = set()
    for gamma in (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0):
        for method in ("kfac", "nullspace"):
            P = build_projector(c, method, gamma)
            forms.add((method, P.form))
            torch.testing.assert_close(P(G).double(), explicit(P, G), atol=2e-5, rtol=1e-5)
            assert P.cost <= 1.0
    assert {("kfac", "kept"), ("kfac", "blocked")} <= forms
    assert {("nullspace", "kept"), ("nullspace", "blocked")} <= forms


def test_a_mask_without_staircase_takes_the_dense_form(curvature):
    P = build_projector(curvature, "ekfac", 0.7)
    assert P.form == "dense" and P.cost == 1.0
    G = torch.randn(D_OUT, D_IN)
    torch.testing.assert_close(P(G).double(), explicit(P, G), atol=1e-5, rtol=1e-5)


def test_eigenbases_are_computed_once_per_factor_value(curvature):
    """A resident curvature gives every job the same bases; a changed factor new ones."""
    first = build_projector(curvature, "kfac", 0.8)
    again = build_projector(curvature, "kfac", 0.9)
    assert again.U_A is first.U_A and again.U_B is first.U_B
    curvature.A.mul_(2.0)  # in place: the version counter moves
    scaled = build_projector(curvature, "kfac", 0.8)
    assert scaled.U_A is not first.U_A
    torch.testing.assert_close(scaled.U_A.abs(), first.U_A.abs(), atol=1e-5, rtol=1e-5)
    curvature.B = curvature.B * 3.0  # a new tensor
    assert build_projector(curvature, "kfac", 0.8).U_B is not first.U_B
    curvature.A = None  # dropped after its eigenbasis: the eigenbasis serves on
    assert build_projector(curvature, "kfac", 0.8).U_A is scaled.U_A
    with pytest.raises(ValueError, match="dropped before its eigenbasis"):
        build_projector(LayerCurvature(A=None, B=curvature.B), "kfac", 0.8)


def test_projector_dtype_and_device(curvature):
    P = build_projector(curvature, "kfac", 0.8, device="cpu", dtype=torch.float64)
    assert P.U_A.dtype == P.U_B.dtype == torch.float64 and P.M.dtype == torch.bool
    G = torch.randn(D_OUT, D_IN, dtype=torch.bfloat16)
    assert P(G).dtype == torch.bfloat16  # projected in float64, handed back in G's dtype
    assert resolve_projector_dtype("float32", torch.bfloat16) == torch.float32
    assert resolve_projector_dtype("model", torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="projector dtype"):
        resolve_projector_dtype("fp8", torch.float32)


def test_a_staircase_mask_is_kept_as_its_row_counts():
    """K-FAC's mask lives in a projector as d_out counts, not d_out·d_in booleans; the projector
    from the explicit mask finds the same counts and cover, and projects bitwise the same."""
    d_in, d_out = 96, 40
    c = LayerCurvature(A=spd(d_in, 31, rank=400), B=spd(d_out, 32, rank=400))
    G = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(0))
    for gamma in (0.3, 0.8, 0.99):
        P = build_projector(c, "kfac", gamma)
        assert P._mask is None and P.k.shape == (d_out,) and P.k.dtype == torch.int64
        from_mask = KroneckerProjector(P.U_A, P.U_B, P.M)
        assert from_mask._mask is None and torch.equal(from_mask.k, P.k)
        assert from_mask.blocks == P.blocks and torch.equal(from_mask(G), P(G))
        assert P.kept_fraction == float(P.M.double().mean())
        dense = KroneckerProjector(P.U_A, P.U_B, counts=P.k, cover=False)
        assert dense.form == "dense"
        torch.testing.assert_close(dense(G).double(), explicit(P, G), atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="either"):
        KroneckerProjector(P.U_A, P.U_B)
    with pytest.raises(ValueError, match="either"):
        KroneckerProjector(P.U_A, P.U_B, P.M, counts=P.k)
