"""Batched EM for the two-component 1-D Gaussian mixtures of PAA's anchor assignment (method doc §8.1).

PAA fits one mixture per ground truth to the sorted costs of its candidate anchors. Here every GT is
a row of a padded ``(G, K)`` tensor (``K = 45`` for PAA: up to 9 candidates on each of 5 levels) and
all rows run EM together on the tensor's device; a row stops updating once it has converged, exactly
as one per-GT fit would have stopped.

The fit reproduces scikit-learn's ``GaussianMixture(2, weights_init=(0.5, 0.5), means_init=(min,
max), precisions_init=(1, 1))`` with its defaults ``tol=1e-3``, ``max_iter=100``, ``reg_covar=1e-6``
(what the reference calls). In 1-D the ``full``, ``diag`` and ``spherical`` covariance types are the
same model; the variance is computed in the centred form ``Σ r (x − μ)² / n_k`` (numerically the
safer of the equivalent formulas). Iteration ``t``: an E-step with the current parameters gives the
responsibilities and the lower bound (mean per-sample log-likelihood); the M-step replaces the
parameters; the row has converged when the lower bound moved by less than ``tol``. Predictions and
log-likelihoods come from one more E-step with the final parameters, as scikit-learn's ``predict``
and ``score_samples`` do.

Cost: the working tensors are component-first, ``(2, G, K)`` (a trailing dimension of 2 makes every
broadcast several times slower on CPU), and one iteration of all rows is about thirty tensor
operations, whose fixed cost dominates at PAA's sizes. A converged row keeps its parameters by a
masked update while the others go on; when at most half of the rows still run, they are gathered
into smaller tensors (a few times per fit, not at every convergence). Whether rows still run is read
on the host every ``sync_every`` iterations (a wait for the device on an accelerator); the fit does
not depend on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GMMFit", "fit_two_component_gmm", "gmm_positive_cut"]

_LOG_2PI = math.log(2 * math.pi)

# Iterations between two convergence checks on an accelerator, where each check waits for the device
# (on CPU a check is free and every iteration checks, so that converged rows leave the work at once).
_ACCELERATOR_SYNC_EVERY = 8


@dataclass
class GMMFit:
    """Per-row result of :func:`fit_two_component_gmm` for ``G`` rows of ``K`` padded samples.

    weights, means, variances: ``(G, 2)`` final parameters (component 0 starts at the row's minimum).
    log_likelihood: ``(G, K)`` mixture log-density of each sample (``score_samples``); ``-inf`` at padding.
    component: int64 ``(G, K)`` the more likely component (0 or 1, ties → 0); ``-1`` at padding.
    n_iter: int64 ``(G,)`` EM iterations run; converged: bool ``(G,)``. Rows with no sample report
    ``n_iter = 0`` and ``converged = False``.
    """

    weights: Tensor
    means: Tensor
    variances: Tensor
    log_likelihood: Tensor
    component: Tensor
    n_iter: Tensor
    converged: Tensor


def _log_prob(sq_diff: Tensor, params: Tensor) -> Tensor:
    """``(2, n, K)``: ``log w_c + log N(x | μ_c, σ_c²) + ½ log 2π`` from the squared distances
    ``(2, n, K)`` to the means and ``params`` ``(3, 2, n)`` (weights, means, variances)."""
    log_weight, log_variance = params[0::2].log()
    bias = torch.sub(log_weight, log_variance, alpha=0.5)  # log w − ½ log σ²
    return torch.addcdiv(bias[:, :, None], sq_diff, params[2][:, :, None], value=-0.5)


def _log_norm(log_prob: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The mixture's log-density ``(n, K)`` from ``log_prob`` ``(2, n, K)``, with the component
    densities ``(2, n, K)`` and their sum ``(n, K)``, both scaled by the same per-sample factor
    (their ratio is the responsibility)."""
    top = torch.maximum(log_prob[0], log_prob[1])
    shifted = torch.sub(log_prob, top).exp_()
    total = shifted[0] + shifted[1]
    return total.log().add_(top), shifted, total


def _em_step(x: Tensor, weight: Tensor, inv_count: Tensor, sq_diff: Tensor, params: Tensor,
             reg_covar: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One E-step and M-step on ``n`` rows of samples ``x`` ``(n, K)``.

    ``weight`` is 1.0 at samples and 0.0 at padding; ``inv_count`` ``(n,)`` one over the row's sample
    count; ``reg_covar`` a 0-d tensor of ``x``'s dtype. Returns the lower bound less ``½ log 2π``
    ``(n,)``, the new params ``(3, 2, n)`` and the new squared distances ``(2, n, K)``.
    """
    log_norm, resp, total = _log_norm(_log_prob(sq_diff, params))
    lower_bound = torch.linalg.vecdot(log_norm, weight).mul_(inv_count)
    resp.mul_(weight / total)  # the responsibilities, zero at padding
    # scikit-learn adds 10 machine epsilons to every component's mass so an empty one stays finite.
    nk = resp.sum(2).add_(10 * torch.finfo(x.dtype).eps)
    means = torch.linalg.vecdot(resp, x).div_(nk)
    sq_diff = torch.sub(x, means[:, :, None]).square_()
    variances = torch.addcdiv(reg_covar, torch.linalg.vecdot(resp, sq_diff), nk)
    return lower_bound, torch.stack([nk * inv_count, means, variances]), sq_diff


def _initial_params(x: Tensor, mask: Tensor) -> Tensor:
    """``(3, 2, G)``: weights (0.5, 0.5), means (row min, row max), variances (1, 1) (precisions 1)."""
    inf = torch.full_like(x, math.inf)
    low = torch.where(mask, x, inf).amin(1)
    high = torch.where(mask, x, -inf).amax(1)
    empty = ~mask.any(1)
    means = torch.stack([low.masked_fill(empty, 0.0), high.masked_fill(empty, 0.0)])
    return torch.stack([torch.full_like(means, 0.5), means, torch.ones_like(means)])


def fit_two_component_gmm(values: Tensor, mask: Tensor, *, tol: float = 1e-3, max_iter: int = 100,
                          reg_covar: float = 1e-6, sync_every: int | None = None) -> GMMFit:
    """Fit a two-component 1-D Gaussian mixture to every row of ``values`` at once.

    Args:
        values: ``(G, K)`` floating samples, one mixture per row; entries where ``mask`` is False are
            padding and never read. Computed in ``values``' dtype (the PAA head passes float64, the
            precision scikit-learn uses; float32 agrees to about 1e-5).
        mask: bool ``(G, K)``: which entries are samples.
        tol, max_iter, reg_covar: scikit-learn's convergence threshold on the lower bound, iteration
            limit and variance floor.
        sync_every: iterations between two host reads of whether rows are still running (default: 1
            on CPU, 8 on an accelerator). Any value gives the same fit.

    Returns:
        :class:`GMMFit`. There is no loop over rows; the loop over iterations ends when every row has
        converged or after ``max_iter``.
    """
    if values.dim() != 2 or mask.shape != values.shape:
        raise ValueError(f"fit_two_component_gmm: values and mask must both be (G, K), got "
                         f"{tuple(values.shape)} and {tuple(mask.shape)}")
    if sync_every is None:
        sync_every = 1 if values.device.type == "cpu" else _ACCELERATOR_SYNC_EVERY
    if sync_every < 1:
        raise ValueError(f"fit_two_component_gmm: sync_every must be >= 1, got {sync_every}")
    mask = mask.bool()
    x = torch.where(mask, values, torch.zeros_like(values))  # padding never enters a sum
    params = _initial_params(x, mask)
    n_iter = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    converged = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    _run_em(x, mask, params, n_iter, converged, tol=tol, max_iter=max_iter, reg_covar=reg_covar,
            sync_every=sync_every)
    log_prob = _log_prob(torch.sub(x, params[1][:, :, None]).square_(), params)
    log_likelihood = (_log_norm(log_prob)[0] - 0.5 * _LOG_2PI).masked_fill(~mask, -math.inf)
    component = (log_prob[1] > log_prob[0]).long().masked_fill(~mask, -1)
    weights, means, variances = params.transpose(1, 2)
    return GMMFit(weights, means, variances, log_likelihood, component, n_iter, converged)


def _run_em(x: Tensor, mask: Tensor, params: Tensor, n_iter: Tensor, converged: Tensor, *, tol: float,
            max_iter: int, reg_covar: float, sync_every: int) -> None:
    """EM on the rows with samples; ``params`` ``(3, 2, G)``, ``n_iter`` and ``converged`` ``(G,)`` are
    updated in place.

    While the host knows every working row still runs (on CPU, between a compaction and the next
    convergence), the step's results are taken whole. Otherwise a converged row keeps its parameters
    (masked update) while the others go on; its other working values may change, they are never read
    again. Every ``sync_every`` iterations the host reads how many rows still run: none ends the loop;
    at most half of the working rows gathers those into smaller tensors, after writing out the results
    of all (so the tensors shrink a few times, not at every convergence).
    """
    index = torch.nonzero(mask.any(1)).squeeze(1)
    x, weight = x.index_select(0, index), mask.index_select(0, index).to(x.dtype)
    inv_count, rows = weight.sum(1).reciprocal_(), params.index_select(2, index)
    sq_diff = torch.sub(x, rows[1][:, :, None]).square_()
    bound = torch.full_like(inv_count, -math.inf)
    steps = torch.zeros_like(index)
    reg = torch.tensor(reg_covar, dtype=x.dtype, device=x.device)
    all_running = True  # known on the host: every working row is still running
    for iteration in range(1, max_iter + 1):
        if index.numel() == 0:
            return
        new_bound, new_rows, sq_diff = _em_step(x, weight, inv_count, sq_diff, rows, reg)
        change = (new_bound - bound).abs_()
        bound = new_bound
        if all_running:  # no masked update needed (the common case between two compactions on CPU)
            rows, active = new_rows, change.ge(tol)
            steps += 1
        else:
            rows = torch.where(active, new_rows, rows)
            steps += active
            active = change.ge(tol).logical_and_(active)
        all_running = False
        if iteration % sync_every and iteration < max_iter:
            continue
        running = int(active.sum())
        all_running = running == index.numel()
        if 2 * running > index.numel() and iteration < max_iter:
            continue
        params.index_copy_(2, index, rows)
        n_iter.index_copy_(0, index, steps)
        converged.index_copy_(0, index, ~active)
        keep = torch.nonzero(active).squeeze(1)
        index, x, weight = index.index_select(0, keep), x.index_select(0, keep), weight.index_select(0, keep)
        inv_count, rows = inv_count.index_select(0, keep), rows.index_select(2, keep)
        sq_diff = sq_diff.index_select(1, keep)
        bound, steps = bound.index_select(0, keep), steps.index_select(0, keep)
        active, all_running = active.index_select(0, keep), True


def gmm_positive_cut(fit: GMMFit, mask: Tensor, min_samples: int = 2) -> Tensor:
    """PAA's separation: bool ``(G, K)`` positives of each row, for rows sorted by ascending cost.

    The foreground is the samples predicted as component 0. Positives are the foreground samples up
    to and including the foreground sample of highest log-likelihood (the first of equals), in the
    row's sorted order. A row without foreground has no positives (method doc §8.1; the original
    PAA code made all its candidates positive), and so has a row with fewer than ``min_samples``
    samples (the original code kept a single candidate).
    """
    mask = mask.bool()
    foreground = (fit.component == 0) & mask
    fg_score = fit.log_likelihood.masked_fill(~foreground, -math.inf)
    cut = fg_score.argmax(dim=1)  # first index of the maximum
    position = torch.arange(mask.shape[1], device=mask.device)
    keep_row = foreground.any(1) & (mask.sum(1) >= min_samples)
    return foreground & (position[None, :] <= cut[:, None]) & keep_row[:, None]
