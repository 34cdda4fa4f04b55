"""The start and the code units of the latent fit (lib/inference/latent_fit.py pick_start,
fit_shape; lib/inference/fitting.py start_candidates) on a stand-in model whose occupancy is
analytic: a sphere of radius 0.5 + 10 * z[0] (a code dimension whose learned spread is 0.01,
as the trained z_shape embeddings' spreads are)."""
from __future__ import annotations

import torch


class _SphereModel:
    """occupancy(xd [1, N, 3], params, codes) -> logits [1, N] of the sphere of radius
    0.5 + 10 * z_shape[0, 0] (sharpness 20 per unit)."""

    def occupancy(self, xd, params, codes):
        r = 0.5 + 10.0 * codes["z_shape"][:, :1]
        return 20.0 * (r - xd.norm(dim=-1))


def _points(radius: float, n: int = 3000, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pts = (torch.rand(n, 3, generator=g) * 2 - 1) * 1.0
    return pts, (pts.norm(dim=-1) < radius).float()


def test_pick_start_takes_the_code_that_explains_the_points():
    from lib.inference.latent_fit import pick_start

    pts, occ = _points(0.6)  # radius 0.6 <=> z[0] = 0.01
    cands = [{"z_shape": torch.tensor([[z, 0.0]])} for z in (-0.01, 0.0, 0.011, 0.03)]
    best, scores = pick_start(_SphereModel(), None, pts, occ, cands, n_points=2000)
    assert best == 2
    assert scores[2] == min(scores) and len(scores) == 4


def test_code_units_keep_the_code_among_the_learned_ones():
    """In raw units Adam's step (lr per step, whatever the gradient's size) is 3 spreads of a
    dimension whose codes spread 0.01, and it ends off the truth; in units of the spread the
    fit lands on it (deterministic: seeded points and batches)."""
    from lib.inference.latent_fit import fit_shape

    pts, occ = _points(0.62)  # truth z[0] = 0.012
    z0 = torch.zeros(1, 2)
    std = torch.tensor([0.01, 0.01])
    raw, _ = fit_shape(_SphereModel(), None, pts, occ, z0, steps=60, lr=3e-2, batch=1000,
                       lambda_reg=0.0)
    spread, hist = fit_shape(_SphereModel(), None, pts, occ, z0, steps=60, lr=0.1, batch=1000,
                             lambda_reg=0.0, std=std, mean=torch.zeros(2), lambda_code=1e-3)
    assert abs(float(spread[0, 0]) - 0.012) < 0.002
    assert abs(float(raw[0, 0]) - 0.012) > 2 * abs(float(spread[0, 0]) - 0.012)
    assert hist[-1] < hist[0]
    # the Gaussian prior pulls towards the mean when the data say nothing about a dimension
    assert abs(float(spread[0, 1])) < 1e-6


def test_start_candidates_prefer_the_nearest_flame_shapes():
    from lib.inference.fitting import start_candidates

    class _Model:
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.z_shapes = torch.nn.Embedding(5, 4)
            self.z_details = torch.nn.Embedding(5, 3)
            self.z_colors = torch.nn.Embedding(5, 2)
            for e in (self.z_shapes, self.z_details, self.z_colors):
                e.weight.data = torch.randn(e.weight.shape, generator=g)
            self.bbox_min = torch.zeros(3)

    model = _Model()
    train_betas = torch.tensor([[0.0, 0.0], [5.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.2, 0.1]])
    cands = start_candidates(model, torch.tensor([[0.1, 0.0]]), train_betas, nearest=2,
                             samples=3, seed=1)
    names = [c["name"] for c in cands]
    assert names == ["code_mean", "training_row_0", "training_row_4", "sample_0", "sample_1",
                     "sample_2"]
    assert torch.equal(cands[2]["z_detail"], model.z_details.weight[4:5])
    assert torch.allclose(cands[0]["z_shape"], model.z_shapes.weight.mean(0, keepdim=True))
    for c in cands:
        assert c["z_shape"].shape == (1, 4) and c["z_color"].shape == (1, 2)
    assert not torch.equal(cands[3]["z_shape"], cands[4]["z_shape"])
