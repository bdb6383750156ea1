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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GMMFit", "fit_two_component_gmm", "gmm_positive_cut"]

_LOG_2PI = math.log(2 * math.pi)


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


def _weighted_log_prob(x: Tensor, weights: Tensor, means: Tensor, variances: Tensor) -> Tensor:
    """``(G, K, 2)``: ``log w_c + log N(x | μ_c, σ_c²)`` for every sample and component."""
    diff = x[:, :, None] - means[:, None, :]
    log_gauss = -0.5 * (_LOG_2PI + diff * diff / variances[:, None, :]) - 0.5 * variances[:, None, :].log()
    return log_gauss + weights[:, None, :].log()


def _e_step(x: Tensor, mask: Tensor, count: Tensor, params: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Responsibilities ``(G, K, 2)`` (zero at padding) and the lower bound ``(G,)``."""
    weighted = _weighted_log_prob(x, *params)
    log_norm = torch.logsumexp(weighted, dim=2)
    resp = (weighted - log_norm[:, :, None]).exp() * mask[:, :, None]
    lower_bound = torch.where(mask, log_norm, torch.zeros_like(log_norm)).sum(1) / count
    return resp, lower_bound


def _m_step(x: Tensor, resp: Tensor, count: Tensor, reg_covar: float) -> tuple[Tensor, Tensor, Tensor]:
    """Weights, means and variances ``(G, 2)`` from the responsibilities (scikit-learn's M-step)."""
    # scikit-learn adds 10 machine epsilons to every component's mass so an empty one stays finite.
    nk = resp.sum(1) + 10 * torch.finfo(resp.dtype).eps
    means = (resp * x[:, :, None]).sum(1) / nk
    diff = x[:, :, None] - means[:, None, :]
    variances = (resp * diff * diff).sum(1) / nk + reg_covar
    return nk / count[:, None], means, variances


def _initial_params(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Weights (0.5, 0.5), means (row min, row max), variances (1, 1) (precisions 1)."""
    inf = torch.full_like(x, math.inf)
    low = torch.where(mask, x, inf).min(1).values
    high = torch.where(mask, x, -inf).max(1).values
    empty = ~mask.any(1)
    low, high = low.masked_fill(empty, 0.0), high.masked_fill(empty, 0.0)
    means = torch.stack([low, high], dim=1)
    return torch.full_like(means, 0.5), means, torch.ones_like(means)


def fit_two_component_gmm(values: Tensor, mask: Tensor, *, tol: float = 1e-3, max_iter: int = 100,
                          reg_covar: float = 1e-6) -> GMMFit:
    """Fit a two-component 1-D Gaussian mixture to every row of ``values`` at once.

    Args:
        values: ``(G, K)`` floating samples, one mixture per row; entries where ``mask`` is False are
            padding and never read. Computed in ``values``' dtype (the PAA head passes float64, the
            precision scikit-learn uses; float32 agrees to about 1e-5).
        mask: bool ``(G, K)``: which entries are samples.
        tol, max_iter, reg_covar: scikit-learn's convergence threshold on the lower bound, iteration
            limit and variance floor.

    Returns:
        :class:`GMMFit`. The loop over iterations stops as soon as every row has converged; there is
        no loop over rows.
    """
    if values.dim() != 2 or mask.shape != values.shape:
        raise ValueError(f"fit_two_component_gmm: values and mask must both be (G, K), got "
                         f"{tuple(values.shape)} and {tuple(mask.shape)}")
    mask = mask.bool()
    x = torch.where(mask, values, torch.zeros_like(values))  # padding never enters a sum
    count = mask.sum(1).clamp(min=1).to(x.dtype)
    params = _initial_params(x, mask)
    active = mask.any(1)
    converged = torch.zeros_like(active)
    n_iter = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    lower_bound = torch.full_like(count, -math.inf)
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        resp, new_bound = _e_step(x, mask, count, params)
        new_params = _m_step(x, resp, count, reg_covar)
        params = tuple(torch.where(active[:, None], new, old) for new, old in zip(new_params, params))
        done_now = active & ((new_bound - lower_bound).abs() < tol)
        lower_bound = torch.where(active, new_bound, lower_bound)
        n_iter += active.long()
        converged |= done_now
        active &= ~done_now
    weighted = _weighted_log_prob(x, *params)
    log_likelihood = torch.logsumexp(weighted, dim=2).masked_fill(~mask, -math.inf)
    component = (weighted[:, :, 1] > weighted[:, :, 0]).long().masked_fill(~mask, -1)
    return GMMFit(*params, log_likelihood, component, n_iter, converged)


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
