"""AlphaEdit (Fang et al. 2025, "AlphaEdit: Null-Space Constrained Knowledge Editing for Language
Models"): MEMIT's targets and spread, with each layer's update kept in the null space of the
preserved keys.

The preserved keys K_0 are what the K-FAC factor A = E[k kᵀ] summarises (crispedit.curvature):
their null space is spanned by the eigenvectors of A whose eigenvalues are below
`null_threshold`, and P = Û Ûᵀ projects onto it. With the current edits' keys K_1, residuals R,
and the keys K_p of the edits made before on the same stream (their Gram matrix K_p K_pᵀ), the
update is the paper's eq. 15 with its L2 weight α:

    Δ = R K_1ᵀ P (K_p K_pᵀ P + K_1 K_1ᵀ P + α I)⁻¹

For any k with P k = 0 (a preserved key), (K K ᵀ P + α I) k = α k, so Δ k = R K_1ᵀ P k / α = 0:
the layer's output on the preserved keys does not change at all, which is the method's point.
K_p K_pᵀ here is the stream's edit-set sum Σ a aᵀ of its earlier edits (crispedit.sequential):
the keys of every token of their `prompt target` texts, the subject's last token among them.
"""

from __future__ import annotations

from typing import Any

import torch

from contract.facts import Fact
from contract.settings import DEFAULTS
from crispedit.memit import MemitEditor

NULL_THRESHOLD, L2 = DEFAULTS.null_threshold, DEFAULTS.alphaedit_l2  # contract.settings


def null_space_projector(
    eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, threshold: float
) -> torch.Tensor:
    """P = Û Ûᵀ (float64) over the eigenvectors whose eigenvalue is below `threshold`."""
    U = eigenvectors[:, eigenvalues < threshold].double()
    return U @ U.T


def alphaedit_solve(
    K: torch.Tensor,
    R: torch.Tensor,
    P: torch.Tensor,
    previous: torch.Tensor | None = None,
    l2: float = L2,
) -> torch.Tensor:
    """AlphaEdit's update (module doc) for keys K (d_in × n), residuals R (d_out × n), the null-
    space projector P and the earlier edits' K_p K_pᵀ (`previous`, d_in × d_in, or None). Solved
    in float64 on K's device; returns (d_out × d_in) float32."""
    K, R = K.double(), R.double()
    P = P.to(K.device, torch.float64)
    # built in place: besides P, the solve holds M, its product with P and the LU factor (d_in ×
    # d_in float64 each) and never a second copy of the earlier keys' Gram matrix
    M = K @ K.T
    if previous is not None:
        M += previous.to(K.device)  # a host copy crosses once; an fp32 one adds in float64
    M = M @ P
    M.diagonal().add_(l2)
    # Δ M = R K_1ᵀ P, a right-hand solve; float64: rounded to bf16, Δ leaks onto the preserved
    # keys (tests/crispedit/test_memit_device.py)
    return torch.linalg.solve(M, R @ (K.T @ P), left=False).float()


class AlphaEditor(MemitEditor):
    """AlphaEdit on a resident model: `MemitEditor` with the null-space solve (module doc).

    `previous`, per edited layer, the Gram matrix K_p K_pᵀ of the keys of the edits made before
    on the stream (a stream's `StreamState.S_A`); None for an edit from the base. The options
    `null_threshold` and `alphaedit_l2` (contract.settings) set the null space and α.
    """

    method = "alphaedit"

    def __init__(self, *args: Any, previous: dict[str, torch.Tensor] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.previous = previous or {}
        self.kept_fraction: dict[str, float] = {}

    def _solve(self, name: str, K: torch.Tensor, R: torch.Tensor, facts: list[Fact]):
        # the eigenbasis on the model's device only as long as P is being built
        eigen = self.curvature.layers[name].eigen("A", K.device)
        P = null_space_projector(*eigen, self.settings.null_threshold)
        del eigen
        self.kept_fraction[name] = float(P.trace()) / len(P)
        return alphaedit_solve(K, R, P, self.previous.get(name), self.settings.alphaedit_l2)

    def _solve_options(self) -> dict:
        return {
            "null_threshold": self.settings.null_threshold,
            "alphaedit_l2": self.settings.alphaedit_l2,
            "previous_edits": bool(self.previous),
        }
