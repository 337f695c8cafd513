"""A warm start (issue 23's speed lever, `warm_start="lstsq"`): one closed-form least-squares move
of the edited layers, under the same projection, before Adam's epochs begin.

Adam starts an edit at the base weights with steps of about lr per weight, so most of an edit's
epochs walk a long way in small steps. The start jumps most of that way at once. For one edited
layer y = W k, let G = Σ_t g_t k_tᵀ be the gradient of the edit's loss (g_t = ∂L/∂y_t at token t)
and S̄ = (1/n) Σ_t k_t k_tᵀ the mean Gram matrix of the layer's inputs over the n tokens of the
edit's `prompt target` texts. The step D asks every key's output to move against its own gradient
(D k_t ≈ -g_t, the least-squares view MEMIT takes of a layer), kept in the projector's subspace
and held back, like MEMIT's solve, by the capability's own keys (their factor A):

    D = argmin over D = P(D) of  ½ tr(D H Dᵀ) + tr(Gᵀ D),     H = S̄ + ρ·A + λ·I

so D = -G H⁻¹ restricted to the kept subspace. P keeps the entries M of the rotated matrix
U_Bᵀ D U_A (crispedit.projector), so in rotated coordinates X = U_Bᵀ D U_A the problem is
X ⊙ M ↦ (X H̃) ⊙ M with H̃ = U_Aᵀ H U_A: conjugate gradients on that operator (positive definite
on the kept entries) reach the solution with one d_out × d_in × d_in product an iteration, for
any mask (K-FAC's staircase, EK-FAC's, the nullspace's columns, or none for `ft`).

The step's length is the one thing the quadratic model cannot give (the loss is far from
quadratic over the distances an edit moves), so the editor tries α·D for α = 1, 2, 4, ... (or
1/2, 1/4, ... when α = 1 already raises the loss) on the edit's own objective, the facts' loss
plus the anchors' KL, and keeps the best; Adam then goes on from W + α·D. An α that lowers
nothing leaves the weights where they were.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from crispedit.projector import KroneckerProjector

# ρ: the capability keys' mean Gram matrix A weighs like the edit's own S̄ (both are means over
# tokens): the step avoids directions the capability text uses about as much as the edit needs them
CAPABILITY_WEIGHT = 1.0
# λ, a share of H's mean diagonal: bounds H̃'s condition number, hence the CG iterations
RIDGE = 1e-2
CG_ITERATIONS = 50
CG_TOLERANCE = 1e-3  # relative residual ‖r‖/‖b‖ at which CG stops
SEARCH_STEPS = 12  # step lengths tried at most, doubling or halving from 1


def step_direction(
    G: torch.Tensor,
    keys: torch.Tensor,
    projector: KroneckerProjector | None,
    A: torch.Tensor | None,
    capability_weight: float = CAPABILITY_WEIGHT,
    ridge: float = RIDGE,
    iterations: int = CG_ITERATIONS,
    tolerance: float = CG_TOLERANCE,
) -> tuple[torch.Tensor, dict]:
    """The start's direction D for one layer (module doc), in fp32 on G's device: `G` the loss
    gradient (d_out, d_in), `keys` the layer's inputs over the edit's tokens (n, d_in, any dtype
    and device), `projector` the layer's (None: no projection) and `A` its capability factor
    (d_in, d_in; None: no capability term). Returns D, in the kept subspace, and the solve's
    figures: CG iterations and the relative residual reached."""
    device = G.device
    G = G.float()
    keys = keys.to(device, torch.float32)
    H = keys.T @ keys / max(1, len(keys))
    if A is not None and capability_weight:
        H.add_(A.to(device, torch.float32), alpha=capability_weight)
    H.diagonal().add_(ridge * float(H.diagonal().mean()) + torch.finfo(torch.float32).tiny)
    U_A = U_B = None
    mask = torch.ones((1, G.shape[1]), dtype=torch.bool, device=device)
    if projector is not None:
        U_A = projector.U_A.to(device, torch.float32)
        U_B = None if projector.U_B is None else projector.U_B.to(device, torch.float32)
        mask = projector.M.to(device)
        H = U_A.T @ H @ U_A
    rotated = G if U_A is None else G @ U_A
    if U_B is not None:
        rotated = U_B.T @ rotated
    b = -(rotated * mask)
    del rotated
    X, figures = _conjugate_gradients(lambda V: (V @ H) * mask, b, iterations, tolerance)
    if U_A is not None:
        X = X @ U_A.T
    if U_B is not None:
        X = U_B @ X
    return X, figures


def _conjugate_gradients(
    operator: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    iterations: int,
    tolerance: float,
) -> tuple[torch.Tensor, dict]:
    """X with operator(X) ≈ b by conjugate gradients from X = 0 (the operator symmetric positive
    definite on the span of b's iterates), matrices under the Frobenius inner product."""
    X = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = float((r * r).sum())
    goal = tolerance**2 * rr
    done = 0
    while rr > goal and done < iterations:
        Ap = operator(p)
        step = rr / float((p * Ap).sum())
        X.add_(p, alpha=step)
        r.sub_(Ap, alpha=step)
        rr, previous = float((r * r).sum()), rr
        p.mul_(rr / previous).add_(r)
        done += 1
    residual = (rr / (float((b * b).sum()) or 1.0)) ** 0.5
    return X, {"iterations": done, "residual": residual}


def search_length(loss_at: Callable[[float], float], steps: int = SEARCH_STEPS) -> dict:
    """The step length α among 1, 2, 4, ... (while the loss falls) or 1/2, 1/4, ... (while it
    does not fall below the loss at 0) with the lowest `loss_at(α)`, at most `steps` tries after
    α = 0; α = 0 when none is lower. Returns alpha, loss_before, loss_after and every [α, loss]
    tried."""
    before = loss_at(0.0)
    tried = [[1.0, loss_at(1.0)]]
    factor = 2.0 if tried[0][1] < before else 0.5
    while len(tried) < steps:
        alpha = tried[-1][0] * factor
        tried.append([alpha, loss_at(alpha)])
        if factor > 1 and tried[-1][1] >= tried[-2][1]:
            break  # past the lowest point along D
        if factor < 1 and tried[-1][1] < before:
            break  # the longest step that lowers the loss
    alpha, after = min(tried, key=lambda t: t[1])
    if after >= before:
        alpha, after = 0.0, before
    return {"alpha": alpha, "loss_before": before, "loss_after": after, "tried": tried}
