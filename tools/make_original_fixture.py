"""Write a tiny checkpoint made by the ORIGINAL GANHead code, with that code's outputs on
fixed inputs, for the checkpoint converter's equivalence test.

    python tools/make_original_fixture.py --original /path/to/GANHead-checkout \
        --out tests/data/original_fixture [--seed 0] [--full-checkpoint PATH]

The original code is never part of this project: this tool imports it from the checkout
named by --original, runs it on CPU, and writes only numbers and their description
(README.md, manifest.json). Nothing in lib/ or in the always-on tests imports it.

What it does, in order:
1. Head model: this project's synthetic FLAME-format model (build_head_model(seed)) is
   written to a temporary lib/flame/flame_model/generic_model.pkl, with a synthetic
   landmark_embedding.npy beside it (the original's file indexes real FLAME faces; ours has
   its keys, shapes and dtypes, with valid face indices of the synthetic mesh drawn from the
   seed). The original's FLAME() opens '../../lib/flame/flame_model/...' relative to the
   working folder, so the tool runs from a folder two levels below that temporary root; the
   original's files are not touched.
2. Imports the original with stub modules for what it cannot have here (see STUBS below):
   each stub imports, and raises RuntimeError when anything in it is called.
3. Builds lib.ganhead_model.BaseModel from the original's own config files (config.yaml,
   datamodule/faceverse.yaml, network/*.yaml, experiments/fine.yaml) with small widths
   (SMALL below), stage 'fine', use_gan and use_gan_color on.
4. Shrinks two parts whose sizes the original hard-codes, with the original's own classes:
   the generator (h_dim 256, constant 1x256x2x8x8, channels 256->128->64->64) gets a
   1x16x1x2x2 constant and channels 16->8->8->8 (same parameter names and kinds: shape_code,
   lin_code, enc{l} Conv3d, lin{l} Linear), so its volume is [B, 8, 8, 16, 16]; each
   discriminator (StyleDiscriminator(3, img_res), ch_mul 64) is rebuilt as
   StyleDiscriminator(3, img_res, ch_mul=8, ch_max=16).
5. Draws every parameter from a seeded generator (randomize), the zero-initialised ones
   (blendshapes head, latent embeddings) included, at sizes that keep the deformation
   invertible and the outputs well conditioned. FLAME's eye_pose/neck_pose stay zero.
6. Runs the original's functions on seeded inputs and saves their outputs (outputs.npz).
7. Saves the checkpoint as the original's Lightning 1.3.8 would (state_dict, epoch,
   global_step, pytorch-lightning_version, callbacks, optimizer_states, lr_schedulers; no
   hyper_parameters), except that the FLAME arrays whose size grows with the vertex count
   (STRIPPED) are left out of every FLAME copy: with the synthetic head (7326 vertices) they
   weigh about 17 MB per copy, four copies. The manifest lists them with shape, dtype and
   sha256, and flame_buffers() below rebuilds them from the head model exactly (the tool
   checks this bitwise). --full-checkpoint also writes the unstripped checkpoint.

The run is deterministic: a second run writes byte-identical files.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import types
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_COMMIT = "76c98ce"
PL_VERSION = "1.3.8"

# Config values set on top of the original's config (keys are the original's).
N_SUBJECTS = 3
GEN_CONST = (16, 1, 2, 2)          # shrunk generator constant: channels, D, H, W
GEN_CHANNELS = (8, 8, 8)           # shrunk generator channels after each upsampling
DISC_CH_MUL, DISC_CH_MAX = 8, 16   # shrunk discriminator widths
SMALL = {
    "dim_shape": 16, "dim_detail": 8, "dim_color": 8,
    "img_res": 8, "use_gan": True, "use_gan_color": True,
    "network": {"width": 32, "latent_cond_dim": GEN_CHANNELS[-1]},
    "deformer": {"lbs_network": {"width": 32}, "disp_network": {"width": 32}},
    # width 48: the skip layer's output is width - 39 (multires 6), so 32 would not do.
    # feat_cond_dim = shape width - shape embedding (3 + 3*2*4) = 5; tex adds the normal
    # network's last feature (48); tex latent = dim_color + 65 (pose 15 + expression 50).
    "norm_network": {"width": 48, "feat_cond_dim": 5},
    "tex_network": {"width": 48, "feat_cond_dim": 5 + 48, "latent_cond_dim": 8 + 65},
}

# --size full: the original's own sizes; only its config inconsistency is fixed (config.yaml's
# dim_color 256 against tex.yaml's latent_cond_dim 129 = 64 + 65 would crash: 64), with both
# critics on. Used by the GANHEAD_ORIGINAL test (tests/test_original_equivalence.py), never
# committed.
FULL = {"dim_color": 64, "use_gan": True, "use_gan_color": True}

# Smaller draws for three heads: (factor on the weights or weight-norm gains, bias std).
DISP_LAST = (0.02, 0.01)      # displacement network's last layer: offsets ~1e-2
LBS_LAST = (3.0, 0.1)         # skinning network's last layer: sharp weights (logits x20)
BLENDSHAPES = (0.01, 0.002)   # blendshapes head: shape/pose directions ~1e-2

# FLAME buffers whose size grows with the vertex count, left out of the saved checkpoint.
STRIPPED = ("faces_tensor", "v_template", "shapedirs", "posedirs", "J_regressor", "lbs_weights")
STRIPPED_RE = re.compile(r"(^|\.)flame\.(" + "|".join(STRIPPED) + r")$")

# Modules the original imports but never calls on the paths run here.
STUBS = {
    "wandb": "experiment logging (train.py, training/validation steps); always stubbed",
    "pyrender": "off-screen depth rendering in forward_2d (not run here)",
    "pytorch3d": "renderer in lib/utils/render.py (imported by FLAME.py) and knn_points in "
                 "FLAME.sample_bases / FlameLoss (not run here)",
    "kaolin": "sided_distance for only_near_flame=True (not run here)",
    "cv2": "rectify_pose and render helpers (not run here)",
    "torchvision": "vis_images grid (not run here)",
    "lib.libmise.mise": "the original's Cython extension for mesh extraction (not built)",
    "lib.utils.render": "the original's own module, always stubbed: importing it builds a "
                        "pytorch3d Renderer on CUDA; FLAME.py imports it for weights2colors, "
                        "BaseModel for plots (not run here)",
}
ALWAYS_STUBBED = ("wandb", "lib.utils.render")
STUB_SUBMODULES = {
    "pytorch3d": ("pytorch3d.renderer", "pytorch3d.renderer.mesh", "pytorch3d.structures",
                  "pytorch3d.ops"),
    "kaolin": ("kaolin.metrics", "kaolin.metrics.pointcloud"),
    "torchvision": ("torchvision.transforms", "torchvision.utils"),
}


# ----------------------------------------------------------------------------- stubs

class _Unavailable:
    """Stands for a name of a stubbed module: attribute access works, calling raises."""

    def __init__(self, what: str):
        self._what = what

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"{self._what}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._what} was called, but it is a stub of "
                           "tools/make_original_fixture.py")


class _StubModule(types.ModuleType):
    def __init__(self, name: str):
        super().__init__(name)
        self.__path__ = []          # a package, so that its submodules import
        self.__file__ = f"<stub {name}>"

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"{self.__name__}.{attr}")


def install_stubs() -> list[str]:
    """Put stub modules in sys.modules for what cannot be imported (ALWAYS_STUBBED always).
    Call with the original on sys.path. -> names stubbed"""
    # Lightning probes optional packages (torchvision...) on import: let it see the truth
    import pytorch_lightning  # noqa: F401
    done = []
    for name in STUBS:
        if name not in ALWAYS_STUBBED:
            try:
                found = importlib.util.find_spec(name) is not None
            except (ImportError, ValueError):
                found = False
            if found:
                continue
        for sub in (name,) + STUB_SUBMODULES.get(name, ()):
            sys.modules[sub] = _StubModule(sub)
        done.append(name)
    return done


# ----------------------------------------------------------------------------- head model

def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def array_digest(a) -> dict:
    """shape, dtype and sha256 of an array's C-order bytes (sparse: of its dense form)."""
    if hasattr(a, "toarray"):
        a = a.toarray()
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.ascontiguousarray(a)
    return {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": sha256(a.tobytes())}


def synthetic_landmarks(n_faces: int, seed: int) -> dict:
    """A landmark embedding in FLAME's layout (keys, shapes, dtypes of the original's
    landmark_embedding.npy) with valid face indices < n_faces. -> dict"""
    rng = np.random.default_rng([seed, 17])

    def bary(*shape):
        b = rng.uniform(0.05, 1.0, size=shape + (3,))
        return b / b.sum(-1, keepdims=True)

    return {
        "static_lmk_faces_idx": rng.integers(0, n_faces, 51).astype(np.int64),
        "static_lmk_bary_coords": bary(51).astype(np.float64),
        "dynamic_lmk_faces_idx": torch.from_numpy(rng.integers(0, n_faces, (79, 17))),
        "dynamic_lmk_bary_coords": torch.from_numpy(bary(79, 17).astype(np.float32)),
        "full_lmk_faces_idx": rng.integers(0, n_faces, (1, 68)).astype(np.int64),
        "full_lmk_bary_coords": bary(1, 68).astype(np.float32),
    }


def flame_buffers(head: dict, n_shape: int = 100, n_exp: int = 50) -> dict:
    """The original FLAME module's vertex-sized buffers, rebuilt from a FLAME-format model
    dict (what STRIPPED leaves out of the checkpoint). It scales by 6 and centres the
    template on z = 0 (midpoint of its z range), all in float32, in the original's order of
    operations, so the result is bitwise equal. head: dict with FLAME's keys -> {name: tensor}
    faces_tensor [F, 3] int64, v_template [V, 3], shapedirs [V, 3, n_shape + n_exp] (identity
    columns :n_shape, expression columns 300:300+n_exp), posedirs [36, 3V] (rows: pose
    features, columns: vertex-major xyz), J_regressor [5, V], lbs_weights [V, 5]."""
    factor = 6
    jreg = head["J_regressor"]
    jreg = jreg.toarray() if hasattr(jreg, "toarray") else np.asarray(jreg)
    v = torch.tensor(np.asarray(head["v_template"], dtype=np.float32) * factor)
    z = v[:, 2]
    v[:, 2] = z + (-(z.max() + z.min()) / 2)
    dirs = torch.tensor(np.asarray(head["shapedirs"], dtype=np.float32))
    dirs = torch.cat([dirs[:, :, :n_shape], dirs[:, :, 300:300 + n_exp]], 2) * factor
    pose = np.asarray(head["posedirs"]).reshape(-1, head["posedirs"].shape[-1]).T
    return {
        "faces_tensor": torch.tensor(np.asarray(head["f"], dtype=np.int64)),
        "v_template": v,
        "shapedirs": dirs,
        "posedirs": torch.tensor(np.asarray(pose, dtype=np.float32) * factor),
        "J_regressor": torch.tensor(np.asarray(jreg, dtype=np.float32)),
        "lbs_weights": torch.tensor(np.asarray(head["weights"], dtype=np.float32)),
    }


def write_head_model(seed: int, tmp: Path) -> tuple[dict, dict]:
    """Build this project's synthetic head model and the landmark file under
    tmp/lib/flame/flame_model/. -> (head model dict, {key: digest})"""
    sys.path.insert(0, str(ROOT))
    from lib.synthetic.head_model import build_head_model, save_head_model
    head = build_head_model(seed)
    folder = tmp / "lib" / "flame" / "flame_model"
    save_head_model(head, folder / "generic_model.pkl")
    np.save(folder / "landmark_embedding.npy",
            np.array(synthetic_landmarks(len(head["f"]), seed), dtype=object), allow_pickle=True)
    digests = {k: array_digest(v) for k, v in head.items() if not isinstance(v, str)}
    # the original is a different package also named `lib`: forget ours
    for name in [m for m in sys.modules if m == "lib" or m.startswith("lib.")]:
        del sys.modules[name]
    sys.path.remove(str(ROOT))
    return head, digests


# ----------------------------------------------------------------------------- original model

def original_config(original: Path, size: str = "tiny"):
    """The original's config (config.yaml's defaults merged in its order, the fine
    experiment on top) with SMALL (size 'tiny') or FULL (size 'full') set. -> the root
    DictConfig"""
    from omegaconf import OmegaConf
    conf = original / "config"
    root = OmegaConf.load(conf / "config.yaml")
    root.pop("defaults")
    # the defaults name datamodule 'renderpeople', which the repository does not have;
    # faceverse.yaml is its only datamodule config
    parts = ["datamodule/faceverse.yaml"] + [f"network/{n}.yaml" for n in
                                            ("lbs", "shape", "disp", "norm", "tex")]
    for part in parts + ["experiments/fine.yaml"]:
        root = OmegaConf.merge(root, OmegaConf.load(conf / part))
    root = OmegaConf.merge(root, {"model": SMALL if size == "tiny" else FULL})
    # hydra 1.3's instantiate detaches the node it is given, so ${model.*} would no longer
    # resolve inside the deformer's config (the original ran hydra 1.0): resolve first
    OmegaConf.resolve(root)
    return root


def shrink_generator(gen, z_dim: int):
    """Replace the generator's hard-coded-size parameters by smaller ones of the same kinds
    and names (see the module docstring)."""
    h = GEN_CONST[0]
    gen.shape_code = torch.nn.Parameter(torch.zeros(1, *GEN_CONST))
    gen.lin_code = torch.nn.Linear(z_dim, 2 * h)
    for l, h_next in enumerate(GEN_CHANNELS):
        setattr(gen, f"enc{l}", torch.nn.Conv3d(h, h_next, kernel_size=3, stride=1, padding=1))
        setattr(gen, f"lin{l}", torch.nn.Linear(z_dim, 2 * h_next))
        h = h_next


def build_model(root_cfg, size: str = "tiny"):
    """The original BaseModel, shrunk unless size is 'full'. -> (model, model config)"""
    from lib.ganhead_model import BaseModel
    from lib.model.discriminator import StyleDiscriminator
    opt = root_cfg.model
    meta_info = types.SimpleNamespace(n_samples=N_SUBJECTS)
    with contextlib.redirect_stdout(io.StringIO()):     # it prints every network
        model = BaseModel(opt=opt, meta_info=meta_info, data_processor=None)
    if size == "full":
        return model.eval(), opt
    shrink_generator(model.generator, opt.dim_shape)
    for loss in (model.gan_loss, model.gan_loss_color):
        loss.discriminator = StyleDiscriminator(3, opt.img_res, ch_mul=DISC_CH_MUL,
                                                ch_max=DISC_CH_MAX)
    return model.eval(), opt


def _last_layer(net) -> str:
    return f"lin{net.num_layers - 2}"


def randomize(model, seed: int) -> None:
    """Draw every parameter from a seeded generator (FLAME's fixed eye/neck pose stay zero).
    Weight-norm directions N(0, 1), gains U(0.5, 1.5); other weights N(0, 1/fan_in) (the
    discriminator's equalised layers N(0, 1): they scale themselves); biases N(0, 0.1);
    latent codes and the generator constant N(0, 1). Smaller: the blendshapes head (its
    shape/pose directions stay ~1e-2), the displacement network's last layer (offsets
    ~2e-2) and the skinning network's last layer (logits x20 stay a soft blend)."""
    g = torch.Generator().manual_seed(seed)
    small = {f"deformer.disp_network.{_last_layer(model.deformer.disp_network)}": DISP_LAST,
             f"deformer.lbs_network.{_last_layer(model.deformer.lbs_network)}": LBS_LAST,
             "deformer.lbs_network.blendshapes": BLENDSHAPES}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if re.search(r"(^|\.)flame\.", name):
                continue
            owner, _, kind = name.rpartition(".")
            scale, bias_std = small.get(owner, (1.0, 0.1))
            if kind == "weight_g":
                new = torch.empty(p.shape).uniform_(0.5, 1.5, generator=g) * scale
            elif kind == "weight_v" or name.endswith("shape_code") or owner.startswith("z_"):
                new = torch.randn(p.shape, generator=g)
            elif kind == "weight" and "discriminator" in name:
                new = torch.randn(p.shape, generator=g)
            elif kind == "weight":
                new = torch.randn(p.shape, generator=g) * scale / np.sqrt(p[0].numel())
            else:
                new = torch.randn(p.shape, generator=g) * bias_std
            p.copy_(new)


# ----------------------------------------------------------------------------- inputs, outputs

def flame_params(rng, n: int) -> np.ndarray:
    """n FLAME parameter vectors [n, 169]: scale 1, translation, pose 15 (global, neck, jaw
    opened, eyes), shape 100, expression 50. Row 0 has a small pose (neck ~0.1 rad, jaw
    opened 0.1-0.3), the rows after it a large one (neck ~0.6 rad about each axis, jaw opened
    0.6-0.7, eyes ~0.3), where some inits of the search fail."""
    big = np.arange(n)[:, None] > 0
    p = np.zeros((n, 169), np.float32)
    p[:, 0] = 1.0
    p[:, 1:4] = rng.normal(0, 0.05, (n, 3))
    p[:, 4:7] = rng.normal(0, 0.15, (n, 3))
    p[:, 7:10] = rng.normal(0, 0.1, (n, 3)) + big * rng.choice([-0.6, 0.6], (n, 3))
    p[:, 10] = np.where(big[:, 0], rng.uniform(0.6, 0.7, n), rng.uniform(0.1, 0.3, n))
    p[:, 11:13] = rng.normal(0, 0.03, (n, 2))
    p[:, 13:19] = rng.normal(0, 0.1, (n, 6)) * np.where(big, 3, 1)
    p[:, 19:119] = rng.normal(0, 0.7, (n, 100))
    p[:, 119:169] = rng.normal(0, 0.5, (n, 50))
    return p


def near_and_box(rng, verts: np.ndarray, n_near: int, n_box: int, sigma: float, box: float):
    """Points near seeded vertices (Gaussian noise sigma) and uniform in [-box, box]^3.
    verts [B, V, 3] -> (points [B, n_near + n_box, 3] float32, vertex ids [B, n_near])"""
    B, V, _ = verts.shape
    ids = np.stack([np.sort(rng.choice(V, n_near, replace=False)) for _ in range(B)])
    near = np.take_along_axis(verts, ids[..., None], 1) + rng.normal(0, sigma, (B, n_near, 3))
    far = rng.uniform(-box, box, (B, n_box, 3))
    return np.concatenate([near, far], 1).astype(np.float32), ids


def as_tensor(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def as_numpy(x):
    return x.detach().cpu().numpy()


def run_original(model, opt, seed: int) -> tuple[dict, dict]:
    """Run the original's functions on seeded inputs. -> (arrays, notes for the manifest)"""
    rng = np.random.default_rng([seed, 1])
    out, notes = {}, {}
    B, N_C, N_D, N_BLEND, N_VERT = 2, 128, 192, 16, 512
    subjects = np.array([0, 2])
    out["subject_index"] = subjects
    params = as_tensor(flame_params(rng, B))
    out["flame_params"] = as_numpy(params)
    notes["flame_params"] = " ".join(flame_params.__doc__.split())

    # FLAME server
    server = model.flame_server
    fl = server(params)
    V = fl["flame_verts"].shape[1]
    vert_ids = np.sort(rng.choice(V, N_VERT, replace=False))
    out["flame_vert_ids"] = vert_ids
    for key in ("flame_tfs", "flame_jnts", "flame_pose_feature"):
        for k in (key, key + "_cano"):
            out[k] = as_numpy(fl[k])
    for k in ("flame_verts", "flame_verts_cano"):
        out[k] = as_numpy(fl[k][:, vert_ids])
    out["server_verts_c_deshaped"] = as_numpy(server.verts_c_deshaped[:, vert_ids])
    out["server_joints_c_deshaped"] = as_numpy(server.joints_c_deshaped)
    out["server_tfs_c"] = as_numpy(server.tfs_c)
    notes["flame_verts"] = "flame_verts, flame_verts_cano, server_verts_c_deshaped: only the " \
                           "vertices flame_vert_ids"

    # codes and cond, through the original's prepare_cond
    idx = torch.from_numpy(subjects)
    batch = {"flame_params": params, "flame_pose_feature": fl["flame_pose_feature"],
             "z_shape": model.z_shapes(idx), "z_detail": model.z_details(idx),
             "z_color": model.z_colors(idx)}
    cond = model.prepare_cond(batch)
    for k in ("z_shape", "z_detail", "z_color"):
        out[k] = as_numpy(batch[k])
    out["volume"] = as_numpy(cond["latent"])
    out["thetas"] = as_numpy(cond["thetas"])

    # canonical points: near the shaped canonical FLAME, and in a box
    pts_c, ids_c = near_and_box(rng, as_numpy(fl["flame_verts_cano"]), N_C - 32, 32, 0.03, 0.9)
    out["pts_c"], out["pts_c_vert_ids"] = pts_c, ids_c
    pts_c = as_tensor(pts_c)
    occ, feat = model.network(pts_c, cond={"latent": cond["latent"], "thetas": cond["thetas"]},
                              val_pad=-1000, return_feat=True, spatial_feat=True, normalize=True)
    out["net_occ"], out["net_feat"] = as_numpy(occ), as_numpy(feat)

    deformer = model.deformer
    lbs_cond = {"betas": cond["betas"], "latent": cond["lbs"]}
    w, sdirs, pdirs = deformer.query_weights(pts_c, cond=lbs_cond)
    blend_rows = (np.arange(B)[:, None] * N_C + np.arange(N_BLEND)).ravel()
    out["blend_point_rows"] = blend_rows
    out["qw_weights"], out["qw_shapedirs"], out["qw_posedirs"] = \
        as_numpy(w), as_numpy(sdirs[blend_rows]), as_numpy(pdirs[blend_rows])
    flat = {k: v.repeat_interleave(N_C, 0) for k, v in lbs_cond.items()}
    w, sdirs, pdirs = deformer._ForwardDeformer__query_weights(pts_c.reshape(-1, 3), flat,
                                                              warp=True)
    out["qw_warp_weights"] = as_numpy(w.reshape(B, N_C, -1))
    out["qw_warp_shapedirs"] = as_numpy(sdirs[blend_rows])
    out["qw_warp_posedirs"] = as_numpy(pdirs[blend_rows])
    notes["blendshapes"] = "qw_*shapedirs/posedirs and fwd_*shapedirs/posedirs: rows " \
                           "blend_point_rows of the flattened [B*N] outputs (the first " \
                           f"{N_BLEND} points of each batch row)"
    out["query_cano"] = as_numpy(deformer.query_cano(pts_c, {"betas": cond["betas"]}))

    # deformed points: near the posed FLAME, and in its bounding box
    verts = as_numpy(fl["flame_verts"])
    pts_d, ids_d = near_and_box(rng, verts, N_D - 16, 0, 0.02, 0)
    lo, hi = verts.min((0, 1)), verts.max((0, 1))
    box = rng.uniform(lo, hi, (B, 16, 3)).astype(np.float32)
    pts_d = np.concatenate([pts_d, box], 1)
    out["pts_d"], out["pts_d_vert_ids"] = pts_d, ids_d
    notes["points"] = (f"pts_c [B, {N_C}, 3]: the first {N_C - 32} are flame_verts_cano[b, "
                       "pts_c_vert_ids[b]] + N(0, 0.03), the rest uniform in [-0.9, 0.9]^3; "
                       f"pts_d [B, {N_D}, 3]: the first {N_D - 16} are flame_verts[b, "
                       "pts_d_vert_ids[b]] + N(0, 0.02), the rest uniform in the posed "
                       "vertices' bounding box")
    pts_d = as_tensor(pts_d)

    cond_tmp = dict(cond, latent=cond["lbs"])
    mask = torch.ones(B, N_D, dtype=torch.bool)
    xc, others = deformer(pts_d, cond_tmp, fl["flame_tfs"], mask=mask, eval_mode=True)
    out["def_xc"], out["def_valid_ids"] = as_numpy(xc), as_numpy(others["valid_ids"])
    out["def_diff"] = as_numpy(others["diff"].reshape(B, N_D, -1))

    res = model(pts_d, fl["flame_tfs"], fl["flame_verts"], cond, eval_mode=True, fine=True)
    for k in ("occ", "pts_c", "valid_mask", "weights", "norm", "color"):
        out["fwd_" + k] = as_numpy(res[k])
    out["fwd_shapedirs"], out["fwd_posedirs"] = \
        as_numpy(res["shapedirs"][blend_rows]), as_numpy(res["posedirs"][blend_rows])
    # with a mask, as forward_2d passes its depth mask: every row keeps as many points (the
    # original's FLAME.forward_pts splits the masked points evenly among the batch)
    keep = np.ones((B, N_D), bool)
    for b in range(B):
        keep[b, rng.choice(N_D, N_D // 8, replace=False)] = False
    out["fwd_masked_mask"] = keep
    res = model(pts_d, fl["flame_tfs"], fl["flame_verts"], cond, eval_mode=True, fine=True,
                mask=as_tensor(keep))
    for k in ("occ", "pts_c", "valid_mask", "weights", "norm", "color"):
        out["fwd_masked_" + k] = as_numpy(res[k])
    res = model(pts_c, fl["flame_tfs"], fl["flame_verts"], cond, canonical=True, fine=True)
    for k in ("occ", "pts_c", "weights", "norm", "color"):
        out["fwd_cano_" + k] = as_numpy(res[k])
    res = model(pts_c, fl["flame_tfs"], fl["flame_verts"], cond, canonical_shape=True, fine=True)
    for k in ("occ", "weights", "norm", "color"):
        out["fwd_shape_" + k] = as_numpy(res[k])
    notes["forward"] = ("fwd_*: BaseModel.forward(pts_d, flame_tfs, flame_verts, cond, "
                        "eval_mode=True, fine=True); fwd_masked_*: the same with "
                        "mask=fwd_masked_mask "
                        "(masked-out points: occ -1000, valid_mask False, norm and color the "
                        "pad value 1); fwd_cano_*: the same on pts_c with "
                        "canonical=True; fwd_shape_*: on pts_c with canonical_shape=True (as "
                        "training_step_fine; its norm is skinned with flame_tfs). Where "
                        "fwd_valid_mask is False every init failed, all occupancies are -1000, "
                        "and the init picked (so fwd_pts_c, weights, norm, color there) follows "
                        "torch.max's choice among equal values: compare those only where valid.")

    # discriminators on fixed images (batch 2: their minibatch-stddev is then order-free)
    imgs = as_tensor(rng.uniform(-1, 1, (2, 3, opt.img_res, opt.img_res)).astype(np.float32))
    out["disc_images"] = as_numpy(imgs)
    out["disc_logits"] = as_numpy(model.gan_loss.discriminator(imgs))
    out["disc_color_logits"] = as_numpy(model.gan_loss_color.discriminator(imgs))
    return out, notes


# ----------------------------------------------------------------------------- writing

FIXED_DATE = (1980, 1, 1, 0, 0, 0)


def save_npz(path: Path, arrays: dict) -> None:
    """np.savez_compressed's format with fixed file dates, so equal arrays give equal bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=FIXED_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def lightning_checkpoint(state: dict) -> dict:
    """The dict the original's Lightning (1.3.8, ModelCheckpoint save_last) writes, without
    hyper-parameters (the original saves none) and with empty optimizer states."""
    return {"epoch": 0, "global_step": 0, "pytorch-lightning_version": PL_VERSION,
            "state_dict": state, "callbacks": {}, "optimizer_states": [], "lr_schedulers": []}


def original_commit(original: Path, given: str) -> str:
    """The checkout's HEAD commit; `given` for a plain copy (no .git of its own)."""
    if not (original / ".git").exists():
        return given
    try:
        return subprocess.run(["git", "-C", str(original), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return given


def source_digest(original: Path) -> dict:
    """sha256 of every .py and .yaml file of the original's lib/ and config/."""
    files = sorted(p for d in ("lib", "config") for p in (original / d).rglob("*")
                   if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts)
    return {str(p.relative_to(original)): sha256(p.read_bytes()) for p in files}


README = """# Fixture made by the original GANHead code

Written by `tools/make_original_fixture.py --original <GANHead checkout> --out <this folder>
--seed {seed}` (run it again to remake it; a rerun gives byte-identical files). The original
code (github.com/wsj-sjtu/GANHead) ran on CPU, shrunk to small widths, with every parameter
drawn from a seeded generator and this project's synthetic head model as its FLAME file.

- `original_tiny.ckpt`: the checkpoint as the original's Lightning writes it (`state_dict`,
  `epoch`, `global_step`, `pytorch-lightning_version`, no `hyper_parameters`), without the
  FLAME arrays that grow with the vertex count (see `manifest.json`, `checkpoint`).
- `outputs.npz`: fixed inputs and the original's outputs on them.
- `manifest.json`: how it was made: config, shrinks, stubs, every state_dict key with its
  shape, every array's shape, sha256 of the head model's arrays and of the original's files.
"""


def manifest(args, original, head_digests, opt, state, arrays, notes, stubbed) -> dict:
    """What manifest.json records (see README above)."""
    from omegaconf import OmegaConf
    return {
        "made_by": "tools/make_original_fixture.py --original <GANHead checkout> "
                   f"--out <this folder> --seed {args.seed}",
        "original": {"repository": "github.com/wsj-sjtu/GANHead",
                     "commit": original_commit(original, args.original_commit),
                     "source_sha256": source_digest(original)},
        "seed": args.seed,
        "torch": torch.__version__,
        "device": "cpu, torch.set_num_threads(1)",
        "head_model": {
            "built_by": f"lib.synthetic.head_model.build_head_model({args.seed})",
            "arrays": head_digests,
            "landmarks": "synthetic_landmarks(n_faces, seed) of this tool: the original's keys, "
                         "shapes and dtypes, face ids < n_faces (the original's file indexes "
                         "real FLAME faces)",
            "paths": "the original's FLAME() opens ../../lib/flame/flame_model/"
                     "{generic_model.pkl, landmark_embedding.npy}: the tool runs from a folder "
                     "two levels below a temporary root holding them",
        },
        "config": {
            "files": ["config.yaml", "datamodule/faceverse.yaml", "network/lbs.yaml",
                      "network/shape.yaml", "network/disp.yaml", "network/norm.yaml",
                      "network/tex.yaml", "experiments/fine.yaml"],
            "notes": "merged in this order; config.yaml's defaults name datamodule "
                     "'renderpeople', which the repository lacks (faceverse.yaml is its only "
                     "datamodule config); interpolations resolved before building (hydra 1.3's "
                     "instantiate detaches the deformer's node)",
            "set": SMALL if args.size == "tiny" else FULL, "meta_info.n_samples": N_SUBJECTS,
            "size": args.size,
            "model": OmegaConf.to_container(opt, resolve=True),
        },
        "shrink": {
            "generator": {"shape_code": [1, *GEN_CONST], "channels": [GEN_CONST[0],
                          *GEN_CHANNELS], "volume": list(arrays["volume"].shape[1:]),
                          "note": "original: h_dim 256, shape_code [1, 256, 2, 8, 8], channels "
                                  "256->128->64->64; replaced after construction by modules of "
                                  "the same kinds and names"},
            "discriminators": {"class": "StyleDiscriminator(3, img_res, ch_mul, ch_max)",
                               "ch_mul": DISC_CH_MUL, "ch_max": DISC_CH_MAX,
                               "note": "original: GANLoss builds StyleDiscriminator(3, img_res)"
                                       " (ch_mul 64, ch_max 512); rebuilt smaller"},
        } if args.size == "tiny" else None,
        "randomize": {"rule": " ".join(randomize.__doc__.split()),
                      "disp_last": DISP_LAST, "lbs_last": LBS_LAST,
                      "blendshapes": BLENDSHAPES},
        "checkpoint": {
            "file": "original_tiny.ckpt",
            "top_level_keys": list(lightning_checkpoint({}).keys()),
            "flame_copies": sorted({k.rsplit(".", 1)[0] for k in state
                                    if STRIPPED_RE.search(k)}),
            "state_dict": {k: {"shape": list(v.shape),
                               "dtype": str(v.dtype).replace("torch.", ""),
                               **({"stripped": True, "sha256": array_digest(v)["sha256"]}
                                  if STRIPPED_RE.search(k) else {})}
                           for k, v in state.items()},
            "stripped": "keys marked stripped are not in the file (they would weigh about "
                        f"{stripped_bytes(state) / 2**20:.0f} MiB); flame_buffers() of this "
                        "tool rebuilds them bitwise from the head model: " +
                        " ".join(flame_buffers.__doc__.split()),
        },
        "outputs": {"file": "outputs.npz",
                    "arrays": {k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)}
                               for k, v in sorted(arrays.items())},
                    "notes": notes,
                    "fractions": {
                        "fwd_valid_mask": float(arrays["fwd_valid_mask"].mean()),
                        "def_valid_ids": float(arrays["def_valid_ids"].mean()),
                        "fwd_occ > 0": float((arrays["fwd_occ"] > 0).mean()),
                        "net_occ > 0": float((arrays["net_occ"] > 0).mean())}},
        "stubs": {k: v for k, v in STUBS.items() if k in stubbed},
    }


def stripped_bytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for k, v in state.items() if STRIPPED_RE.search(k))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--original", required=True, type=Path, help="GANHead checkout (76c98ce)")
    ap.add_argument("--out", required=True, type=Path, help="fixture folder to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--original-commit", default=DEFAULT_COMMIT,
                    help="commit to record when --original is not a git checkout")
    ap.add_argument("--size", choices=("tiny", "full"), default="tiny",
                    help="tiny: the committed fixture's small widths; full: the original's "
                         "own sizes (for the GANHEAD_ORIGINAL test; not committed)")
    ap.add_argument("--full-checkpoint", type=Path,
                    help="also write the checkpoint with every FLAME buffer here")
    args = ap.parse_args(argv)
    original = args.original.resolve()
    out_dir = args.out.resolve()
    torch.set_num_threads(1)
    os.environ.setdefault("MPLBACKEND", "Agg")
    # the original's own noise: `is not` with a literal, deprecated weight_norm and upsample
    for category in (SyntaxWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)

    with tempfile.TemporaryDirectory(prefix="original_fixture_") as tmp:
        tmp = Path(tmp)
        head, head_digests = write_head_model(args.seed, tmp)
        sys.path.insert(0, str(original))
        sys.dont_write_bytecode = True             # leave the checkout as it is
        stubbed = install_stubs()
        work = tmp / "run" / "here"                  # '../../lib/flame/...' -> tmp/lib/...
        work.mkdir(parents=True)
        cwd = os.getcwd()
        os.chdir(work)
        try:
            torch.manual_seed(args.seed)
            model, opt = build_model(original_config(original, args.size), args.size)
            randomize(model, args.seed)
            torch.manual_seed(args.seed)
            with torch.no_grad():
                arrays, notes = run_original(model, opt, args.seed)
        finally:
            os.chdir(cwd)

    state = model.state_dict()
    rebuilt = flame_buffers(head)
    for key, value in state.items():
        m = STRIPPED_RE.search(key)
        if m and not torch.equal(rebuilt[m.group(2)], value):
            raise RuntimeError(f"flame_buffers() does not rebuild {key} exactly")
    kept = {k: v for k, v in state.items() if not STRIPPED_RE.search(k)}
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "original_tiny.ckpt"
    torch.save(lightning_checkpoint(kept), ckpt_path)
    if args.full_checkpoint:
        torch.save(lightning_checkpoint(state), args.full_checkpoint)
    save_npz(out_dir / "outputs.npz", arrays)

    info = manifest(args, original, head_digests, opt, state, arrays, notes, stubbed)
    (out_dir / "manifest.json").write_text(json.dumps(info, indent=1) + "\n")
    (out_dir / "README.md").write_text(README.format(seed=args.seed))

    valid = arrays["fwd_valid_mask"]
    print(f"wrote {out_dir}")
    files = sorted(out_dir.iterdir())
    for p in files:
        print(f"  {p.name:22s} {p.stat().st_size / 1024:8.1f} KiB")
    print(f"  {'total':22s} {sum(p.stat().st_size for p in files) / 1024:8.1f} KiB")
    print(f"  checkpoint: {len(kept)} of {len(state)} state_dict entries "
          f"({len(state) - len(kept)} vertex-sized FLAME buffers left out)")
    print(f"  deformed points: {valid.mean():.0%} valid, inits valid "
          f"{arrays['def_valid_ids'].mean():.1%}, occupancy > 0: "
          f"{(arrays['fwd_occ'] > 0).mean():.0%}; canonical occupancy > 0: "
          f"{(arrays['net_occ'] > 0).mean():.0%}")
    if args.full_checkpoint:
        print(f"  full checkpoint: {args.full_checkpoint} "
              f"({args.full_checkpoint.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
