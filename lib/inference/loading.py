"""Loading a trained GANHead for inference and naming the avatars it knows.

Shape legend: S training subjects (embedding rows), Z/D/C widths of z_shape, z_detail, z_color,
P parameter-vector length (169).

- `load_model(path, flame_model, device)`: a GANHead checkpoint (stage 1 or 2) in eval mode
  with every parameter frozen; a missing or unreadable file raises `InferenceError`.
- `require_stage2(model, what, path)`: colour (and detail normal) networks are trained only in
  stage 2; a stage-1 checkpoint used for a mode that needs them raises `InferenceError` saying so.
- `resolve_subject(...)`: a training subject by embedding row (`3`) or scan id (`'001_02'`,
  looked up in the data list the model was trained with) -> its row, name and FLAME parameters
  (from `<processed_dir>/<id>/occupancy.npz` when present).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["InferenceError", "load_model", "is_stage2", "require_stage2", "Subject",
           "resolve_subject", "subject_codes"]


class InferenceError(ValueError):
    """test.py cannot do what was asked (missing/unsuitable checkpoint, bad input file, ...);
    the message names the file or option and what is wrong."""


def load_model(path, flame_model: str | None = None, device: str | torch.device = "cpu"):
    """Load a GANHead checkpoint for inference.

    path: a Lightning `.ckpt` written by train.py; flame_model: the FLAME (or synthetic head
    model) pickle, overriding the path stored in the checkpoint (None keeps it).
    Returns the model in eval mode on `device`, all parameters with requires_grad False.
    """
    from lib.model.ganhead import GANHead

    path = Path(path)
    if not path.is_file():
        raise InferenceError(f"checkpoint {path} not found: train first (python train.py "
                             f"expname=... ) or pass ckpt=PATH")
    kwargs = {} if flame_model is None else {"flame_model": str(flame_model)}
    try:
        model = GANHead.load_from_checkpoint(path, map_location=torch.device(device), **kwargs)
    except FileNotFoundError as err:  # the FLAME pickle named by the checkpoint or the config
        raise InferenceError(f"checkpoint {path}: {err}; pass datamodule.flame_model=PATH") \
            from err
    except Exception as err:  # truncated/foreign files fail in many ways inside torch.load
        raise InferenceError(f"checkpoint {path} could not be loaded as a GANHead checkpoint "
                             f"({type(err).__name__}: {err})") from err
    model = model.to(torch.device(device)).eval().requires_grad_(False)
    model.checkpoint_path = str(path)
    return model


def is_stage2(model) -> bool:
    """True when the checkpoint comes from stage 2 (normal and texture networks trained)."""
    return str(model.hparams.get("stage", "coarse")) == "fine"


def require_stage2(model, what: str) -> None:
    """Raise InferenceError unless `model` is a stage-2 checkpoint. what: the mode or feature
    that needs colours / detail normals (used in the message)."""
    if not is_stage2(model):
        path = getattr(model, "checkpoint_path", "the checkpoint")
        raise InferenceError(
            f"{what} needs the stage-2 (fine) networks for colours and detail normals, but "
            f"{path} is a stage-1 (coarse) checkpoint (model.stage="
            f"{model.hparams.get('stage')!r}). Train stage 2 (python train.py expname=fine "
            f"+experiments=fine starting_path={path}) and use its checkpoint; geometry-only "
            f"modes (z_shape, betas, thetas, fit of an untextured scan) accept stage 1.")


@dataclass
class Subject:
    """A training subject: embedding row `index`, display `name`, FLAME parameters `params`
    [P] (float32 numpy; None when the processed data is not available)."""

    index: int
    name: str
    params: np.ndarray | None


def _data_list_ids(data_list) -> list[str] | None:
    if data_list is None or not Path(data_list).is_file():
        return None
    from lib.dataset.faceverse import read_data_list

    return read_data_list(data_list)


def resolve_subject(model, subject, data_list=None, processed_dir=None) -> Subject:
    """A training subject from an embedding row or a scan id.

    subject: int (row) or str (a row number or a scan id of `data_list`); data_list: the CSV
    of the training run (ids in embedding order); processed_dir: where `<id>/occupancy.npz`
    holds the scan's FLAME parameters (its shape is the avatar's FLAME shape).
    """
    n = model.z_shapes.num_embeddings
    ids = _data_list_ids(data_list)
    if ids is not None and len(ids) != n:
        ids = None  # not the list this checkpoint was trained with: rows only
    text = str(subject).strip()
    if ids is not None and text not in ids and text.isdigit():
        # Hydra reads an override like subject=123_45 as the integer 12345
        merged = [i for i in ids if i.replace("_", "") == text]
        text = merged[0] if len(merged) == 1 else text
    if text.lstrip("-").isdigit() and (ids is None or text not in ids):
        index = int(text)
        if not 0 <= index < n:
            known = f" nor a scan id of {data_list}" if ids is not None else ""
            raise InferenceError(f"subject={subject} is neither a row of the checkpoint's {n} "
                                 f"training subjects (0..{n - 1}){known}")
        name = ids[index] if ids else f"subject{index:03d}"
    else:
        if ids is None:
            raise InferenceError(f"subject={subject!r}: a scan id needs the training data list "
                                 f"(datamodule.data_list={data_list} is missing or does not "
                                 f"list {n} scans); pass a row number 0..{n - 1} instead")
        if text not in ids:
            raise InferenceError(f"subject={subject!r} is not in {data_list} "
                                 f"(first ids: {ids[:5]})")
        index, name = ids.index(text), text
    params = None
    if processed_dir is not None and ids is not None:
        occ = Path(processed_dir) / name / "occupancy.npz"
        if occ.is_file():
            with np.load(occ) as data:
                params = np.asarray(data["flame_params"], dtype=np.float32)
    return Subject(index=index, name=name, params=params)


def subject_codes(model, subject: Subject) -> dict[str, torch.Tensor]:
    """Learned codes and FLAME shape of a training subject: z_shape [1, Z], z_detail [1, D],
    z_color [1, C], betas [1, 100] (zeros when its parameters are unknown)."""
    idx = torch.tensor([subject.index], device=model.bbox_min.device)
    n_shape = model.flame_server.n_shape
    if subject.params is not None:
        p = model.flame_server.split_params(torch.as_tensor(subject.params)[None])
        betas = p["shape"].to(model.bbox_min)
    else:
        betas = model.bbox_min.new_zeros(1, n_shape)
    return {"z_shape": model.z_shapes(idx).detach(), "z_detail": model.z_details(idx).detach(),
            "z_color": model.z_colors(idx).detach(), "betas": betas}
