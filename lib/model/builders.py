"""Networks and the deformer built from configuration data through allow-lists, never by
instantiating a target read from a file.

Shape-free. The Hydra network configs (configs/network/*.yaml) name their builder with
`_target_`, the deformer configs (configs/deformer/*.yaml) their class; the same dicts are
stored in every checkpoint's hyper-parameters. Handing them to `hydra.utils.instantiate` would
let a checkpoint name any callable (`os.system`, also nested inside a width value), so GANHead
builds its networks with `build_network` and its deformer with `build_deformer`, which:

- accept only the targets in `NETWORK_BUILDERS` (this project's own network builders) and
  `DEFORMER_CLASSES` (its two deformers) respectively;
- accept as arguments only the target's own parameter names, each with a plain value
  (number, string, bool, None, or a list of those); a dict anywhere (a nested `_target_`) is
  refused;
- refuse configuration keys that collide with what GANHead derives itself (those are passed
  as `derived`, computed from the other modules, never typed twice).

Checkpoints written before the deformer became a config group name it by `mode` (exact |
fast) instead of `_target_`; `build_deformer` reads them as the same two classes.
Failures raise `NetworkConfigError` naming the config entry and the key.
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from lib.model import networks

__all__ = ["ALLOWED_TARGETS", "DEFORMER_CLASSES", "NETWORK_BUILDERS", "NetworkConfigError",
           "build_deformer", "build_network"]

NETWORK_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "lib.model.networks.build_geometry_network": networks.build_geometry_network,
    "lib.model.networks.build_displacement_network": networks.build_displacement_network,
    "lib.model.networks.build_normal_network": networks.build_normal_network,
    "lib.model.networks.build_texture_network": networks.build_texture_network,
    "lib.model.networks.LBSNetwork": networks.LBSNetwork,
}

# the deformers (configs/deformer/exact.yaml, fast.yaml), imported when built (the fast one
# needs scipy)
DEFORMER_CLASSES = ("lib.model.deformer.ForwardDeformer",
                    "lib.model.fast_deformer.FastForwardDeformer")
# `mode` of the deformer entry in checkpoints written before configs/deformer/ existed
LEGACY_DEFORMER_MODES = {"exact": DEFORMER_CLASSES[0], "fast": DEFORMER_CLASSES[1]}
# every `_target_` a checkpoint may hold (lib/utils/checkpoint_io.read_checkpoint)
ALLOWED_TARGETS = frozenset(NETWORK_BUILDERS) | frozenset(DEFORMER_CLASSES)

_SCALARS = (str, int, float, bool, type(None))


class NetworkConfigError(ValueError):
    """A network configuration names an unknown builder or an argument it does not take."""


def _plain_value(value: Any) -> bool:
    if isinstance(value, _SCALARS):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain_value(v) for v in value)
    return False


def _checked_target(cfg, where: str, allowed, what: str) -> str:
    if not isinstance(cfg, dict):
        raise NetworkConfigError(f"{where}: expected a mapping with _target_, got "
                                 f"{type(cfg).__name__}")
    target = cfg.get("_target_")
    if target not in allowed:
        raise NetworkConfigError(f"{where}: _target_ {target!r} is not one of this project's "
                                 f"{what} ({', '.join(sorted(allowed))})")
    return target


def _arguments(cfg: dict, where: str, target: str, accepted: set[str], derived) -> dict:
    """The config's arguments for `target` (all but `_target_`), each checked: a parameter
    of the target (`accepted`), not a derived one, a plain value."""
    kwargs = {}
    for key, value in cfg.items():
        if key == "_target_":
            continue
        if key not in accepted:
            raise NetworkConfigError(f"{where}: {target} takes no argument {key!r} "
                                     f"(it takes {', '.join(sorted(accepted))})")
        if key in derived:
            raise NetworkConfigError(f"{where}.{key} is derived from the other modules and "
                                     "cannot be set")
        if not _plain_value(value):
            raise NetworkConfigError(f"{where}.{key} must be a number, string, bool, None or a "
                                     f"list of those, got {type(value).__name__}")
        kwargs[key] = value
    return kwargs


def build_network(cfg: dict, where: str, **derived: Any) -> nn.Module:
    """Build one network from its config entry.

    cfg: `{"_target_": <a key of NETWORK_BUILDERS>, <argument>: <plain value>, ...}`, as in
    configs/network/*.yaml; where: the entry's name for messages (e.g. 'model.occ_network');
    derived: the sizes GANHead computes (feature widths, joint counts), which the config may
    not set. Returns the module.
    """
    target = _checked_target(cfg, where, NETWORK_BUILDERS, "network builders")
    builder = NETWORK_BUILDERS[target]
    accepted = set(inspect.signature(builder).parameters)
    return builder(**_arguments(cfg, where, target, accepted, derived), **derived)


def deformer_config(cfg: dict, where: str) -> dict:
    """The deformer entry with its `_target_`: as given, or (checkpoints written before
    configs/deformer/) its `mode` (exact | fast; absent: exact) read as that class."""
    if not isinstance(cfg, dict) or "_target_" in cfg:
        if isinstance(cfg, dict) and "mode" in cfg:
            raise NetworkConfigError(f"{where}: give the deformer by _target_ "
                                     "(configs/deformer/) or by the old mode key, not both")
        return cfg
    rest = dict(cfg)
    mode = rest.pop("mode", "exact")
    if mode not in LEGACY_DEFORMER_MODES:
        raise NetworkConfigError(f"{where}.mode must be one of "
                                 f"{', '.join(LEGACY_DEFORMER_MODES)}, got {mode!r}")
    return {"_target_": LEGACY_DEFORMER_MODES[mode], **rest}


def build_deformer(cfg: dict, where: str, **derived: Any) -> nn.Module:
    """Build the deformer from its config entry.

    cfg: `{"_target_": <one of DEFORMER_CLASSES>, <argument>: <plain value>, ...}`, as in
    configs/deformer/*.yaml (without the networks placed beside it), or a checkpoint's
    older `{"mode": ..., ...}` (deformer_config); where: the entry's name for messages;
    derived: what GANHead supplies (lbs_net, n_joints, bbox_min, bbox_max), passed to the
    class where it takes them and never settable by the config. Returns the module.
    """
    cfg = deformer_config(cfg, where)
    target = _checked_target(cfg, where, DEFORMER_CLASSES, "deformers")
    module, name = target.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    accepted = set(inspect.signature(cls).parameters)
    kwargs = _arguments(cfg, where, target, accepted, derived)
    return cls(**kwargs, **{k: v for k, v in derived.items() if k in accepted})
