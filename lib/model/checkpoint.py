"""GANHead checkpoints: loading without running code from the file, and the identity of the
stage-1 geometry a checkpoint holds.

Shape-free (state dicts only).

- `load_ganhead(path, map_location, **overrides)`: the one way a GANHead is made from a file
  (`GANHead.load_from_checkpoint` calls it; test.py, precompute.py, benches and tests use
  it). The file is read by `read_project_checkpoint`: lib/utils/checkpoint_io.read_checkpoint
  (`weights_only=True`, plain data only) with `PROJECT_TARGETS`, the allow-list of
  lib/model/builders.py, as the only `_target_` names a file may hold; the hyper-parameters
  must be GANHead's own arguments; the networks are built by those builders; then the FLAME
  fingerprint is checked and the weights are loaded strictly. Every failure is a
  `CheckpointError` naming the file. train.py's AtomicCheckpointIO gets the same allow-list.
- `geometry_digest(model)`: a sha256 of what determines stage-1 geometry and deformation
  (the scan ids and the tensors of z_shapes, generator, occupancy, deformer and
  displacement networks). precompute.py stores it in every cache file and compares it on
  reruns, so a cache made by another stage-1 model is never reused; a stage-2 checkpoint
  started from a stage-1 one has the same digest (stage 2 does not train those modules).
"""
from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

import torch

from lib.model.builders import ALLOWED_TARGETS
from lib.utils.checkpoint_io import CheckpointError, read_checkpoint

__all__ = ["load_ganhead", "read_project_checkpoint", "geometry_digest",
           "geometry_digest_of_state", "checkpoint_scan_ids", "GEOMETRY_PREFIXES",
           "PROJECT_TARGETS"]

# the only `_target_` names a checkpoint of this project may hold: its network builders and
# deformer classes
PROJECT_TARGETS = ALLOWED_TARGETS

# state-dict prefixes of the stage-1 modules (GANHead.stage_modules for stage 'coarse')
GEOMETRY_PREFIXES = ("z_shapes.", "generator.", "occ_network.", "deformer.", "disp_net.")


def _ganhead_arguments() -> set[str]:
    from lib.model.ganhead import GANHead

    return set(inspect.signature(GANHead.__init__).parameters) - {"self"}


def read_project_checkpoint(path, map_location=None) -> dict:
    """read_checkpoint with the project's builders as the allowed targets (PROJECT_TARGETS),
    except that a checkpoint of the original GANHead code gets an error saying how to convert
    it (tools/convert_original.py) instead of 'refused' or 'not a checkpoint of this project'."""
    from lib.model.original_checkpoint import conversion_hint

    try:
        checkpoint = read_checkpoint(path, map_location=map_location or "cpu",
                                     allowed_targets=PROJECT_TARGETS)
    except CheckpointError:
        hint = conversion_hint(path)
        if hint is not None:
            raise CheckpointError(hint) from None
        raise
    if "hyper_parameters" not in checkpoint:
        hint = conversion_hint(path)
        if hint is not None:
            raise CheckpointError(hint)
    return checkpoint


def load_ganhead(path, map_location=None, **overrides):
    """A GANHead from a checkpoint written by train.py.

    path: the `.ckpt`; map_location: torch.load's (default: CPU); overrides: hyper-parameters
    to replace (e.g. flame_model=PATH when the head model moved). Returns the model (train
    mode, on the device its tensors were mapped to), `checkpoint_path` set.
    Raises CheckpointError (file, layout, hyper-parameters, weights) or ValueError (the FLAME
    file differs from training's, named by GANHead.on_load_checkpoint).
    """
    from lib.dataset.faceverse import validate_scan_id
    from lib.model.builders import NetworkConfigError
    from lib.model.ganhead import GANHead

    checkpoint = read_project_checkpoint(path, map_location=map_location or "cpu")
    hp = checkpoint.get("hyper_parameters")
    if not isinstance(hp, dict) or "flame_model" not in hp or not (
            "scan_ids" in hp or "n_subjects" in hp):
        have = sorted(checkpoint)[:8]
        raise CheckpointError(
            f"{path}: not a checkpoint of this project's train.py (no GANHead hyper-parameters; "
            f"its keys: {have})")
    unknown = sorted(set(hp) - _ganhead_arguments())
    if unknown:
        raise CheckpointError(f"{path}: hyper-parameters {unknown} are not GANHead arguments")
    hp = {**hp, **overrides}
    ids = hp.get("scan_ids")
    if ids is not None:  # inference uses them as folder names (lib/inference/loading.py)
        if not isinstance(ids, (list, tuple)):
            raise CheckpointError(f"{path}: its scan_ids are a {type(ids).__name__}, not a list")
        for i in ids:
            validate_scan_id(str(i), f"{path}: stored", error=CheckpointError)
    if any(k.startswith("deformer.lbs_net.net.") for k in checkpoint["state_dict"]):
        raise CheckpointError(
            f"{path}: written by an earlier version of this project, whose skinning network was "
            "conditioned on z_shape (README: Differences from the original); the original's "
            "architecture is the default now, so retrain (or keep the earlier version for it)")
    try:
        model = GANHead(**hp)
    except NetworkConfigError as err:
        raise CheckpointError(f"{path}: refused: {err}") from None
    except (TypeError, KeyError) as err:
        raise CheckpointError(f"{path}: its hyper-parameters do not build a GANHead "
                              f"({type(err).__name__}: {err})") from None
    model.on_load_checkpoint(checkpoint)  # FLAME fingerprint; drops stored FLAME arrays
    state = checkpoint["state_dict"]
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: its weights do not fit the network sizes of its hyper-parameters "
            f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
    device = next((t.device for t in state.values() if isinstance(t, torch.Tensor)), None)
    if device is not None:
        model = model.to(device)
    model.checkpoint_path = str(Path(path))
    return model


def checkpoint_scan_ids(checkpoint: dict) -> list[str] | None:
    """The scan ids (embedding-row order) stored in a checkpoint dict, None when absent."""
    ids = (checkpoint.get("hyper_parameters") or {}).get("scan_ids")
    return None if ids is None else [str(i) for i in ids]


def geometry_digest(model) -> str:
    """Hex sha256 of the model's scan ids and stage-1 tensors (module docstring)."""
    return geometry_digest_of_state(model.scan_ids, model.state_dict())


def geometry_digest_of_state(scan_ids: list[str] | None, state: dict) -> str:
    """geometry_digest from scan ids and a state dict (e.g. a checkpoint's, not loaded)."""
    h = hashlib.sha256()
    h.update(repr(None if scan_ids is None else list(scan_ids)).encode())
    for key in sorted(k for k in state if k.startswith(GEOMETRY_PREFIXES)):
        t = state[key].detach().to("cpu").contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()
