"""Batched two-component EM against a float64, one-mixture-at-a-time numpy EM written here.

The reference follows scikit-learn's ``GaussianMixture`` step by step (its ``diag`` M-step formula
``E[x²] − μ²``, which in 1-D is the same model as ``full``): init weights (0.5, 0.5), means (min, max),
precisions (1, 1); loop E-step → M-step → lower bound until it moves by less than ``tol``; then one
more E-step for ``predict`` / ``score_samples``. The cut follows the method doc §8.1.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pisa.models.gmm import fit_two_component_gmm, gmm_positive_cut


def _weighted_log_prob(x, weights, means, variances):
    """(n, 2) log w_c + log N(x | mu_c, var_c), as scikit-learn's diag estimate (precision form)."""
    precisions = 1.0 / variances
    log_det = np.log(np.sqrt(precisions))
    log_prob = (means ** 2 * precisions) - 2 * np.outer(x, means * precisions) + np.outer(x ** 2, precisions)
    return -0.5 * (np.log(2 * np.pi) + log_prob) + log_det + np.log(weights)


def _logsumexp(a):
    m = a.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=1, keepdims=True)))[:, 0]


def reference_em(x, tol=1e-3, max_iter=100, reg_covar=1e-6):
    """One mixture, float64 numpy: returns weights, means, variances, log-lik, labels, n_iter, converged."""
    x = np.asarray(x, dtype=np.float64)
    weights, means, variances = np.array([0.5, 0.5]), np.array([x.min(), x.max()]), np.array([1.0, 1.0])
    lower_bound, converged, n_iter = -np.inf, False, 0
    for n_iter in range(1, max_iter + 1):
        prev = lower_bound
        weighted = _weighted_log_prob(x, weights, means, variances)
        log_norm = _logsumexp(weighted)
        resp = np.exp(weighted - log_norm[:, None])
        nk = resp.sum(0) + 10 * np.finfo(np.float64).eps
        means = resp.T @ x / nk
        variances = resp.T @ (x * x) / nk - means ** 2 + reg_covar
        weights = nk / x.size
        lower_bound = log_norm.mean()
        if abs(lower_bound - prev) < tol:
            converged = True
            break
    weighted = _weighted_log_prob(x, weights, means, variances)
    return weights, means, variances, _logsumexp(weighted), weighted.argmax(1), n_iter, converged


def reference_cut(labels, scores):
    """Positives of one sorted row: fg (label 0) samples up to the best-scoring fg sample; none if no fg."""
    fg = np.flatnonzero(labels == 0)
    out = np.zeros(labels.size, dtype=bool)
    if fg.size:
        last = fg[np.argmax(scores[fg])]
        out[fg[fg <= last]] = True
    return out


def _pad(rows, width=45):
    values = torch.zeros(len(rows), width, dtype=torch.float64)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        values[i, :len(row)] = torch.as_tensor(row, dtype=torch.float64)
        mask[i, :len(row)] = True
    return values, mask


def _random_rows(seed=0, count=40):
    """Sorted cost rows like PAA's: a low cluster (good anchors) and a high one, 2..45 samples."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        n = int(rng.integers(2, 46))
        n_low = int(rng.integers(1, n + 1))
        low = rng.normal(rng.uniform(0.2, 1.0), rng.uniform(0.02, 0.3), n_low)
        high = rng.normal(rng.uniform(1.2, 3.0), rng.uniform(0.05, 0.6), n - n_low)
        rows.append(np.sort(np.abs(np.concatenate([low, high]))))
    return rows


@pytest.mark.parametrize("sync_every", [1, 3, 8], ids=["cpu-default", "every-3", "accelerator-default"])
def test_batched_em_matches_reference_on_random_rows(sync_every):
    """Whatever the host reads how many rows still run (masked updates between two reads), the fit is
    the reference's."""
    rows = _random_rows()
    values, mask = _pad(rows)
    fit = fit_two_component_gmm(values, mask, sync_every=sync_every)
    cut = gmm_positive_cut(fit, mask)
    for i, row in enumerate(rows):
        w, mu, var, loglik, labels, n_iter, conv = reference_em(row)
        n = len(row)
        # The per-sample weights / means / variances / log-likelihoods agree to float64 rounding.
        np.testing.assert_allclose(fit.weights[i].numpy(), w, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(fit.means[i].numpy(), mu, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(fit.variances[i].numpy(), var, rtol=1e-7, atol=1e-12)
        np.testing.assert_allclose(fit.log_likelihood[i, :n].numpy(), loglik, rtol=1e-9, atol=1e-9)
        assert fit.component[i, :n].tolist() == labels.tolist()
        assert (fit.n_iter[i].item(), bool(fit.converged[i])) == (n_iter, conv)
        assert cut[i, :n].tolist() == reference_cut(labels, loglik).tolist()
        assert not cut[i, n:].any() and bool((fit.component[i, n:] == -1).all())
        assert bool(torch.isinf(fit.log_likelihood[i, n:]).all())
    # Non-trivial data: rows need different iteration counts, and cuts are neither all nor none.
    assert len(set(fit.n_iter.tolist())) > 3
    sizes = cut.sum(1)
    assert bool(((sizes > 0) & (sizes < mask.sum(1))).any())


def test_float32_gives_the_same_cut():
    rows = _random_rows(seed=3)
    values, mask = _pad(rows)
    cut64 = gmm_positive_cut(fit_two_component_gmm(values, mask), mask)
    cut32 = gmm_positive_cut(fit_two_component_gmm(values.float(), mask), mask)
    assert torch.equal(cut64, cut32)


def test_all_costs_equal():
    """min == max: both components coincide and stay identical (weights 0.5, variance reg_covar).

    Iteration 1 moves the lower bound from -inf; the M-step sets var = 0 + 1e-6. Iteration 2 moves it
    again (var 1 -> 1e-6); iteration 3 leaves it unchanged, so n_iter = 3. Every sample ties between
    the components -> component 0 (the first), all log-likelihoods are equal, so the cut keeps only
    the first sample: log N(0 | 0, 1e-6) = -0.5 ln(2 pi) - 0.5 ln(1e-6) = 5.988816.
    """
    values, mask = _pad([[0.7] * 5])
    fit = fit_two_component_gmm(values, mask)
    assert fit.weights[0].tolist() == pytest.approx([0.5, 0.5])
    assert fit.means[0].tolist() == pytest.approx([0.7, 0.7])
    assert fit.variances[0].tolist() == pytest.approx([1e-6, 1e-6], rel=1e-6)
    assert fit.n_iter.item() == 3 and bool(fit.converged)
    assert fit.log_likelihood[0, :5].tolist() == pytest.approx([5.988816] * 5, abs=1e-5)
    assert fit.component[0, :5].tolist() == [0] * 5
    assert gmm_positive_cut(fit, mask)[0, :5].tolist() == [True, False, False, False, False]
    _, _, _, loglik, labels, n_iter, _ = reference_em([0.7] * 5)
    assert n_iter == 3 and labels.tolist() == [0] * 5


def test_one_and_two_candidates_and_an_empty_row():
    """One candidate: fitted but never positive (fewer than 2). Two: one per component, the low one
    positive. No candidate: nothing fitted, no positive, no NaN in the other rows."""
    values, mask = _pad([[0.4], [0.3, 1.5], [], [0.2, 0.25, 2.0]])
    fit = fit_two_component_gmm(values, mask)
    cut = gmm_positive_cut(fit, mask)
    assert cut[0].sum() == 0 and cut[2].sum() == 0
    assert cut[1, :2].tolist() == [True, False]
    assert fit.component[1, :2].tolist() == [0, 1]
    # Each component holds one sample: means at the samples, variance the floor 1e-6.
    assert fit.means[1].tolist() == pytest.approx([0.3, 1.5])
    assert fit.variances[1].tolist() == pytest.approx([1e-6, 1e-6], rel=1e-3)
    assert fit.n_iter[2].item() == 0 and not bool(fit.converged[2])
    assert bool((fit.component[2] == -1).all())
    for i in (1, 3):
        n = int(mask[i].sum())
        ref = reference_em(values[i, :n].numpy())
        assert fit.component[i, :n].tolist() == ref[4].tolist()
        assert cut[i, :n].tolist() == reference_cut(ref[4], ref[3]).tolist()
    assert torch.isfinite(fit.means).all() and torch.isfinite(fit.variances).all()


def test_no_foreground_means_no_positives():
    """A hand-made fit where every sample is component 1: the method doc's choice is no positive."""
    values, mask = _pad([[0.1, 0.2, 0.3]])
    fit = fit_two_component_gmm(values, mask)
    fit.component[0, :3] = 1
    assert gmm_positive_cut(fit, mask).sum() == 0


def test_cut_stops_at_the_best_foreground_sample():
    """Foreground need not be a prefix: labels (0, 1, 0, 0) with log-lik (1, 5, 3, 2): the best fg
    sample is position 2, so positives are fg samples at positions <= 2, i.e. {0, 2}."""
    values, mask = _pad([[0.1, 0.2, 0.3, 0.4]])
    fit = fit_two_component_gmm(values, mask)
    fit.component[0, :4] = torch.tensor([0, 1, 0, 0])
    fit.log_likelihood[0, :4] = torch.tensor([1.0, 5.0, 3.0, 2.0], dtype=torch.float64)
    assert gmm_positive_cut(fit, mask)[0, :4].tolist() == [True, False, True, False]


def test_stops_after_max_iter():
    rows = _random_rows(seed=5, count=6)
    values, mask = _pad(rows)
    fit = fit_two_component_gmm(values, mask, max_iter=2)
    assert fit.n_iter.max().item() <= 2
    for i, row in enumerate(rows):
        assert fit.means[i].tolist() == pytest.approx(reference_em(row, max_iter=2)[1].tolist(), rel=1e-9)
    assert math.isfinite(fit.log_likelihood[mask].sum().item())


def test_sync_every_does_not_change_the_fit():
    """Host reads every 1, 3, 8 or 200 iterations (and max_iter between them) give the same fit bit for
    bit: converged rows are frozen by masks, the working rows gathered whenever at most half still run.
    Rows 0 and 7 are empty; the rows need from 2 to ~30 iterations, so several gatherings happen."""
    rows = _random_rows(seed=7, count=30)
    rows[0], rows[7] = [], []
    values, mask = _pad(rows)
    fits = [fit_two_component_gmm(values, mask, sync_every=s) for s in (1, 3, 8, 200)]
    fits += [fit_two_component_gmm(values, mask, sync_every=s, max_iter=5) for s in (1, 4, 6)]
    for fit in fits[1:4]:
        for name in ("weights", "means", "variances", "log_likelihood", "component", "n_iter", "converged"):
            assert torch.equal(getattr(fit, name), getattr(fits[0], name)), name
    for fit in fits[5:]:
        assert torch.equal(fit.means, fits[4].means) and torch.equal(fit.n_iter, fits[4].n_iter)
    assert fits[0].n_iter[[0, 7]].tolist() == [0, 0] and fits[0].n_iter.max() > 10
    assert fits[4].n_iter.max() == 5 and not bool(fits[4].converged.all())
    with pytest.raises(ValueError, match="sync_every"):
        fit_two_component_gmm(values, mask, sync_every=0)
