"""The K-FAC Laplace form: the quadratic model of the capability loss around the weights before
an edit (Ritter et al. 2018, "Online Structured Laplace Approximations for Overcoming
Catastrophic Forgetting").

For a layer whose capability curvature is B ⊗ A (crispedit.curvature: the Gauss–Newton matrix of
the mean token loss), a change ΔW (d_out × d_in) of its weight raises that loss by about

    q(ΔW) = ½ vec(ΔW)ᵀ (B ⊗ A) vec(ΔW) = ½ tr(ΔWᵀ B ΔW A),        ∇q = B ΔW A

nats per token. In the factors' eigenbases (A = U_A diag(s_A) U_Aᵀ, B likewise) both are
elementwise: with R = U_Bᵀ ΔW U_A and Λ_ij = s_B[i]·s_A[j] (EK-FAC: its corrected eigenvalues
in its bases), q = ½ Σ Λ ⊙ R² and ∇q = U_B (Λ ⊙ R) U_Aᵀ: four matrix products, the projector's
bases and eigenvalues, no eigendecomposition of their own.

The editor uses q twice (crispedit.editor): `laplace · Σ q` over the edited layers joins the
facts' loss, its gradient added to each fp32 master's before projection, and Σ q of the finished
delta is the report's `predicted_loss_increase`. A stream's curvature holds its earlier edits'
factors too (crispedit.sequential), so there q also predicts what the edit costs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crispedit.curvature import LayerCurvature


@dataclass
class LaplaceForm:
    """One layer's q: the eigenbases, on the device the form is computed on (the masters'), and
    the eigenvalues, the K-FAC pair (s_A, s_B) or EK-FAC's matrix `lam`, wherever they are kept
    (moved there per use: a form that only reports need not hold them on the device)."""

    U_A: torch.Tensor  # (d_in, d_in)
    U_B: torch.Tensor  # (d_out, d_out)
    s_A: torch.Tensor | None = None  # (d_in,) ascending
    s_B: torch.Tensor | None = None  # (d_out,)
    lam: torch.Tensor | None = None  # (d_out, d_in) EK-FAC eigenvalues, instead of s_A, s_B

    def __call__(
        self, delta: torch.Tensor, gradient: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(q(ΔW), ∇q) of `delta`, a (d_out, d_in) weight change, computed in fp32 on the bases'
        device: q a 0-dim tensor, ∇q (d_out, d_in) (None when not asked for)."""
        device = self.U_A.device
        U_A, U_B = self.U_A.float(), self.U_B.float()
        R = U_B.T @ (delta.to(device, torch.float32) @ U_A)
        if self.lam is not None:
            scaled = R * self.lam.to(device, torch.float32)
        else:
            scaled = R * self.s_A.to(device, torch.float32)
            scaled.mul_(self.s_B.to(device, torch.float32)[:, None])
        value = 0.5 * (R * scaled).sum()
        del R
        return value, (U_B @ scaled @ U_A.T if gradient else None)


def layer_form(
    curvature: LayerCurvature,
    kind: str,
    device: torch.device | str,
    place: torch.device | str,
    bases: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LaplaceForm:
    """The LaplaceForm of one layer's curvature: EK-FAC's eigenvalues for `kind` "ekfac", else
    the K-FAC products. `bases`, the (U_A, U_B) a projector already holds, are shared rather
    than copied (a bf16 pair is read cast to fp32); otherwise the form's own fp32 copies of the
    kept eigenbases go to `place`, where its eigenvalues also stay. A factor not yet decomposed
    is decomposed on `device` (the model's), once, and kept as the projector's are
    (`LayerCurvature.eigen`). ValueError for "ekfac" on a curvature without EK-FAC
    eigenvalues."""
    if kind == "ekfac":
        if curvature.ekfac is None:
            raise ValueError("an EK-FAC Laplace form needs curvature built with --kind ekfac")
        if bases is None:
            bases = (curvature.U_A.to(place, torch.float32), curvature.U_B.to(place, torch.float32))
        return LaplaceForm(*bases, lam=curvature.ekfac.to(place))
    # with shared bases, only the eigenvalues are needed: read from the host's kept copies
    where = place if bases is None else "cpu"
    (s_A, U_A), (s_B, U_B) = (curvature.eigen(w, device, to=where) for w in ("A", "B"))
    if bases is None:
        bases = (U_A.float(), U_B.float())
    del U_A, U_B
    return LaplaceForm(*bases, s_A=s_A.to(place), s_B=s_B.to(place))
