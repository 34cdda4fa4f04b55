"""Checkpoints of the original GANHead code, read safely and converted to this project's.

Shape legend: V FLAME vertices, Q pose-feature size (36), S identity components used (100),
X expression components used (50), n_subjects latent rows (training scans).

The original saves PyTorch Lightning 1.3 checkpoints: a `state_dict` and Lightning's
bookkeeping, no `hyper_parameters`; its latent rows follow its data list's order; it holds
up to four copies of the FLAME arrays (scaled x6, template shifted in z); its callbacks are
stored under their classes. `read_foreign_checkpoint` loads such a file without running
any code from it: torch's `weights_only` unpickler with every class the file names replaced
by an inert placeholder (the names are listed before loading; nothing named is imported or
called). `convert_original` maps every tensor onto this project's GANHead (README: Using
the released checkpoints) and accounts for each: mapped, dropped with a reason, or an error
naming it.
"""
from __future__ import annotations

import csv
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lib.utils.checkpoint_io import CheckpointError

__all__ = ["read_foreign_checkpoint", "looks_original", "infer_stage", "check_flame_copies",
           "convert_original", "ConversionReport", "FLAME_PREFIXES"]

# module prefixes under which the original holds a FLAME layer (BaseModel.flame,
# ForwardDeformer.flame, FLAMEServer.flame and the GAN losses' copies when present)
FLAME_PREFIXES = ("flame.", "deformer.flame.", "flame_server.flame.")
_FLAME_BUFFER = re.compile(r"^(?P<prefix>(?:[A-Za-z_]+\.)*?flame\.)(?P<name>[A-Za-z_]+)$")


# ------------------------------------------------------------------------------ reading
def _placeholder(name: str) -> type:
    """An inert class standing for a class the file names (never imported or called)."""
    def init(self, *args, **kwargs):
        self.args = args
    return type("ForeignObject", (), {"__module__": "lib.model.original_checkpoint",
                                      "foreign_name": name, "__init__": init,
                                      "__setstate__": lambda self, state: None,
                                      "__repr__": lambda self: f"<foreign {name}>"})


def read_foreign_checkpoint(path, map_location="cpu") -> dict:
    """Load a Lightning checkpoint written by other code without running any of it.

    path: the file; map_location: torch.load's. Returns the checkpoint dict; objects of
    classes the file names (e.g. Lightning 1.3 stores its callbacks under their classes) come
    back as inert placeholders. Raises CheckpointError naming the file when it is missing,
    not a torch file, or has no dict `state_dict`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        with torch.serialization.safe_globals([(_placeholder(n), n) for n in names]):
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here means "not readable"
        blocked = re.search(r"GLOBAL (\S+) whose module \S+ is blocked", str(err))
        if blocked:  # torch refuses these names whatever the allow-list (os, subprocess, ...)
            raise CheckpointError(f"{path}: refused: it names {blocked.group(1)}, which only a "
                                  "file made to run code holds") from None
        msg = " ".join(str(err).split())[:200]
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated, or not written "
                              f"by torch.save: {type(err).__name__}: {msg})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict' dict)")
    bad = [k for k, v in checkpoint["state_dict"].items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state_dict entry {bad[0]!r} is not a tensor")
    return checkpoint


def looks_original(state: dict) -> bool:
    """True when a state dict has the original GANHead's layout (its occupancy network is
    `network.lin<l>` with weight-norm `weight_g`/`weight_v`)."""
    return any(k.startswith("network.lin") and k.endswith(".weight_v") for k in state)


def infer_stage(state: dict) -> str:
    """'fine' when the normal network's tensors are present (the original builds the normal
    and texture networks only in stage 2), else 'coarse'."""
    return "fine" if any(k.startswith("norm_network.") for k in state) else "coarse"


# ------------------------------------------------------------------------------ FLAME copies
def _flame_reference(flame_model, n_shape: int, n_exp: int) -> dict[str, np.ndarray]:
    """The arrays the original's FLAME layer derives from a model file (float64): scaled x6,
    template shifted so that its z range is centred."""
    from lib.flame.flame import SCALE_FACTOR
    from lib.flame.loader import load_flame_model

    m = load_flame_model(flame_model, n_shape=n_shape, n_exp=n_exp)
    s = SCALE_FACTOR
    vt = np.asarray(m["v_template"], dtype=np.float64) * s
    vt[:, 2] -= (vt[:, 2].min() + vt[:, 2].max()) / 2.0
    V = vt.shape[0]
    posedirs = np.asarray(m["posedirs"], dtype=np.float64)                     # [V, 3, Q]
    jreg = m["J_regressor"]                                                    # may be sparse
    return {
        "v_template": vt,
        "shapedirs": np.concatenate([m["shapedirs"][..., :n_shape],                 # [V, 3, S+X]
                                     m["shapedirs"][..., 300:300 + n_exp]], axis=-1) * s,
        "posedirs": posedirs.reshape(V * 3, -1).T * s,                         # [Q, 3 V]
        "J_regressor": np.asarray(jreg.toarray() if hasattr(jreg, "toarray") else jreg,
                                  dtype=np.float64),
        "lbs_weights": np.asarray(m["weights"], dtype=np.float64),
        "faces_tensor": np.asarray(m["f"], dtype=np.int64),
    }


def check_flame_copies(state: dict, flame_model, n_shape: int = 100, n_exp: int = 50,
                       where: str = "checkpoint") -> list[str]:
    """Compare every FLAME copy in an original state dict with a FLAME file.

    state: the original's state dict; flame_model: generic_model.pkl (or a synthetic model in
    its layout). Returns the copies' prefixes. Raises CheckpointError naming the copy, the
    array and the largest difference when one differs (relative 1e-5 of the array's range).
    """
    ref = _flame_reference(flame_model, n_shape, n_exp)
    prefixes = sorted({k[: -len("v_template")] for k in state if k.endswith("flame.v_template")})
    for p in prefixes:
        for name, want in ref.items():
            key = p + name
            if key not in state:
                continue
            got = state[key].detach().double().cpu().numpy()
            if got.shape != want.shape:
                raise CheckpointError(
                    f"{where}: {key} has shape {got.shape}, the FLAME file {flame_model} gives "
                    f"{want.shape}: the checkpoint was trained with another head model")
            err = float(np.abs(got - want).max()) if got.size else 0.0
            tol = 1e-5 * max(float(np.abs(want).max()), 1e-6)
            if err > tol:
                raise CheckpointError(
                    f"{where}: {key} differs from the FLAME file {flame_model} (x6, z-centred) "
                    f"by up to {err:.3g}: the checkpoint was trained with another head model; "
                    "pass the FLAME file it was trained with (--flame_model)")
    return prefixes


# ------------------------------------------------------------------------------ mapping
@dataclass
class ConversionReport:
    """What happened to every tensor: mapped (original key -> ours), dropped (key -> reason),
    fresh (our keys the original does not have -> reason)."""

    source: str
    stage: str
    mapped: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    fresh: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"{self.source}: stage {self.stage}, {len(self.mapped)} tensors mapped, "
               f"{len(self.dropped)} dropped, {len(self.fresh)} initialised fresh"]
        reasons: dict[str, int] = {}
        for r in self.dropped.values():
            reasons[r] = reasons.get(r, 0) + 1
        out += [f"  dropped {n}: {r}" for r, n in sorted(reasons.items())]
        fresh: dict[str, int] = {}
        for r in self.fresh.values():
            fresh[r] = fresh.get(r, 0) + 1
        out += [f"  fresh {n}: {r}" for r, n in sorted(fresh.items())]
        return out


def _implicit_rules(theirs: str, ours: str) -> list[tuple[re.Pattern, Callable[[re.Match], str]]]:
    """Key rules of one original ImplicitNetwork (weight-norm `lin<l>`) onto one of ours
    (`layers.<l>` with torch's weight-norm parametrization: original0 = g, original1 = v)."""
    t = re.escape(theirs)
    return [
        (re.compile(rf"^{t}lin(\d+)\.weight_g$"),
         lambda m: f"{ours}layers.{m.group(1)}.parametrizations.weight.original0"),
        (re.compile(rf"^{t}lin(\d+)\.weight_v$"),
         lambda m: f"{ours}layers.{m.group(1)}.parametrizations.weight.original1"),
        (re.compile(rf"^{t}lin(\d+)\.weight$"), lambda m: f"{ours}layers.{m.group(1)}.weight"),
        (re.compile(rf"^{t}lin(\d+)\.bias$"), lambda m: f"{ours}layers.{m.group(1)}.bias"),
    ]


def read_data_list_ids(path) -> list[str]:
    """Scan ids of a data list CSV (column `id`, in file order: the original's row order)."""
    from lib.dataset.faceverse import validate_scan_id

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: data list not found")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "id" not in rows[0]:
        raise CheckpointError(f"{path}: not a data list (a CSV with an 'id' column)")
    ids = [validate_scan_id(str(r["id"]).strip(), str(path), error=CheckpointError) for r in rows]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise CheckpointError(f"{path}: ids repeat ({dup})")
    return ids


# ------------------------------------------------------------------------------ sizes
def _lin_shapes(state: dict, prefix: str) -> list[tuple[int, int]]:
    """(out, in) of an original ImplicitNetwork's layers lin0..linL (weight-norm or plain)."""
    shapes, l = [], 0
    while True:
        w = state.get(f"{prefix}lin{l}.weight_v", state.get(f"{prefix}lin{l}.weight"))
        if w is None:
            break
        shapes.append((int(w.shape[0]), int(w.shape[1])))
        l += 1
    return shapes


def implicit_sizes(state: dict, prefix: str, cond_dim: int, where: str) -> dict:
    """width, depth, multires and skip_layer of an original ImplicitNetwork whose layer 0 takes
    the encoded point and a condition of width cond_dim (its only conditioned layer).
    Raises CheckpointError naming the network when its shapes fit no such layout."""
    shapes = _lin_shapes(state, prefix)
    if len(shapes) < 2:
        raise CheckpointError(f"{where}: no layers {prefix}lin0, {prefix}lin1, ... found")
    E = shapes[0][1] - cond_dim
    if E < 3 or (E - 3) % 6:
        raise CheckpointError(f"{where}: {prefix}lin0 takes {shapes[0][1]} inputs, which is not "
                              f"a positional encoding (3 + 6 k) plus the {cond_dim}-wide condition")
    skips = []
    for l in range(1, len(shapes)):
        extra = shapes[l][1] - shapes[l - 1][0]
        if extra == E:
            skips.append(l)
        elif extra != 0:
            raise CheckpointError(f"{where}: {prefix}lin{l} takes {shapes[l][1]} inputs after "
                                  f"{shapes[l - 1][0]} outputs (neither a plain nor a skip layer)")
    if len(skips) > 1:
        raise CheckpointError(f"{where}: {prefix} has skips at layers {skips}; one is supported")
    return {"width": max(o for o, _ in shapes[:-1]), "depth": len(shapes) - 1,
            "multires": (E - 3) // 6, "skip_layer": skips[0] if skips else None}


def compose_model_config(stage: str, overrides: list[str]) -> dict:
    """The model block of this project's default configuration (configs/config.yaml, with
    +experiments=fine for stage 2) and the given Hydra overrides, as plain containers."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    configs = str(Path(__file__).resolve().parents[2] / "configs")
    extra = ["+experiments=fine"] if stage == "fine" else []
    with initialize_config_dir(config_dir=configs, version_base="1.3"):
        cfg = compose(config_name="config", overrides=extra + list(overrides))
    return OmegaConf.to_container(cfg.model, resolve=True)


# ------------------------------------------------------------------------------ key rules
Rule = tuple[re.Pattern, Callable[[re.Match], str]]


def _direct(theirs: str, ours: str) -> Rule:
    return re.compile(rf"^{re.escape(theirs)}$"), lambda m: ours


def _generator_rules() -> list[Rule]:
    """The original's generator (shape_code, lin_code, enc<l>, lin<l>) onto ours."""
    return [
        _direct("generator.shape_code", "generator.const"),
        (re.compile(r"^generator\.lin_code\.(weight|bias)$"),
         lambda m: f"generator.adain0.style.{m.group(1)}"),
        (re.compile(r"^generator\.enc(\d+)\.(weight|bias)$"),
         lambda m: f"generator.convs.{m.group(1)}.{m.group(2)}"),
        (re.compile(r"^generator\.lin(\d+)\.(weight|bias)$"),
         lambda m: f"generator.adains.{m.group(1)}.style.{m.group(2)}"),
    ]


def _discriminator_rules(theirs: str, ours: str) -> list[Rule]:
    """The original's StyleGAN2 residual critic (GANLoss.discriminator) onto ours."""
    t = re.escape(theirs)
    table = [
        (r"conv_in\.0\.weight", lambda m: "conv_in.weight"),
        (r"conv_in\.1\.bias", lambda m: "conv_in.bias"),
        (r"layers\.(\d+)\.conv1\.0\.weight", lambda m: f"blocks.{m.group(1)}.conv1.weight"),
        (r"layers\.(\d+)\.conv1\.1\.bias", lambda m: f"blocks.{m.group(1)}.conv1.bias"),
        (r"layers\.(\d+)\.conv2\.0\.kernel", lambda m: f"blocks.{m.group(1)}.blur.kernel"),
        (r"layers\.(\d+)\.conv2\.1\.weight", lambda m: f"blocks.{m.group(1)}.conv2.weight"),
        (r"layers\.(\d+)\.conv2\.2\.bias", lambda m: f"blocks.{m.group(1)}.conv2.bias"),
        (r"layers\.(\d+)\.skip\.0\.kernel", lambda m: f"blocks.{m.group(1)}.skip_blur.kernel"),
        (r"layers\.(\d+)\.skip\.1\.weight", lambda m: f"blocks.{m.group(1)}.skip.weight"),
        (r"disc_out\.conv_stddev\.0\.weight", lambda m: "conv.weight"),
        (r"disc_out\.conv_stddev\.1\.bias", lambda m: "conv.bias"),
        (r"disc_out\.final_linear\.1\.(weight|bias)", lambda m: f"fc.{m.group(1)}"),
        (r"disc_out\.final_linear\.2\.(weight|bias)", lambda m: f"out.{m.group(1)}"),
    ]
    return [(re.compile(rf"^{t}{pat}$"), (lambda f: lambda m: ours + f(m))(fn))
            for pat, fn in table]


def _network_rules() -> list[Rule]:
    """Latent tables and the implicit networks."""
    rules: list[Rule] = [_direct(f"{t}.weight", f"{t}.weight")
                         for t in ("z_shapes", "z_details", "z_colors")]
    rules += _implicit_rules("network.", "occ_network.")
    rules += _implicit_rules("deformer.disp_network.", LBS_TARGETS["disp"])
    rules += _implicit_rules("deformer.lbs_network.", LBS_TARGETS["lbs"])
    rules.append((re.compile(r"^deformer\.lbs_network\.blendshapes\.(weight|bias)$"),
                  lambda m: f"{LBS_TARGETS['tail']}{m.group(1)}"))
    rules += _implicit_rules("norm_network.", "norm_network.")
    rules += _implicit_rules("tex_network.", "tex_network.")
    return rules


# where this project keeps the displacement and skinning networks (state-dict prefixes)
LBS_TARGETS = {"disp": "disp_net.", "lbs": "deformer.lbs_net.lbs.net.",
               "tail": "deformer.lbs_net.lbs.net.tail."}


def _hydra_value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_hydra_value(x) for x in v) + "]"
    return str(v)


def _size_overrides(state: dict, where: str) -> tuple[list[str], dict]:
    """Hydra overrides that give this project's networks the original checkpoint's sizes,
    and the sizes themselves (for the report)."""
    need = ["z_shapes.weight", "z_details.weight", "z_colors.weight", "generator.shape_code"]
    missing = [k for k in need if k not in state]
    if missing:
        raise CheckpointError(f"{where}: lacks {missing} (not a complete GANHead checkpoint)")
    dims = {k: int(state[f"z_{k}s.weight"].shape[1]) for k in ("shape", "detail", "color")}
    const = state["generator.shape_code"]
    channels, l = [], 0
    while f"generator.enc{l}.weight" in state:
        channels.append(int(state[f"generator.enc{l}.weight"].shape[0]))
        l += 1
    sizes = {"dim_shape": dims["shape"], "dim_detail": dims["detail"], "dim_color": dims["color"],
             "generator.base_channels": int(const.shape[1]),
             "generator.base_shape": [int(s) for s in const.shape[2:]],
             "generator.channels": channels}
    n_shape = 100
    occ = implicit_sizes(state, "network.", channels[-1], where)
    sizes.update({f"occ_network.{k}": v for k, v in occ.items()})
    sizes.update({f"deformer.lbs_network.{k}": v for k, v in
                  implicit_sizes(state, "deformer.lbs_network.", 0, where).items()
                  if k != "skip_layer"})
    disp = implicit_sizes(state, "deformer.disp_network.", n_shape, where)
    sizes.update({"deformer.disp_network.width": disp["width"],
                  "deformer.disp_network.depth": disp["depth"]})
    if infer_stage(state) == "fine":
        geo_feat = occ["width"] - (3 + 6 * occ["multires"]) if occ["skip_layer"] == occ["depth"] \
            else occ["width"]
        norm = implicit_sizes(state, "norm_network.", dims["detail"] + geo_feat, where)
        sizes.update({f"norm_network.{k}": v for k, v in norm.items()})
        norm_feat = norm["width"] - (3 + 6 * norm["multires"]) \
            if norm["skip_layer"] == norm["depth"] else norm["width"]
        tex = implicit_sizes(state, "tex_network.", dims["color"] + 65 + geo_feat + norm_feat,
                             where)
        sizes.update({f"tex_network.{k}": v for k, v in tex.items()})
    for name, prefix in (("normal", "gan_loss.discriminator."),
                         ("color", "gan_loss_color.discriminator.")):
        w = state.get(prefix + "conv_in.0.weight")
        if w is None:
            continue
        blocks = len({k.split(".")[len(prefix.split(".")) ] for k in state
                      if k.startswith(prefix + "layers.")})
        widths = [int(v.shape[0]) for k, v in state.items()
                  if k.startswith(prefix) and k.endswith(".weight") and v.dim() == 4]
        sizes["discriminator.img_res"] = 4 * 2 ** blocks
        sizes["discriminator.channel_mul"] = int(w.shape[0])
        sizes["discriminator.channel_max"] = max(widths)
        sizes[f"use_gan{'' if name == 'normal' else '_color'}"] = True
    return [f"model.{k}={_hydra_value(v)}" for k, v in sizes.items()], sizes


def _drop_reason(key: str, flame_prefixes: list[str], gen_stages: int) -> str | None:
    """Why an original tensor has no counterpart here (None: it must be mapped)."""
    for p in flame_prefixes:
        if key.startswith(p):
            return ("a copy of the FLAME arrays (checked against --flame_model; this project "
                    "rebuilds them from the file)")
    m = re.match(r"^generator\.lin(\d+)\.(weight|bias)$", key)
    if m and int(m.group(1)) == gen_stages - 1:
        return "the original's unused modulation layer of the generator's last stage"
    return None


def convert_original(ckpt, flame_model, data_list, stage: str | None = None,
                     seed: int = 0) -> tuple[dict, ConversionReport]:
    """An original GANHead checkpoint as a checkpoint of this project.

    ckpt: the original's Lightning checkpoint; flame_model: the FLAME file it was trained
    with (generic_model.pkl); data_list: its data list CSV (row i of the latent tables is the
    scan on line i); stage: 'coarse' | 'fine' to insist on one (default: inferred from the
    tensors); seed: for the networks the original file does not hold (a stage-1 file has no
    normal/texture networks; they start fresh, as in this project's own stage-1 checkpoints).
    Returns (checkpoint dict for torch.save, report). Raises CheckpointError naming the file
    and the tensor, the FLAME array, or the layout that does not fit.
    """
    import pytorch_lightning as pl

    from lib.dataset.preprocessing import file_sha256
    from lib.model.ganhead import GANHead

    ckpt, flame_model, data_list = Path(ckpt), Path(flame_model), Path(data_list)
    src = read_foreign_checkpoint(ckpt)
    state = src["state_dict"]
    if not looks_original(state):
        if any(k.startswith("occ_network.") for k in state):
            raise CheckpointError(f"{ckpt}: already a checkpoint of this project (it has "
                                  "occ_network.*): it needs no conversion")
        raise CheckpointError(f"{ckpt}: not a checkpoint of the original GANHead (no "
                              f"network.lin*.weight_v; first keys {sorted(state)[:4]})")
    found = infer_stage(state)
    if stage is not None and stage != found:
        raise CheckpointError(f"{ckpt}: --stage {stage} asked, but its tensors are a {found} "
                              "checkpoint (the normal and texture networks are "
                              f"{'present' if found == 'fine' else 'absent'})")
    flame_prefixes = check_flame_copies(state, flame_model, where=str(ckpt))
    ids = read_data_list_ids(data_list)
    rows = int(state["z_shapes.weight"].shape[0]) if "z_shapes.weight" in state else -1
    if len(ids) != rows:
        raise CheckpointError(f"{data_list}: lists {len(ids)} scans, but {ckpt} has {rows} latent "
                              "rows; pass the data list it was trained with (the original's "
                              "lib/dataset/faceverse.csv for the released models)")
    overrides, sizes = _size_overrides(state, str(ckpt))
    hp = compose_model_config(found, overrides)
    hp.update(stage=found, flame_model=str(flame_model), scan_ids=ids)
    torch.manual_seed(seed)
    model = GANHead(**hp)
    template = model.state_dict()
    report = ConversionReport(source=str(ckpt), stage=found)
    rules = _generator_rules() + _network_rules() \
        + _discriminator_rules("gan_loss.discriminator.", "disc_normal.") \
        + _discriminator_rules("gan_loss_color.discriminator.", "disc_color.")
    new_state = {}
    gen_stages = len(sizes["generator.channels"])
    for key in sorted(state):
        why = _drop_reason(key, flame_prefixes, gen_stages)
        if why is not None:
            report.dropped[key] = why
            continue
        target = next((fn(m) for pat, fn in rules for m in [pat.match(key)] if m), None)
        if target is None:
            raise CheckpointError(f"{ckpt}: tensor {key!r} {tuple(state[key].shape)} is not one "
                                  "of the original GANHead's (no rule maps it)")
        if target not in template:
            raise CheckpointError(f"{ckpt}: tensor {key!r} maps to {target!r}, which this "
                                  "project's model does not have")
        if tuple(template[target].shape) != tuple(state[key].shape):
            raise CheckpointError(
                f"{ckpt}: tensor {key!r} has shape {tuple(state[key].shape)}, but {target!r} "
                f"is {tuple(template[target].shape)} with the sizes read from the file")
        if target in new_state:
            raise CheckpointError(f"{ckpt}: two tensors map to {target!r}")
        new_state[target] = state[key].detach().to(template[target].dtype).clone()
        report.mapped[key] = target
    for key, value in template.items():
        if key in new_state:
            continue
        if found == "coarse" and key.startswith(("norm_network.", "tex_network.")):
            report.fresh[key] = ("stage-2 network, not in a stage-1 checkpoint (initialised as "
                                 "train.py does)")
        elif key in ("bbox_min", "bbox_max", "gan_step"):
            report.fresh[key] = "this project's bookkeeping buffer (from the configuration)"
        else:
            raise CheckpointError(f"{ckpt}: has no tensor for this project's {key!r} "
                                  f"{tuple(value.shape)}")
        new_state[key] = value.detach().clone()
    checkpoint = {
        "state_dict": new_state,
        "hyper_parameters": hp,
        "epoch": int(src.get("epoch", 0) or 0),
        "global_step": int(src.get("global_step", 0) or 0),
        "pytorch-lightning_version": pl.__version__,
        "flame_fingerprint": model.flame_server.flame.fingerprint(),
        "converted_from": {"path": str(ckpt), "sha256": file_sha256(ckpt), "stage": found,
                           "data_list": str(data_list), "sizes": sizes},
    }
    return checkpoint, report


def conversion_hint(path) -> str | None:
    """When `path` is a checkpoint of the original GANHead code: the message that tells how to
    convert it (for the loaders of this project to raise); else None."""
    try:
        state = read_foreign_checkpoint(path)["state_dict"]
    except CheckpointError:
        return None
    if not looks_original(state):
        return None
    return (f"{path}: a checkpoint of the original GANHead code; convert it first: python "
            f"tools/convert_original.py --ckpt {path} --out OUT.ckpt --flame_model "
            "generic_model.pkl --data_list faceverse.csv [--stage coarse|fine] (README: Using "
            "the released checkpoints)")
