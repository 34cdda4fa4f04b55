"""The optional stage-2 adversarial terms (docs/design.md, Critics): which critics are on, the
images they judge, the generator's non-saturating terms and the critics' logistic loss with
the lazy R1 penalty. The critic network and the raw GAN losses are lib/model/discriminator.py.

Functions take `model`: anything with `hparams` (lambda_gan, lambda_gan_color, lambda_grad,
d_reg_every, gan_shared_mask) and the critics `disc_normal` / `disc_color` (None when off),
such as the GANHead module; `out` is the image dict of FineStage.render_and_losses
(lib/model/fine_stage.py).

Shape legend: B batch, R image rows = columns.
"""
from __future__ import annotations

import torch

from lib.model.discriminator import LazyR1, d_logistic_loss, g_nonsaturating_loss, r1_penalty


def discriminators(model) -> list[tuple[str, torch.nn.Module, str, float]]:
    """The enabled critics as (name, module, image type, weight): ('normal', disc_normal,
    'normal', lambda_gan) with use_gan, ('color', disc_color, 'rgb', lambda_gan_color) with
    use_gan_color."""
    hp = model.hparams
    out = []
    if getattr(model, "disc_normal", None) is not None:
        out.append(("normal", model.disc_normal, "normal", float(hp.lambda_gan)))
    if getattr(model, "disc_color", None) is not None:
        out.append(("color", model.disc_color, "rgb", float(hp.get("lambda_gan_color", 0.0))))
    return out


def gan_images(model, out: dict, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and rendered images of one type ('normal' or 'rgb') as the critics see them:
    as they are (the original: the real render on its own white background, the rendered
    image white outside the cache mask) or, with the opt-in gan_shared_mask, both composited
    on white with out['mask'] [B, R, R]. Returns (real [B, 3, R, R], fake [B, 3, R, R]); fake
    keeps its graph."""
    real, fake = out[f"real_{key}"], out[f"fake_{key}"]
    if model.hparams.get("gan_shared_mask", False):
        m = out["mask"][:, None]
        real = torch.where(m, real, torch.ones_like(real))
        fake = torch.where(m, fake, torch.ones_like(fake))
    return real, fake


def generator_gan_terms(model, out: dict) -> dict[str, torch.Tensor]:
    """Weighted non-saturating G loss per enabled critic: {'gan_normal': lambda_gan * ..,
    'gan_color': lambda_gan_color * ..} (scalars; a critic of weight 0 adds nothing)."""
    terms = {}
    for name, disc, key, lam in discriminators(model):
        if lam > 0:
            _, fake = gan_images(model, out, key)
            terms[f"gan_{name}"] = lam * g_nonsaturating_loss(disc(fake))
    return terms


def discriminator_loss(model, out: dict, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The critics' loss: sum over enabled critics of weight * (logistic D loss on real vs
    detached fake images + on regularization steps (step % d_reg_every == 0) the lazy R1
    penalty lambda_grad / 2 * d_reg_every * R1 of the same real logits).
    Returns (loss, the R1 part or None when step is not a regularization step), scalars."""
    hp = model.hparams
    lazy = LazyR1(lambda_r1=hp.lambda_grad, d_reg_every=hp.d_reg_every)
    reg = lazy.due(step) and hp.lambda_grad > 0
    total, r1_total = 0.0, 0.0
    for _, disc, key, lam in discriminators(model):
        real, fake = gan_images(model, out, key)
        real = real.detach().requires_grad_(reg)
        logits_real = disc(real)
        d = d_logistic_loss(logits_real, disc(fake.detach()))
        if reg:
            r1 = lazy.weight() * r1_penalty(logits_real, real) + 0.0 * logits_real.sum()
            r1_total = r1_total + lam * r1
            d = d + r1
        total = total + lam * d
    return total, (r1_total if reg else None)
