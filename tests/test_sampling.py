"""Code Gaussians of lib/inference/sampling.py against their definitions: the per-dimension
draw (the original's) and the full-covariance draw (opt-in), checked on code rows made here
with a known low-rank structure."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lib.inference.sampling import fit_gaussian, sample_codes


def low_rank_rows(n_rows: int = 6, dim: int = 10, rank: int = 3, seed: int = 0):
    """rows [n_rows, dim] = offset + coefficients @ basis: they vary in a rank-`rank` subspace
    (basis [rank, dim], orthonormal) around an offset [dim]."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, rank, generator=g, dtype=torch.float64))[0].T
    coeff = torch.randn(n_rows, rank, generator=g, dtype=torch.float64) * torch.tensor(
        [3.0, 1.0, 0.3], dtype=torch.float64)[:rank]
    offset = torch.randn(dim, generator=g, dtype=torch.float64)
    return offset + coeff @ basis, basis


def test_full_draws_have_the_rows_covariance_and_stay_in_their_span():
    rows, basis = low_rank_rows()
    fit = fit_gaussian(rows)
    n, scale = 40000, 0.5
    draws = fit.sample(n, scale, torch.Generator().manual_seed(1), covariance="full").double()
    # reference in float64: the unbiased sample covariance of the rows
    centred = rows - rows.mean(0)
    cov_rows = centred.T @ centred / (rows.shape[0] - 1)
    mean = rows.mean(0)
    cov_draws = (draws - draws.mean(0)).T @ (draws - draws.mean(0)) / (n - 1)
    tol = 4 * scale ** 2 * cov_rows.diagonal().max() * math.sqrt(2 / n) * 3
    assert torch.allclose(cov_draws, scale ** 2 * cov_rows, atol=tol)
    assert torch.allclose(draws.mean(0), mean, atol=4 * scale * cov_rows.diagonal().max().sqrt()
                          / math.sqrt(n))
    # every draw minus the mean lies in the rows' subspace (float32 rounding only)
    d = draws - mean
    residual = d - (d @ basis.T) @ basis
    assert residual.abs().max() < 1e-5 * d.abs().max()


def test_diagonal_draws_have_the_per_dimension_std_and_leave_the_span():
    rows, basis = low_rank_rows()
    fit = fit_gaussian(rows)
    draws = fit.sample(40000, 1.0, torch.Generator().manual_seed(2)).double()
    assert torch.allclose(draws.std(0), rows.std(0), rtol=0.05)
    # independent dimensions: the draws spread out of the rows' 3-d subspace
    d = draws - rows.mean(0)
    residual = d - (d @ basis.T) @ basis
    assert residual.norm(dim=1).mean() > 0.5 * d.norm(dim=1).mean()


def test_one_row_gives_the_row_itself_and_bad_covariance_is_refused():
    rows = torch.arange(4.0)[None]
    fit = fit_gaussian(rows)
    for cov in ("diagonal", "full"):
        assert torch.equal(fit.sample(3, 1.0, torch.Generator().manual_seed(0), cov),
                           rows.expand(3, -1))
    with pytest.raises(ValueError, match="covariance"):
        fit.sample(1, covariance="low-rank")


def test_sample_codes_passes_covariance_to_every_code():
    tables, bases = {}, {}
    for name, dim in (("z_shapes", 10), ("z_details", 7), ("z_colors", 5)):
        rows, bases[name] = low_rank_rows(dim=dim, seed=dim)
        tables[name] = torch.nn.Embedding.from_pretrained(rows.float())
    model = SimpleNamespace(**tables, bbox_min=torch.zeros(3),
                            flame_server=SimpleNamespace(n_shape=100))
    codes = sample_codes(model, 5, seed=3, covariance="full")
    for name in ("z_shape", "z_detail", "z_color"):
        rows = tables[name + "s"].weight.double()
        d = torch.cat([c[name] for c in codes]).double() - rows.mean(0)
        basis = bases[name + "s"]                                # [3, dim]: the rows' subspace
        assert (d - (d @ basis.T) @ basis).abs().max() < 1e-5 * d.abs().max()
