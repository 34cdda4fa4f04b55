"""Per-scan tuning of the shape networks (lib/inference/tune.py) on a stand-in model whose
occupancy is analytic: a sphere whose radius is the sum of one weight of the "generator" and
one of the "occupancy network" (a third module, the deformer's stand-in, must not move)."""
from __future__ import annotations

import io

import pytest
import torch


class _Radius(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.r = torch.nn.Parameter(torch.tensor(value))


class _SphereModel(torch.nn.Module):
    """occupancy(xd [1, N, 3], params, codes) -> logits [1, N] of the sphere of radius
    generator.r + occ_network.r (+ 0 * deformer.r), sharpness 20 per unit."""

    def __init__(self):
        super().__init__()
        self.generator, self.occ_network, self.deformer = _Radius(0.3), _Radius(0.2), _Radius(1.0)
        for m in self.children():
            m.requires_grad_(False)  # as in inference: frozen until tuned
        self.eval()

    def occupancy(self, xd, params, codes):
        r = self.generator.r + self.occ_network.r + 0.0 * self.deformer.r
        return 20.0 * (r - xd.norm(dim=-1)) + 0.0 * codes["z_shape"].sum()


def _points(radius: float, n: int = 3000, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(n, 3, generator=g) * 2 - 1
    return pts, (pts.norm(dim=-1) < radius).float()


def test_tuning_moves_the_shape_networks_to_the_scan():
    from lib.inference.tune import tune_shape_networks

    model = _SphereModel()
    pts, occ = _points(0.7)  # truth: radius 0.7, the networks start at 0.5
    hist = tune_shape_networks(model, None, pts, occ, torch.zeros(1, 2), steps=150, lr=1e-2,
                               batch=1000, lambda_anchor=0.0)
    radius = float(model.generator.r + model.occ_network.r)
    assert abs(radius - 0.7) < 0.02
    assert hist["bce"][-1] < 0.5 * hist["bce"][0]
    # the deformer is never tuned, and every flag and mode is restored
    assert float(model.deformer.r) == 1.0
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
    # the drift is the mean square change of the two tuned weights
    expected = ((float(model.generator.r) - 0.3) ** 2 + (float(model.occ_network.r) - 0.2) ** 2)
    assert hist["drift"] == pytest.approx(expected / 2, rel=1e-5)


def test_the_anchor_keeps_the_weights_near_the_trained_ones():
    from lib.inference.tune import tune_shape_networks

    pts, occ = _points(0.7)
    free, held = _SphereModel(), _SphereModel()
    tune_shape_networks(free, None, pts, occ, torch.zeros(1, 2), 150, 1e-2, 1000, 0.0)
    tune_shape_networks(held, None, pts, occ, torch.zeros(1, 2), 150, 1e-2, 1000, 1e3)
    moved = lambda m: abs(float(m.generator.r + m.occ_network.r) - 0.5)  # noqa: E731
    assert moved(held) < 0.3 * moved(free)
    # zero steps change nothing
    still = _SphereModel()
    assert tune_shape_networks(still, None, pts, occ, torch.zeros(1, 2), 0) == {
        "bce": [], "drift": 0.0}
    assert float(still.generator.r) == torch.tensor(0.3).item()


def test_tuned_state_round_trips_through_a_weights_only_load():
    from lib.inference.tune import TUNED_MODULES, restore_state, tune_shape_networks, tuned_state

    model = _SphereModel()
    trained = tuned_state(model)
    pts, occ = _points(0.7)
    tune_shape_networks(model, None, pts, occ, torch.zeros(1, 2), 20, 1e-2, 1000, 0.0)
    assert float(model.occ_network.r) > 0.2 + 0.05
    restore_state(model, trained)  # what run_fit does once a tuned fit is written
    assert float(model.occ_network.r) == torch.tensor(0.2).item()
    buf = io.BytesIO()
    torch.save(tuned_state(model), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert set(state) == set(TUNED_MODULES)
    assert float(state["occ_network"]["r"]) == pytest.approx(0.2)
