"""Loading a trained GANHead for inference and naming the avatars it knows.

Shape legend: n_subjects training subjects (embedding rows), Z/D/C widths of z_shape,
z_detail, z_color, P parameter-vector length (169).

- `load_model(path, flame_model, device)`: a GANHead checkpoint (stage 1 or 2) in eval mode
  with every parameter frozen; a missing or unreadable file raises `InferenceError`.
- `require_stage2(model, what, path)`: colour (and detail normal) networks are trained only in
  stage 2; a stage-1 checkpoint used for a mode that needs them raises `InferenceError` saying so.
- `resolve_subject(...)`: a training subject by embedding row (`3`) or scan id (`'001_02'`,
  looked up in the scan ids the checkpoint stores; checkpoints written before ids were stored
  fall back to the data list of the run) -> its row, name and FLAME parameters (from
  `<processed_dir>/<id>/occupancy.npz` when present, in this project's or the original
  GANHead's layout: lib/dataset/processed_layout.py).
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
    from lib.flame.loader import FlameModelError
    from lib.model.checkpoint import load_ganhead
    from lib.utils.checkpoint_io import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise InferenceError(f"checkpoint {path} not found: train first (python train.py "
                             f"expname=... ) or pass ckpt=PATH")
    kwargs = {} if flame_model is None else {"flame_model": str(flame_model)}
    try:  # no code from the file runs (lib/model/checkpoint.py)
        model = load_ganhead(path, map_location=torch.device(device), **kwargs)
    except (FileNotFoundError, FlameModelError) as err:  # the FLAME pickle it names
        raise InferenceError(f"checkpoint {path}: {err}; pass datamodule.flame_model=PATH") \
            from None
    except CheckpointError as err:
        raise InferenceError(str(err)) from None
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


def resolve_subject(model, subject, data_list=None, processed_dir=None,
                    option: str = "subject") -> Subject:
    """A training subject from an embedding row or a scan id.

    subject: int (row) or str (a row number or a scan id); data_list: the CSV of the training
    run, used only for checkpoints that store no scan ids (ids in embedding order; ignored
    unless its length matches); processed_dir: where `<id>/occupancy.npz` holds the scan's
    FLAME parameters (its shape is the avatar's FLAME shape); option: the config key that
    named the subject (for messages).
    """
    n = model.z_shapes.num_embeddings
    ids, where = getattr(model, "scan_ids", None), "the checkpoint's scan ids"
    if ids is None:
        ids, where = _data_list_ids(data_list), str(data_list)
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
            known = f" nor a scan id of {where}" if ids is not None else ""
            raise InferenceError(f"{option}={subject} is neither a row of the checkpoint's {n} "
                                 f"training subjects (0..{n - 1}){known}")
        name = ids[index] if ids else f"subject{index:03d}"
    else:
        if ids is None:
            raise InferenceError(f"{option}={subject!r}: the checkpoint stores no scan ids and "
                                 f"the training data list (datamodule.data_list={data_list}) is "
                                 f"missing or does not list {n} scans; pass a row number "
                                 f"0..{n - 1} instead")
        if text not in ids:
            raise InferenceError(f"{option}={subject!r} is not among {where} "
                                 f"(first ids: {ids[:5]})")
        index, name = ids.index(text), text
    params = None
    if processed_dir is not None and ids is not None:  # ids are safe path parts (validated on load)
        from lib.dataset.processed_layout import LayoutError, read_flame_params

        scan_dir = Path(processed_dir) / name
        if (scan_dir / "occupancy.npz").is_file():
            try:
                params = read_flame_params(scan_dir)
            except LayoutError as err:
                raise InferenceError(str(err)) from None
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
