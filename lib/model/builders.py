"""Networks built from configuration data through an allow-list, never by instantiating a
target read from a file.

Shape-free. The Hydra network configs (configs/network/*.yaml) name their builder with
`_target_`; the same dicts are stored in every checkpoint's hyper-parameters. Handing them to
`hydra.utils.instantiate` would let a checkpoint name any callable (`os.system`, also nested
inside a width value), so GANHead builds its networks with `build_network`, which:

- accepts only the targets in `NETWORK_BUILDERS` (this project's own network builders);
- accepts as arguments only the builder's own parameter names, each with a plain value
  (number, string, bool, None, or a list of those); a dict anywhere (a nested `_target_`) is
  refused;
- refuses configuration keys that collide with the sizes GANHead derives itself (those are
  passed as `derived`, computed from the other modules, never typed twice).

Failures raise `NetworkConfigError` naming the config entry and the key.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch.nn as nn

from lib.model import networks

__all__ = ["NETWORK_BUILDERS", "NetworkConfigError", "build_network"]

NETWORK_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "lib.model.networks.build_geometry_network": networks.build_geometry_network,
    "lib.model.networks.build_displacement_network": networks.build_displacement_network,
    "lib.model.networks.build_normal_network": networks.build_normal_network,
    "lib.model.networks.build_texture_network": networks.build_texture_network,
    "lib.model.networks.LBSNetwork": networks.LBSNetwork,
}

_SCALARS = (str, int, float, bool, type(None))


class NetworkConfigError(ValueError):
    """A network configuration names an unknown builder or an argument it does not take."""


def _plain_value(value: Any) -> bool:
    if isinstance(value, _SCALARS):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain_value(v) for v in value)
    return False


def build_network(cfg: dict, where: str, **derived: Any) -> nn.Module:
    """Build one network from its config entry.

    cfg: `{"_target_": <a key of NETWORK_BUILDERS>, <argument>: <plain value>, ...}`, as in
    configs/network/*.yaml; where: the entry's name for messages (e.g. 'model.occ_network');
    derived: the sizes GANHead computes (feature widths, joint counts), which the config may
    not set. Returns the module.
    """
    if not isinstance(cfg, dict):
        raise NetworkConfigError(f"{where}: expected a mapping with _target_, got "
                                 f"{type(cfg).__name__}")
    target = cfg.get("_target_")
    if target not in NETWORK_BUILDERS:
        raise NetworkConfigError(
            f"{where}: _target_ {target!r} is not one of this project's network builders "
            f"({', '.join(sorted(NETWORK_BUILDERS))})")
    builder = NETWORK_BUILDERS[target]
    accepted = set(inspect.signature(builder).parameters)
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
    return builder(**kwargs, **derived)
