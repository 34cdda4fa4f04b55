"""A training stage of GANHead: what the LightningModule delegates to for `hparams.stage`
(docs/design.md, Stage 1 and Stage 2). `CoarseStage` (lib/model/coarse_stage.py) and
`FineStage` (lib/model/fine_stage.py) implement one interface:

- `stage_modules()`: the modules the stage trains (the others are frozen);
- `configure_optimizers()`: Adam over those modules, plus the critics' Adam when they exist;
- `training_step(batch)`: losses, manual optimization, `train/*` logs; returns the loss;
- `validation_step(batch, batch_idx)`: `val/*` logs and pictures; returns the main metric.

A stage is a plain object, not an nn.Module: GANHead keeps it as an ordinary attribute (in its
instance dict, where nn.Module never looks for children), so neither the state_dict keys nor
the hyper-parameters of a checkpoint depend on it. It holds a strong reference to the model;
the resulting cycle is freed by Python's collector, and copy.deepcopy / pickle follow it to
the copied model (a weakref would not survive either).

Shape legend: B batch.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn as nn


def touch(params) -> torch.Tensor | float:
    """A zero scalar depending on every parameter of `params` that requires grad, so that a
    backward pass reaches all of them (keeps DDP's reducer consistent). 0.0 when none does."""
    zero = None
    for p in params:
        if p.requires_grad:
            term = p.reshape(-1)[:1].sum() * 0.0
            zero = term if zero is None else zero + term
    return zero if zero is not None else 0.0


class TrainingStage(ABC):
    """One stage of training, holding the GANHead module `model` (see the module docstring)."""

    name: str = ""

    def __init__(self, model) -> None:
        self.model = model

    @property
    def hparams(self):
        return self.model.hparams

    @abstractmethod
    def stage_modules(self) -> list[nn.Module]:
        """Modules trained in this stage."""

    @abstractmethod
    def training_step(self, batch: dict) -> torch.Tensor:
        """One optimization step on a batch. Returns the detached loss (a scalar)."""

    @abstractmethod
    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Validation logs of a batch. Returns the stage's main metric (a scalar)."""

    def main_params(self) -> list[nn.Parameter]:
        """Parameters of the stage's modules (those of the main optimizer)."""
        return [p for m in self.stage_modules() for p in m.parameters()]

    def configure_optimizers(self):
        """Adam (betas 0.9, 0.999) over the stage's modules at optim.lr; with critics a second
        Adam over them at optim.lr_disc with betas (0, 0.99), as the original.

        The latent codes may take their own learning rate (optim.lr_latent, opt-in): each code
        only gets a gradient when its scan is in the batch, so on short CPU runs with many scans
        they barely leave zero at the networks' rate (null: one rate for all, as the original).
        """
        model, optim = self.model, self.hparams.optim
        lr = optim["lr"]
        lr_latent = optim.get("lr_latent") or lr
        embeds = (model.z_shapes, model.z_details, model.z_colors)
        latent = [p for m in self.stage_modules() if m in embeds for p in m.parameters()]
        nets = [p for m in self.stage_modules() if m not in embeds for p in m.parameters()]
        main = torch.optim.Adam([{"params": nets, "lr": lr},
                                 {"params": latent, "lr": lr_latent}], lr=lr,
                                betas=(0.9, 0.999))
        discs = model.disc_modules()
        if not discs:
            return main
        lr_d = optim.get("lr_disc", lr)
        disc = torch.optim.Adam([p for d in discs for p in d.parameters()], lr=lr_d,
                                betas=(0.0, 0.99))
        return [main, disc]

    def optimizer_step(self, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        """Clear opt's gradients, back-propagate loss through Lightning (manual optimization),
        clip the gradients' norm at gradient_clip_val and step."""
        model = self.model
        opt.zero_grad(set_to_none=True)
        model.manual_backward(loss)
        model.clip_gradients(opt, gradient_clip_val=self.hparams.gradient_clip_val,
                             gradient_clip_algorithm="norm")
        opt.step()

    def log_train(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], bs: int) -> None:
        """Log train/loss (progress bar) and every term as train/<name>; bs: batch size B."""
        self.model.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        for k, v in terms.items():
            self.model.log(f"train/{k}", v.detach(), batch_size=bs)
