"""The γ-energy mask and the matrix-free Kronecker projector (DESIGN §2.3–2.4, §2.6).

Each method is one projector of a weight gradient G (d_out × d_in):

    ft         G                                    (plain fine-tuning, no projection)
    nullspace  G U_A diag(m_A) U_Aᵀ                 (AlphaEdit / Adam-NSCL: γ-nullspace of A alone)
    kfac       U_B ((U_Bᵀ G U_A) ⊙ M) U_Aᵀ          M from the products λ_ij = s_B[i]·s_A[j]
    ekfac      the same, λ_ij = EK-FAC corrected eigenvalues

The mask blocks the smallest set of top-curvature directions holding a share γ of the curvature
energy Σλ and keeps the rest (M_ij = 1 where λ_ij < λ_γ): γ is the protected fraction, so γ = 0
is plain fine-tuning and γ → 1 moves only along directions the capability loss cannot see.

One outlier eigenvalue can hold nearly all of a factor's energy (a massive activation: in SmolLM2's
layer 11 one input direction of the down projection holds 99.9 % of A's), and the energy rule then
blocks that direction alone. `clip` makes the rule robust to such outliers: each factor's top
`clip` share of eigenvalues counts at the value of the largest one below them (winsorized), so they
are still blocked, and γ is then the share of the energy the rest carries.

Two things keep this cheap at Llama-3-8B shapes (d_in 14336, d_out 4096: 58.7 M products a layer):

- the K-FAC threshold is found from the two eigenvalue vectors alone: with both sorted, the
  products a row blocks are a suffix of it, so the blocked energy at any τ takes one binary search
  per row; no product matrix is ever formed (`kfac_threshold`). Other eigenvalue matrices (EK-FAC)
  go through a radix select over the float64 bits, a few passes in chunks (`energy_threshold`);
- with eigenvalues in ascending order the K-FAC mask is a staircase (row i keeps columns
  0..k_i-1, k_i non-increasing), kept as its row counts k, so the projector covers the kept, or
  the blocked, entries with a few rectangles of the rotated gradient and rotates only those
  (`KroneckerProjector`): at γ 0.8 on SmolLM2 about a third of the multiply-adds of the plain
  four-matmul form.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch

from contract.settings import ALIASES as ALIASES  # re-exported: the CLI reads them here
from contract.settings import CLOSED_FORM, DEFAULTS, PROJECTOR_DTYPES, resolve_method
from contract.settings import METHODS as METHODS
from crispedit.curvature import LayerCurvature

GAMMA, CLIP = DEFAULTS.gamma, DEFAULTS.clip  # the defaults and why: contract.settings
CHUNK_ELEMENTS = 1 << 20  # λ values (8 MiB of float64) held at once by the generic search
RADIX_BITS = 16  # bits of the float64 pattern the generic search decides per pass (4 passes)
# The rectangle cover of a staircase mask: at most this many candidate column boundaries, and a
# fixed cost per rectangle (a share of the dense projection's multiply-adds) so that the cover
# does not split into slivers whose small matmuls run below the BLAS peak.
COVER_BOUNDARIES = 64
COVER_OVERHEAD = 0.01


def resolve_projector_dtype(choice: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the projector rotates gradients in: float32 (default: a bf16 rotation loses
    about 3 significant digits of the kept gradient), or the model's own dtype (`"model"`,
    half the memory and the tensor cores on a GPU)."""
    if choice not in PROJECTOR_DTYPES:
        raise ValueError(f"projector dtype must be one of {PROJECTOR_DTYPES}, not {choice!r}")
    return model_dtype if choice == "model" else torch.float32


# ---------------------------------------------------------------------------------------------
# The threshold λ_γ


def _check_gamma(gamma: float) -> None:
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], not {gamma}")


def _check_clip(clip: float) -> None:
    if not 0.0 <= clip < 1.0:
        raise ValueError(f"clip must be in [0, 1), not {clip}")


def winsorize(s: torch.Tensor, clip: float) -> torch.Tensor:
    """Ascending eigenvalues `s` with the top `clip` share (rounded down to whole values) lowered
    to the largest value below them: the energy rule's view of a factor with outliers.

    The map never lowers a value below another one, so the order, and K-FAC's staircase mask,
    survive; a winsorized value ties with the cap and is blocked whenever the cap is.
    """
    _check_clip(clip)
    n = math.floor(clip * len(s))
    if n == 0:
        return s
    return s.clamp_max(s[-n - 1])


def _bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def energy_threshold(rows: Callable[[int, int], torch.Tensor], n_rows: int, gamma: float) -> float:
    """λ_γ: the largest τ such that the eigenvalues λ ≥ τ hold at least a share γ of Σλ.

    Blocking {λ ≥ λ_γ} is then the smallest top set that reaches γ of the energy. `rows(i, j)`
    returns rows i..j of the (non-negative) eigenvalue matrix, read in chunks of about
    `CHUNK_ELEMENTS` values, so the matrix is never held whole in float64. The search is a radix
    select on the float64 bit patterns (ordered like the values for λ ≥ 0), weighted by energy:
    each pass histograms the next 16 bits of the values that share the bits decided so far, and
    the bucket where the energy counted from the top crosses γ·Σλ fixes them. Four passes find
    the threshold, a value of the matrix, with no sort; two more check it against the energy as
    summed here, and a bisection over the bit patterns settles the rare case where rounding
    moves the answer (γ = 1 with values too small to change Σλ in float64).
    """
    _check_gamma(gamma)
    if n_rows == 0:
        return math.inf
    first = rows(0, 1)
    step = max(1, CHUNK_ELEMENTS // max(1, first.numel()))
    device = first.device  # the histograms live with the values: one bincount per chunk adds there

    def chunks():
        for i in range(0, n_rows, step):
            lam = rows(i, min(i + step, n_rows)).to(torch.float64, copy=True).reshape(-1)
            # clamp: eigenvalues are ≥ 0 in theory; + 0.0 turns -0.0 (sign bit set) into +0.0
            yield lam.clamp_min_(0.0).add_(0.0)

    def blocked_energy(tau: float) -> float:
        return sum(float(lam[lam >= tau].sum()) for lam in chunks())

    energy = blocked_energy(0.0)
    if gamma == 0.0 or energy == 0.0:
        return math.inf  # block nothing
    target = gamma * energy
    buckets = 1 << RADIX_BITS
    prefix, above = 0, 0.0  # bits decided so far; energy of the values above that prefix
    for shift in range(64 - RADIX_BITS, -1, -RADIX_BITS):
        hist = torch.zeros(buckets, dtype=torch.float64, device=device)
        count = torch.zeros(buckets, dtype=torch.int64, device=device)
        for lam in chunks():
            bits = lam.view(torch.int64)
            if shift + RADIX_BITS < 64:
                keep = (bits >> (shift + RADIX_BITS)) == prefix
                bits, lam = bits[keep], lam[keep]
            digit = (bits >> shift) & (buckets - 1)
            hist += torch.bincount(digit, weights=lam, minlength=buckets)
            count += torch.bincount(digit, minlength=buckets)
        from_top = hist.flip(0).cumsum(0) + above  # energy of the digits ≥ each one, high first
        i = int(torch.searchsorted(from_top, target))
        # rounding can leave the sum a hair below the target: then the lowest occupied digit
        i = min(i, buckets - 1 - int(torch.nonzero(count).min()))
        digit = buckets - 1 - i
        above = float(from_top[i] - hist[digit])
        prefix = (prefix << RADIX_BITS) | digit
    # bisection invariant: blocked_energy(lo) ≥ target > blocked_energy(hi)
    if blocked_energy(_float(prefix)) < target:
        lo, hi = 0, prefix
    elif blocked_energy(_float(prefix + 1)) >= target:
        lam_max = max(float(lam.max()) for lam in chunks())
        lo, hi = prefix + 1, _bits(lam_max) + 1
    else:
        return _float(prefix)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if blocked_energy(_float(mid)) >= target:
            lo = mid
        else:
            hi = mid
    return _float(lo)


def _kept_counts(s_A: torch.Tensor, s_B: torch.Tensor, tau: float) -> torch.Tensor:
    """Per row i, the number k_i of columns j with s_B[i]·s_A[j] < τ (s_A ascending, float64).

    The products of two float32 values are exact in float64, and rounding is monotone, so for
    q = fl(τ / s_B[i]) every s_A[j] < q is kept and every s_A[j] > q blocked; a value equal to q
    is a float32 value whose product with s_B[i] is exact again, and decides itself.
    """
    if tau <= 0.0:
        return torch.zeros(len(s_B), dtype=torch.int64)  # every product ≥ 0 ≥ τ is blocked
    # a true division (a Python scalar over a tensor multiplies by the reciprocal, which is not
    # correctly rounded); inf where s_B = 0: the whole row (products 0) is kept
    q = torch.full_like(s_B, tau) / s_B
    lo = torch.searchsorted(s_A, q, side="left")
    hi = torch.searchsorted(s_A, q, side="right")
    return torch.where(s_B * q < tau, hi, lo)


def kfac_threshold(
    s_A: torch.Tensor, s_B: torch.Tensor, gamma: float, clip: float = CLIP
) -> tuple[float, torch.Tensor]:
    """λ_γ of the K-FAC products s_B[i]·s_A[j], and the kept count k_i of each row.

    Both eigenvalue vectors must be ascending (as `eigenbasis` returns them); then row i keeps
    columns 0..k_i-1 and blocks the rest, whose energy is s_B[i] times a suffix sum of s_A. The
    blocked energy at any τ thus costs d_out binary searches, and a bisection over the float64
    bit patterns of τ (at most 64 steps) finds the same λ_γ as `energy_threshold` over the
    materialised products, in milliseconds and O(d_in + d_out) memory at any layer size. With
    `clip`, both vectors are winsorized first (`winsorize`), and λ_γ is a product of theirs.
    """
    _check_gamma(gamma)
    s_A = s_A.detach().to("cpu", torch.float64).clamp_min(0.0)
    s_B = s_B.detach().to("cpu", torch.float64).clamp_min(0.0)
    for s in (s_A, s_B):
        if len(s) > 1 and bool((s[1:] < s[:-1]).any()):
            raise ValueError("kfac_threshold needs ascending eigenvalues (as eigh returns them)")
    s_A, s_B = winsorize(s_A, clip), winsorize(s_B, clip)
    # suffix[k] = Σ_{j ≥ k} s_A[j]; suffix[d_in] = 0
    suffix = torch.cat([s_A.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])

    def blocked(tau: float) -> tuple[float, torch.Tensor]:
        k = _kept_counts(s_A, s_B, tau)
        return float((s_B * suffix[k]).sum()), k

    energy, _ = blocked(0.0)
    if gamma == 0.0 or energy == 0.0:
        return math.inf, torch.full((len(s_B),), len(s_A), dtype=torch.int64)
    target = gamma * energy
    lo = 0  # bits of τ = 0.0: blocks everything, energy ≥ target
    hi = _bits(float(s_B[-1] * s_A[-1])) + 1  # above the largest product: blocks nothing
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if blocked(_float(mid))[0] >= target:
            lo = mid
        else:
            hi = mid
    tau = _float(lo)
    return tau, blocked(tau)[1]


# ---------------------------------------------------------------------------------------------
# The projector


@dataclass(frozen=True)
class _Block:
    """One rectangle rows r0:r1 × columns c0:c1 of the rotated gradient U_Bᵀ G U_A.

    `order` says which rotation runs first: "col" (G U_A[:, C], then U_B[:, R]ᵀ) or "row"
    (U_B[:, R]ᵀ G, then U_A[:, C]); "cols-only" / "rows-only" mark a rectangle that spans every
    row (or column) and lies entirely inside the covered set, where U_B U_Bᵀ = I (or U_A U_Aᵀ)
    cancels and one side is never rotated.
    """

    r0: int
    r1: int
    c0: int
    c1: int
    order: str


def _block_cost(nr: int, nc: int, d_out: int, d_in: int, full: bool) -> tuple[float, str]:
    """Multiply-adds of rotating one rectangle into the eigenbasis (the way back costs the same),
    and the cheaper order; the dense form costs d_out·d_in·(d_in + d_out)."""
    options = [
        (d_out * nc * (d_in + nr), "col"),
        (nr * d_in * (d_out + nc), "row"),
    ]
    if full and nr == d_out:
        options.append((d_out * d_in * nc, "cols-only"))
    if full and nc == d_in:
        options.append((nr * d_out * d_in, "rows-only"))
    return min(options)


def _staircase(M: torch.Tensor) -> torch.Tensor | None:
    """k with M[i, j] = (j < k[i]) and k non-increasing, or None when M is not of that form."""
    k = M.sum(1)
    if len(k) > 1 and bool((k[1:] > k[:-1]).any()):
        return None
    cols = torch.arange(M.shape[1], device=M.device)
    if not torch.equal(M, cols[None, :] < k[:, None]):
        return None
    return k.cpu()


def _cover(k: torch.Tensor, d_in: int, kept: bool) -> tuple[float, list[_Block]]:
    """The cheapest cover of a staircase's kept (or blocked) entries by column groups.

    A column group [a, b) of the kept set spans the rows with k_i > a (a prefix, k being
    non-increasing), of the blocked set the rows with k_i < b (a suffix). Dynamic programming over
    at most `COVER_BOUNDARIES` boundaries (the staircase's steps, thinned evenly) picks the groups
    and each rectangle's rotation order; the cost is in multiply-adds plus `COVER_OVERHEAD`.
    """
    d_out = len(k)
    dense = d_out * d_in * (d_in + d_out)
    steps = sorted({0, d_in, *k.tolist()})
    if len(steps) > COVER_BOUNDARIES:
        pick = torch.linspace(0, len(steps) - 1, COVER_BOUNDARIES).round().long().tolist()
        steps = sorted({steps[i] for i in pick})
    asc = k.flip(0).contiguous()  # k ascending, for counting rows by binary search

    def rows_above(x: int) -> int:  # rows with k_i > x
        return d_out - int(torch.searchsorted(asc, x, right=True))

    def rows_at_least(x: int) -> int:  # rows with k_i ≥ x
        return d_out - int(torch.searchsorted(asc, x, right=False))

    best: dict[int, tuple[float, list[_Block]]] = {steps[0]: (0.0, [])}
    for bi in range(1, len(steps)):
        b, options = steps[bi], []
        for a in steps[:bi]:
            if kept:  # rows 0..r1: k_i > a; the rectangle is all kept iff their min k ≥ b
                r0, r1 = 0, rows_above(a)
                full = r1 == 0 or int(k[r1 - 1]) >= b
            else:  # rows r0..d_out: k_i < b; all blocked iff their max k ≤ a
                r0, r1 = rows_at_least(b), d_out
                full = r0 == d_out or int(k[r0]) <= a
            cost, blocks = best[a]
            if r1 > r0:
                macs, order = _block_cost(r1 - r0, b - a, d_out, d_in, full)
                cost += macs / dense + COVER_OVERHEAD
                blocks = [*blocks, _Block(r0, r1, a, b, order)]
            options.append((cost, blocks))
        best[b] = min(options, key=lambda option: option[0])
    return best[d_in]


class KroneckerProjector:
    """G ↦ U_B ((U_Bᵀ G U_A) ⊙ M) U_Aᵀ without ever building the (d_in·d_out)² matrix.

    The keep-mask comes as the boolean `M` (d_out, d_in), or as `counts`, the row counts k of a
    staircase mask (row i keeps columns 0..k_i-1, as K-FAC's in ascending eigenvalue order):
    a projector keeps a staircase as its counts (d_out integers instead of d_out·d_in booleans)
    and builds each rectangle's piece of the mask when it needs it. `U_B=None` stands for the
    identity (the `nullspace` method, whose mask is one row (1, d_in) broadcast over the outputs).

    When the mask is a staircase the projection is computed from a few rectangles: either the
    kept ones, G ↦ Σ U_B[:, R] (R_□ ⊙ M_□) U_A[:, C]ᵀ, or the blocked ones,
    G ↦ G − Σ U_B[:, R] (R_□ ⊙ (1 − M_□)) U_A[:, C]ᵀ (U_A, U_B being orthogonal), whichever
    costs fewer multiply-adds (`cost`: the share of the dense form's). Any other mask, or
    `cover=False` (to measure the difference), takes the dense four-matmul form.
    """

    def __init__(
        self,
        U_A: torch.Tensor,
        U_B: torch.Tensor | None,
        M: torch.Tensor | None = None,
        cover: bool = True,
        counts: torch.Tensor | None = None,
    ):
        if (M is None) == (counts is None):
            raise ValueError("a projector takes either a keep-mask M or its staircase's counts")
        self.U_A, self.U_B = U_A, U_B
        self.d_in = U_A.shape[0]
        if counts is None:
            M = M.to(device=U_A.device, dtype=torch.bool)
            counts = _staircase(M) if cover else None
        else:
            counts = counts.cpu()
        # the row counts on the mask's device (None when the mask is no staircase), else the mask
        self.k = None if counts is None else counts.to(U_A.device, torch.int64)
        self._mask = M if counts is None else None
        self.form, self.blocks, self.cost = "dense", [], 1.0
        if counts is None or not cover:
            return
        d_in = self.d_in
        if U_B is None:  # nullspace: keep columns :k of U_A, the same per row
            k = int(counts[0])
            if k <= d_in - k:
                self.form, self.blocks = "kept", [_Block(0, 1, 0, k, "cols-only")]
            else:
                self.form, self.blocks = "blocked", [_Block(0, 1, k, d_in, "cols-only")]
            self.cost = min(k, d_in - k) / d_in
            return
        kept_cost, kept_blocks = _cover(counts, d_in, kept=True)
        blocked_cost, blocked_blocks = _cover(counts, d_in, kept=False)
        if min(kept_cost, blocked_cost) < 1.0:
            if kept_cost <= blocked_cost:
                self.form, self.blocks, self.cost = "kept", kept_blocks, kept_cost
            else:
                self.form, self.blocks, self.cost = "blocked", blocked_blocks, blocked_cost

    @property
    def M(self) -> torch.Tensor:
        """The boolean keep-mask, built from the row counts where the projector keeps those."""
        if self.k is None:
            return self._mask
        return self._mask_of(0, len(self.k), 0, self.d_in)

    def _mask_of(self, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        """Rows r0:r1 × columns c0:c1 of the keep-mask."""
        if self.k is None:
            return self._mask[r0:r1, c0:c1]
        cols = torch.arange(c0, c1, device=self.k.device)
        return cols[None, :] < self.k[r0:r1, None]

    def __call__(self, G: torch.Tensor) -> torch.Tensor:
        X = G.to(self.U_A.dtype)
        if self.form == "dense":
            M = self.M
            rot = X @ self.U_A
            if self.U_B is None:
                return ((rot * M) @ self.U_A.T).to(G.dtype)
            rot = self.U_B.T @ rot
            return (self.U_B @ (rot * M) @ self.U_A.T).to(G.dtype)
        blocked = self.form == "blocked"
        out = X.clone() if blocked else torch.zeros_like(X)
        for blk in self.blocks:
            self._add_block(out, X, blk, alpha=-1.0 if blocked else 1.0)
        return out.to(G.dtype)

    def _add_block(self, out: torch.Tensor, X: torch.Tensor, blk: _Block, alpha: float) -> None:
        """out += alpha · U_B[:, R] ((U_B[:, R]ᵀ X U_A[:, C]) ⊙ W) U_A[:, C]ᵀ, W = the rectangle's
        kept entries (alpha 1) or blocked ones (alpha -1)."""
        U_A = self.U_A[:, blk.c0 : blk.c1]
        if blk.order == "cols-only":  # every row, all covered: U_B U_Bᵀ = I
            out.addmm_(X @ U_A, U_A.T, alpha=alpha)
            return
        U_B = self.U_B[:, blk.r0 : blk.r1]
        if blk.order == "rows-only":  # every column, all covered: U_A U_Aᵀ = I
            out.addmm_(U_B, U_B.T @ X, alpha=alpha)
            return
        rot = U_B.T @ (X @ U_A) if blk.order == "col" else (U_B.T @ X) @ U_A
        mask = self._mask_of(blk.r0, blk.r1, blk.c0, blk.c1)
        if alpha > 0:
            rot.mul_(mask)
        else:
            rot.masked_fill_(mask, 0.0)  # keep the blocked entries only
        if blk.order == "col":
            out.addmm_(U_B @ rot, U_A.T, alpha=alpha)
        else:
            out.addmm_(U_B, rot @ U_A.T, alpha=alpha)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None):
        """Move the bases (in `dtype`, when given) and the mask or its counts, e.g. onto the
        worker's GPU; returns self."""
        move = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
        self.U_A, self.U_B = move(self.U_A), move(self.U_B)
        self.k = None if self.k is None else self.k.to(device)
        self._mask = None if self._mask is None else self._mask.to(device)
        return self

    @property
    def kept_fraction(self) -> float:
        """Share of the d_out·d_in directions that the projector lets through."""
        if self.k is None:
            return float(self._mask.float().mean())
        return float(self.k.sum()) / (len(self.k) * self.d_in)


def build_projector(
    curvature: LayerCurvature,
    method: str,
    gamma: float = GAMMA,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    clip: float = CLIP,
    bases: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> KroneckerProjector | None:
    """The projector of one layer for `method` at γ, on `device` in `dtype`; None for `ft`.

    `clip` winsorizes each factor's eigenvalues before the energy rule (`winsorize`; K-FAC and
    nullspace, whose eigenvalues come per factor). The eigendecompositions run on `device`
    once per factor value and are kept by `curvature` on the host (`LayerCurvature.eigen`);
    EK-FAC's bases come with the curvature: it needs no `eigh`. The projector holds the only
    copies on `device` of what it needs (bases, mask or counts): once it is built, `curvature`
    moves whatever it still had there to the host (`LayerCurvature.to_host`), so a worker's GPU
    holds a curvature only while a job projects with it.

    `bases`, the (U_A, U_B) of a projector already built from the same curvature for the same
    method (U_B None for nullspace), are shared rather than copied to `device` again: a projector
    at another γ differs only in its mask (the editor's drift budget raises γ mid-edit).
    """
    method = resolve_method(method)
    _check_gamma(gamma)
    _check_clip(clip)
    if method == "ft":
        return None
    if method in CLOSED_FORM:
        raise ValueError(f"method {method!r} solves its update in closed form: no projector")
    if method == "ekfac" and clip > 0.0:
        raise ValueError("clip applies to 'kfac' and 'nullspace', not to 'ekfac'")
    if method == "ekfac" and curvature.ekfac is None:
        raise ValueError("method 'ekfac' needs curvature built with --kind ekfac")
    # with shared bases only the eigenvalues are needed: the host's kept copies are read there
    where = device if bases is None else "cpu"
    if method == "nullspace":
        s_A, U_A = curvature.eigen("A", device, to=where)
        lam_A = winsorize(s_A.double().clamp_min(0.0), clip).unsqueeze(0)
        tau = energy_threshold(lambda i, j: lam_A[i:j], 1, gamma)
        counts = (lam_A < tau).sum(1).cpu()  # ascending: the kept columns are a prefix
        U_A, U_B = (U_A.to(device, dtype), None) if bases is None else bases
        P = KroneckerProjector(U_A, U_B, counts=counts)
    elif method == "kfac":
        s_A, U_A = curvature.eigen("A", device, to=where)
        s_B, U_B = curvature.eigen("B", device, to=where)
        _, k = kfac_threshold(s_A, s_B, gamma, clip)  # row i keeps its k_i smallest products
        if bases is None:
            bases = (U_A.to(device, dtype), U_B.to(device, dtype))
        P = KroneckerProjector(*bases, counts=k)
    else:
        lam = curvature.ekfac.to(device)  # float32; the search reads it in float64 chunks
        tau = energy_threshold(lambda i, j: lam[i:j], lam.shape[0], gamma)
        if bases is None:
            bases = (curvature.U_A.to(device, dtype), curvature.U_B.to(device, dtype))
        P = KroneckerProjector(*bases, _chunked_below(lam, tau))
    curvature.to_host()
    return P


def _chunked_below(lam: torch.Tensor, tau: float) -> torch.Tensor:
    """lam < τ compared in float64, a chunk of rows at a time (no float64 copy of lam)."""
    step = max(1, CHUNK_ELEMENTS // max(1, lam.shape[1]))
    return torch.cat([lam[i : i + step].double() < tau for i in range(0, lam.shape[0], step)])
