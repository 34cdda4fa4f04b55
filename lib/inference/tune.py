"""Per-scan tuning of the shape networks after the latent fit (opt-in, `test.fit.tune_steps`).

Shape legend: N points (per step min(batch, N)), P parameter-vector length (169), Z z_shape
width.

The latent fit (lib/inference/latent_fit.py) moves only the codes, so a head outside the
training population (a hair style no training person wore, an extreme shape) stays as far
from the scan as the nearest head the networks can make. Tuning then moves the weights of the
shape generator and the occupancy network themselves, with the fitted z_shape held fixed
(pivotal tuning, as used to invert image GANs): the same occupancy BCE as the z_shape fit,
plus lambda_anchor * the mean square of the weights' change, which keeps them near the
trained ones. The skinning network, the displacement network and the deformer stay frozen, so
the avatar animates as before; the normal and texture networks are untouched (their fit
follows, on the tuned shape).

The tuned weights live in the model passed in (changed in place); `tuned_state` gives them
for saving and `restore_state` puts the trained ones back. Not part of the original method
(its fit keeps every network frozen): the README's table of differences lists it with its
measured effect.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from lib.inference.latent_fit import batch_bce

__all__ = ["TUNED_MODULES", "tune_shape_networks", "tuned_state", "restore_state"]

TUNED_MODULES = ("generator", "occ_network")  # the model's submodules that tuning changes


def _tuned_params(model) -> list[torch.nn.Parameter]:
    return [p for name in TUNED_MODULES for p in getattr(model, name).parameters()]


def tune_shape_networks(model, params: torch.Tensor, pts: torch.Tensor, occ: torch.Tensor,
                        z_shape: torch.Tensor, steps: int = 100, lr: float = 1e-4,
                        batch: int = 2000, lambda_anchor: float = 1.0, seed: int = 0
                        ) -> dict:
    """Tune the model's generator and occupancy network (module docstring) in place.

    params: [1, P] the scan's FLAME parameters; pts: [N, 3] occupancy points in FLAME space
    and occ: [N] their labels (1 inside), on the model's device; z_shape: [1, Z] the fitted
    code (held fixed). Returns a history dict: 'bce' per step and 'drift' (the final mean
    square change of the tuned weights)."""
    if steps <= 0:
        return {"bce": [], "drift": 0.0}
    weights = _tuned_params(model)
    anchors = [w.detach().clone() for w in weights]
    n_weights = sum(w.numel() for w in weights)
    flags = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    opt = torch.optim.Adam(weights, lr=lr)
    z = z_shape.detach()
    gen = torch.Generator().manual_seed(int(seed))
    history = {"bce": []}

    def drift() -> torch.Tensor:
        return sum(((w - a) ** 2).sum() for w, a in zip(weights, anchors)) / n_weights

    try:
        for _ in tqdm(range(steps), desc="tune shape networks", unit="step"):
            bce = batch_bce(model, params, pts, occ, z, batch, gen, "tune_shape_networks")
            loss = bce + lambda_anchor * drift()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history["bce"].append(float(bce.detach()))
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
            w.grad = None
    with torch.no_grad():
        history["drift"] = float(drift())
    return history


def tuned_state(model) -> dict:
    """{module name: state_dict (CPU copies, never views of the live weights)} of the tuned
    modules, for saving beside the fitted codes (torch.load(..., weights_only=True) reads it
    back)."""
    return {name: {k: v.detach().cpu().clone()
                   for k, v in getattr(model, name).state_dict().items()}
            for name in TUNED_MODULES}


def restore_state(model, state: dict) -> None:
    """Put back the tuned modules' weights from `tuned_state`'s dict (taken before tuning), so
    that one loaded model can fit several scans."""
    for name in TUNED_MODULES:
        getattr(model, name).load_state_dict(state[name])
